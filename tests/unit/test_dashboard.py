"""The deployment files cannot rot silently.

- Every PromQL expression of the Grafana dashboard names only metrics that the
  code defines: the families registered by `ApiMetrics` and `ServiceMetrics`
  (read from their registries, with the sample suffixes of each type), plus any
  other prometheus_client metric declared in vim/ or ha/ (found by pattern),
  plus Prometheus's own `up` and the etcd names that the e2e test
  (tests/e2e/test_local_cluster.py) finds in a real etcd scrape.
- The jobs the dashboard selects exist: Prometheus's relabelling makes `job`
  the `service` label, and `vim-cluster` writes these services.
- The systemd units are Type=notify with a watchdog, restart on failure, read
  /etc/vim/<service>.env and start a console script this project installs.
"""

from __future__ import annotations

import configparser
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from vim.agent.observe import AgentMetrics
from vim.api.metrics import ApiMetrics
from vim.faultd.service import Stats as FaultdStats
from vim.scheduler.service import Stats as SchedulerStats
from vim.sdn.service import STATS_GAUGES as SDN_GAUGES
from vim.sdn.service import Stats as SdnStats
from vim.telemetry import ServiceMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "vim-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
UNITS = ROOT / "deploy" / "systemd"

PROMETHEUS_SYNTHETIC = {"up"}
ETCD_NAMES = {"etcd_server_has_leader", "etcd_server_leader_changes_seen_total"}
CLUSTER_JOBS = {"vim-api", "vim-scheduler", "vim-faultd", "vim-sdn", "vim-agent", "etcd"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
_DECLARED = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']([a-zA-Z_:][\w:]*)[\"']"
)
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip


def _registry_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def _declared_names() -> set[str]:
    """Metric names declared anywhere in vim/ and ha/ (other services' registries)."""
    names = set()
    for package in ("vim", "ha"):
        for path in (ROOT / package).rglob("*.py"):
            if "_gen" in path.parts:
                continue
            for kind, name in _DECLARED.findall(path.read_text(encoding="utf-8")):
                base = name.removesuffix("_total")
                suffixes = {"Counter": ("_total", "_created"), "Histogram": _SUFFIXES["histogram"]}
                names.update(base + s for s in suffixes.get(kind, ("",)))
    return names


def _service_registries() -> Iterator[CollectorRegistry]:
    """Each service's registry as its process builds it (per-service names, stats)."""
    for service, stats, gauges in (
        ("scheduler", SchedulerStats(), ()),
        ("faultd", FaultdStats(), ()),
        ("sdn", SdnStats(), SDN_GAUGES),
    ):
        metrics = ServiceMetrics(service)
        metrics.track_stats(stats, gauges=gauges)
        yield metrics.registry
    yield AgentMetrics().registry


def known_metric_names() -> set[str]:
    known = _registry_names(ApiMetrics().registry) | _registry_names(ServiceMetrics("x").registry)
    for registry in _service_registries():
        known |= _registry_names(registry)
    return known | _declared_names() | PROMETHEUS_SYNTHETIC | ETCD_NAMES


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?!\w)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel.get("title", "?"), target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def _unknown(dashboard: dict[str, Any], known: set[str]) -> list[str]:
    return [
        f"{title}: {name}"
        for title, expr in _expressions(dashboard)
        for name in sorted(metric_names(expr) - known)
    ]


def test_the_extractor_finds_metric_names_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, method) (rate(vim_api_request_seconds_bucket"
        '{code!="OK", job=~"vim-.*"}[$__rate_interval]))) / clamp_min(sum(up offset 5m), 1e-9)'
        " and on(job) vim_service_up"
    )
    assert metric_names(expr) == {"vim_api_request_seconds_bucket", "up", "vim_service_up"}


def test_known_names_come_from_the_registries() -> None:
    known = known_metric_names()
    assert {"vim_api_requests_total", "vim_api_request_seconds_bucket"} <= known
    assert {"vim_service_leader", "vim_service_actions_total", "vim_service_up"} <= known
    assert "process_resident_memory_bytes" in known
    assert "vim_api_requests" not in known  # a counter is read as ..._total
    assert {"vim_scheduler_placed_total", "vim_sdn_segment_clashes"} <= known
    assert {"vim_faultd_is_leader", "vim_agent_reconcile_actions_total"} <= known
    assert "vim_sdn_segment_clashes_total" not in known  # a level, not a count


def test_dashboard_reads_only_metrics_the_code_defines() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = _expressions(dashboard)
    assert len(expressions) >= 10
    assert _unknown(dashboard, known_metric_names()) == []
    # ... and the check can fail: a renamed metric is caught.
    renamed = json.loads(json.dumps(dashboard).replace("vim_api_requests_total", "vim_api_calls"))
    assert any("vim_api_calls" in u for u in _unknown(renamed, known_metric_names()))


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_jobs_are_the_services_prometheus_labels() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vim"]
    assert job["file_sd_configs"][0]["files"]
    relabel = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"]}
    assert relabel["job"] == ["service"]
    example = json.loads((PROMETHEUS.parent / "targets.example.json").read_text())
    assert {group["labels"]["service"] for group in example} == CLUSTER_JOBS
    used = set()
    for _, expr in _expressions(json.loads(DASHBOARD.read_text())):
        used.update(re.findall(r'job="([^"]+)"', expr))
    assert used and used <= CLUSTER_JOBS


@pytest.mark.parametrize("service", ["api", "scheduler", "faultd", "sdn", "agent"])
def test_systemd_units_are_notify_services_with_a_watchdog(service: str) -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((UNITS / f"vim-{service}.service").read_text())
    section = unit["Service"]
    assert section["Type"] == "notify"
    assert section["Restart"] == "on-failure"
    assert re.fullmatch(r"\d+s", section["WatchdogSec"])
    assert section["EnvironmentFile"].lstrip("-") == f"/etc/vim/{service}.env"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    binary = Path(section["ExecStart"].split()[0]).name
    assert binary == f"vim-{service}" and binary in scripts
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if service != "agent":  # the agent manages libvirt and OVS as root
        assert section["User"] == "vim"
        assert section["NoNewPrivileges"] == "yes" and section["ProtectSystem"] == "strict"
