"""Running one `vimctl` verb: settings -> client -> call -> output or exit code."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
import typer

from vim.cli.failures import Exit, OperationFailed, describe, exit_code
from vim.cli.output import stderr
from vim.cli.settings import Settings, SettingsError
from vim.client import VimClient

T = TypeVar("T")


def fail(code: Exit, message: str) -> NoReturn:
    stderr.print(f"[red]error[/red]: {message}", highlight=False)
    raise typer.Exit(int(code))


def settings_of(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):
        fail(Exit.USAGE, "settings were not resolved")
    return obj


def client_for(settings: Settings, *, retries: int = 5) -> VimClient:
    if settings.ca is None and not settings.insecure:
        raise SettingsError(
            "TLS is on by default: give the CA (--ca, VIM_CA or the config), "
            "or --insecure for a node started with --insecure"
        )
    return VimClient(
        list(settings.endpoints),
        token=settings.token,
        tls_ca=None if settings.insecure else settings.ca,
        tls_cert=settings.cert,
        tls_key=settings.key,
        timeout_s=settings.timeout_s,
        retries=retries,
    )


def run(ctx: typer.Context, work: Callable[[VimClient, Settings], Awaitable[T]]) -> T:
    """Run `work` with a client; map every failure to a message and an exit code."""
    settings = settings_of(ctx)

    async def main() -> T:
        async with client_for(settings) as vim:
            return await work(vim, settings)

    try:
        return asyncio.run(main())
    except SettingsError as exc:
        fail(Exit.USAGE, str(exc))
    except grpc.RpcError as exc:
        lines = describe(exc)
        for line in lines:
            stderr.print(line, highlight=False)
        raise typer.Exit(int(exit_code(exc))) from None
    except OperationFailed as exc:
        fail(Exit.OPERATION_FAILED, str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def request_id() -> str:
    """A fresh request id: a retry inside the client reuses it, so a repeat is harmless."""
    return str(uuid.uuid4())


def confirm(yes: bool, what: str) -> None:
    """Destructive verbs need --yes, or an interactive 'y'."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(Exit.NOT_CONFIRMED, f"{what}: pass --yes to confirm (not asking: no terminal)")
    if not typer.confirm(f"{what}?", default=False):
        fail(Exit.NOT_CONFIRMED, "not confirmed")
