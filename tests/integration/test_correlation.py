"""One id follows a request from the API node, through the event log, to the agent's log.

A real `vim-agent` process (`tests/integration/test_agent.py`'s harness: API
node and scheduler in this process, etcd by the harness, the agent on its own
libvirt test node) logs JSON lines. A server allocated with a known
`x-correlation-id` must show up in the agent's log line for that server with
that `correlation_id`; one allocated without the header, with its request id
(the API's fallback). The agent's metrics endpoint counts the same work.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_agents_api import MEMBER, allocation
from tests.integration.test_agent import (  # noqa: F401  (fixtures)
    Cluster,
    cluster,
    domains,
    etcd,
    until,
)

pytestmark = [pytest.mark.etcd, pytest.mark.slow]
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The log's JSON lines (anything else, e.g. a traceback's lines, is skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def scrape(port: int) -> dict[str, float]:
    """sample name{labels} -> value, parsed with prometheus_client's parser."""
    with _http.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def test_the_request_id_reaches_the_agent_log_line_of_its_server(
    cluster: Cluster,  # noqa: F811  (the imported fixture)
    tmp_path: Path,
) -> None:
    port_file = tmp_path / "agent.metrics-port"
    agent = cluster.agent(
        "cmp-1", "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(port_file)
    )
    await until("the agent's first pass", agent.status)

    known = f"corr-{uuid.uuid4()}"
    with_header = allocation(cluster.catalogue, "vm-a")
    made = await cluster.compute.AllocateCompute(
        with_header, metadata=(*MEMBER, ("x-correlation-id", known))
    )
    sid_a = str(made.server_id)
    without_header = allocation(cluster.catalogue, "vm-b")
    sid_b = str((await cluster.compute.AllocateCompute(without_header, metadata=MEMBER)).server_id)
    await until(
        "both domains running", lambda: sorted(domains(agent)() or {}) == sorted([sid_a, sid_b])
    )

    def acted(sid: str) -> list[dict[str, Any]]:
        return [
            line
            for line in json_lines(agent.log_path)
            if line.get("server_id") == sid and "acting on server" in str(line.get("event"))
        ]

    lines_a = await until("the agent's line for the first server", lambda: acted(sid_a))
    assert {line["correlation_id"] for line in lines_a} == {known}, lines_a
    assert all(line["logger"] == "vim.agent" and line["level"] == "info" for line in lines_a)
    lines_b = await until("the agent's line for the second server", lambda: acted(sid_b))
    assert {line["correlation_id"] for line in lines_b} == {without_header.request_id}, lines_b

    # The same work, counted: passes, EnsureDomain actions, two running domains.
    port = int(
        await until(
            "the metrics port file", lambda: port_file.exists() and port_file.read_text().strip()
        )
    )
    samples = await until(
        "two running domains in the metrics",
        lambda: (s := scrape(port)).get("vim_agent_domains{power=RUNNING}") == 2 and s,
    )
    assert samples["vim_agent_reconcile_passes_total"] >= 1
    assert samples["vim_agent_reconcile_actions_total{action=EnsureDomain}"] >= 2
    assert samples.get("vim_agent_reconcile_failures_total{action=EnsureDomain}", 0) == 0
    assert samples["vim_agent_desired_servers"] == 2
    assert samples["vim_agent_lease_renewals_total"] >= 1
    assert samples["vim_agent_lease_alive"] == 1
    assert samples["vim_agent_is_leader"] == 1
    assert samples["vim_service_up{service=agent}"] == 1
    assert samples["vim_service_actions_total{action=EnsureDomain,outcome=ok,service=agent}"] >= 2
    # Labels stay bounded: no server id in any sample.
    assert not [name for name in samples if sid_a in name or sid_b in name]
