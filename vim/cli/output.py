"""Rendering API answers: rich tables on a terminal, JSON or YAML for scripts.

Messages are turned into plain dicts with the proto field names
(`MessageToDict(preserving_proto_field_name=True)`), so `--output json` shows
exactly what the API returned, enums by name and every field including
defaults. A table shows chosen columns; a column is a dotted path into that
dict (`flavour.vcpus`), and enum prefixes (`SERVER_STATE_`) are dropped for
reading.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from vim.cli.settings import Output

Column = tuple[str, str]
"""(header, dotted path)"""

_ENUM_PREFIXES = (
    "SERVER_STATE_",
    "POWER_STATE_",
    "WATCHDOG_POLICY_",
    "HOST_STATE_",
    "HOST_HEALTH_",
    "HYPERVISOR_TYPE_",
    "NETWORK_TYPE_",
    "AFFINITY_POLICY_",
    "AFFINITY_SCOPE_",
    "PORT_STATE_",
    "IMAGE_STATUS_",
    "RESERVATION_STATUS_",
    "ALARM_STATE_",
    "SEVERITY_",
    "RESOURCE_TYPE_",
    "EVENT_TYPE_",
    "ACK_STATE_",
)

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _get(data: Mapping[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return ""
        value = value.get(part, "")
    return value


def _cell(value: Any) -> str:
    if isinstance(value, str):
        for prefix in _ENUM_PREFIXES:
            if value.startswith(prefix):
                return value[len(prefix) :]
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_cell(v)}" for k, v in sorted(value.items()))
    return str(value)


def _dump(data: Any, output: Output) -> None:
    if output is Output.YAML:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def emit_list(
    output: Output, items: Sequence[Mapping[str, Any]], columns: Sequence[Column], title: str = ""
) -> None:
    """A list of resources: a table, or a JSON/YAML array."""
    if output is not Output.TABLE:
        _dump(list(items), output)
        return
    table = Table(title=title or None, show_lines=False)
    for header, _ in columns:
        table.add_column(header, overflow="fold")
    for item in items:
        table.add_row(*(_cell(_get(item, path)) for _, path in columns))
    stdout.print(table)
    if not items:
        stderr.print("(none)")


def emit_one(output: Output, item: Mapping[str, Any], title: str = "") -> None:
    """One resource: a two-column field/value table, or a JSON/YAML object."""
    if output is not Output.TABLE:
        _dump(dict(item), output)
        return
    table = Table(title=title or None, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in _flatten(item):
        table.add_row(key, _cell(value))
    stdout.print(table)


def _flatten(item: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in item.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key != "metadata":
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def emit_line(output: Output, item: Mapping[str, Any], text: str) -> None:
    """One item of a stream: a JSON line for scripts, a text line on a terminal."""
    if output is Output.TABLE:
        stdout.print(text, highlight=False)
    else:
        sys.stdout.write(json.dumps(item, sort_keys=False) + "\n")
        sys.stdout.flush()
