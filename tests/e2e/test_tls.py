"""`vim-api` over TLS and mutual TLS, as a real process, with certificates made per test.

The CA and certificates come from `vim.security.certs` in `tmp_path`. Checked:
a client that trusts the CA calls GetHead (through `VimClient`); a plaintext
client and a client that trusts another CA fail; with `--tls-client-ca` a
client without a certificate is refused and one with a certificate the CA
issued gets through; and `vim-api` refuses to start without certificates
unless told `--insecure`, saying why.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_api_node import (
    ADMIN_TOKEN,
    DEADLINE_S,
    Node,
    node_env,
    start_node,
    stop_node,
)
from vim._gen.vim.v1 import events_pb2
from vim.client import VimClient
from vim.security import certs


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    certs.make_ca(directory)
    certs.issue(directory, "server", ["127.0.0.1", "localhost"])
    certs.issue(directory, "client", ["vimctl"], client=True)
    return directory


def tls_args(pki: Path) -> tuple[str, ...]:
    return ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))


def channel_credentials(pki: Path, *, client_cert: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if client_cert else None,
    )


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path) -> Iterator[Node]:
    n = start_node(tmp_path, *tls_args(pki), credentials=channel_credentials(pki))
    try:
        yield n
    finally:
        stop_node(n)


async def get_head(client: VimClient) -> int:
    reply = await client.events.GetHead(events_pb2.GetHeadRequest())
    return reply.head.position


async def test_a_client_trusting_the_ca_is_served(tls_node: Node, pki: Path) -> None:
    async with VimClient([tls_node.address], token=ADMIN_TOKEN, tls_ca=pki / "ca.pem") as c:
        assert await get_head(c) == 0
    assert "plaintext" not in tls_node.logs()


async def test_plaintext_and_untrusting_clients_fail(
    tls_node: Node, pki: Path, tmp_path: Path
) -> None:
    async with VimClient([tls_node.address], token=ADMIN_TOKEN, retries=1, backoff_s=0.01) as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_head(c)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    other = tmp_path / "other-ca"
    certs.make_ca(other)
    async with VimClient(
        [tls_node.address], token=ADMIN_TOKEN, tls_ca=other / "ca.pem", retries=1, backoff_s=0.01
    ) as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_head(c)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, pki: Path) -> None:
    node = start_node(
        tmp_path,
        *tls_args(pki),
        *("--tls-client-ca", str(pki / "ca.pem")),
        credentials=channel_credentials(pki, client_cert=True),
    )
    try:
        async with VimClient(
            [node.address], token=ADMIN_TOKEN, tls_ca=pki / "ca.pem", retries=1, backoff_s=0.01
        ) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get_head(anonymous)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        async with VimClient(
            [node.address],
            token=ADMIN_TOKEN,
            tls_ca=pki / "ca.pem",
            tls_cert=pki / "client.pem",
            tls_key=pki / "client.key",
        ) as known:
            assert await get_head(known) == 0
    finally:
        stop_node(node)


def run_api(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "vim.api.server", "--listen", "127.0.0.1:0"),
            *("--metrics-listen", "off", "--eventlog-url", f"sqlite:///{tmp_path}/log.db"),
            *args,
        ],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=node_env(),
    )


def test_without_certificates_or_insecure_the_node_refuses_to_start(tmp_path: Path) -> None:
    proc = run_api(tmp_path)
    assert proc.returncode != 0
    assert "TLS is required" in proc.stderr
    assert "--tls-cert" in proc.stderr and "--insecure" in proc.stderr
    assert not (tmp_path / "log.db").exists()  # refused before anything was opened


def test_tls_flags_are_checked_before_starting(tmp_path: Path, pki: Path) -> None:
    only_cert = run_api(tmp_path, "--tls-cert", str(pki / "server.pem"))
    assert only_cert.returncode != 0 and "TLS is required" in only_cert.stderr
    missing = run_api(tmp_path, "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", "x")
    assert missing.returncode != 0 and "no such file" in missing.stderr
    both = run_api(tmp_path, "--insecure", *tls_args(pki))
    assert both.returncode != 0 and "conflicts" in both.stderr
