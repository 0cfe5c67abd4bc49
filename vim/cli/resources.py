"""The verbs every resource shares (list, show, delete), declared once per resource.

A `Resource` names the stub, the List/Get/Delete RPCs and their request types,
the id field, the repeated field of the list response and the table columns;
`add_common_verbs` adds `list`, `show` and (when there is a delete RPC)
`delete` to the resource's typer group. Lists follow `next_page_token` until
the last page or `--limit` items.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from google.protobuf.message import Message

from vim._gen.vim.v1 import common_pb2
from vim.cli.output import Column, as_dict, emit_list, emit_one
from vim.cli.runtime import confirm, request_id, run
from vim.cli.settings import Settings
from vim.client import VimClient

PAGE_SIZE = 200


@dataclass(frozen=True)
class Resource:
    noun: str
    stub: Callable[..., Any]
    id_field: str
    list_rpc: str
    list_request: type[Message]
    items_field: str
    get_rpc: str
    get_request: type[Message]
    columns: Sequence[Column]
    delete_rpc: str = ""
    delete_request: type[Message] | None = None
    list_filters: dict[str, str] = field(default_factory=dict)
    """option name -> request field, offered on `list` as --OPTION."""


async def list_all(
    vim: VimClient, res: Resource, limit: int, **filters: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token = ""
    while True:
        request = res.list_request(**{k: v for k, v in filters.items() if v not in (None, "")})
        if "page" in res.list_request.DESCRIPTOR.fields_by_name:
            request.page.CopyFrom(common_pb2.PageRequest(page_size=PAGE_SIZE, page_token=token))  # type: ignore[attr-defined]
        response = await vim.unary(res.stub, res.list_rpc, request)
        items += [as_dict(m) for m in getattr(response, res.items_field)]
        token = response.page.next_page_token if response.HasField("page") else ""
        if not token or (limit and len(items) >= limit):
            return items[:limit] if limit else items


async def get_one(vim: VimClient, res: Resource, ident: str) -> Message:
    request = res.get_request(**{res.id_field: ident})
    message: Message = await vim.unary(res.stub, res.get_rpc, request)
    return message


def enum_value(descriptor: Any, prefix: str, text: str, option: str) -> Any:
    """`reset` -> WATCHDOG_POLICY_RESET's number; a clear error listing the choices."""
    wanted = f"{prefix}{text.strip().upper().replace('-', '_')}"
    value = descriptor.values_by_name.get(wanted)
    if value is None or value.number == 0:
        choices = [v.name.removeprefix(prefix).lower() for v in descriptor.values if v.number]
        raise typer.BadParameter(f"{text!r} is not one of {', '.join(choices)}", param_hint=option)
    return int(value.number)


def enum_prefix(descriptor: Any) -> str:
    """`ServerState` -> `SERVER_STATE_`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", descriptor.name).upper() + "_"


def coerce(request: type[Message], name: str, text: str, option: str) -> Any:
    """A command-line string as the request field's type (enums by short name)."""
    f = request.DESCRIPTOR.fields_by_name[name]
    if f.enum_type is not None:
        return enum_value(f.enum_type, enum_prefix(f.enum_type), text, option)
    if f.cpp_type in (f.CPPTYPE_INT32, f.CPPTYPE_INT64, f.CPPTYPE_UINT32, f.CPPTYPE_UINT64):
        try:
            return int(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a whole number", param_hint=option) from None
    return text


def add_common_verbs(group: typer.Typer, res: Resource) -> None:
    filters = res.list_filters

    def list_(
        ctx: typer.Context,
        limit: Annotated[int, typer.Option(help="At most this many (0: all).")] = 0,
        filter_: Annotated[
            list[str] | None,
            typer.Option(
                "--filter",
                help=f"KEY=VALUE; keys: {', '.join(filters) or 'none'}.",
            ),
        ] = None,
    ) -> None:
        given: dict[str, str] = {}
        for item in filter_ or []:
            key, sep, value = item.partition("=")
            if not sep or key not in filters:
                raise typer.BadParameter(
                    f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(filters) or 'none'}",
                    param_hint="--filter",
                )
            given[filters[key]] = coerce(res.list_request, filters[key], value, "--filter")

        async def work(vim: VimClient, s: Settings) -> None:
            items = await list_all(vim, res, limit, **given)
            emit_list(s.output, items, res.columns)

        run(ctx, work)

    def show(ctx: typer.Context, ident: Annotated[str, typer.Argument(metavar="ID")]) -> None:
        async def work(vim: VimClient, s: Settings) -> None:
            emit_one(s.output, as_dict(await get_one(vim, res, ident)))

        run(ctx, work)

    group.command("list", help=f"List {res.noun}s.")(list_)
    group.command("show", help=f"Show one {res.noun}.")(show)
    if res.delete_rpc and res.delete_request is not None:
        delete_request = res.delete_request

        def delete(
            ctx: typer.Context,
            ident: Annotated[str, typer.Argument(metavar="ID")],
            yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
        ) -> None:
            confirm(yes, f"delete {res.noun} {ident}")

            async def work(vim: VimClient, s: Settings) -> None:
                request = delete_request(request_id=request_id(), **{res.id_field: ident})
                response = await vim.unary(res.stub, res.delete_rpc, request)
                emit_one(s.output, as_dict(response) or {res.id_field: ident, "deleted": True})

            run(ctx, work)

        article = "an" if res.noun[:1] in "aeiou" else "a"
        group.command("delete", help=f"Delete {article} {res.noun}.")(delete)
