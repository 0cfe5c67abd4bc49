"""`vimctl`: the operator's command line for the VIM.

    vimctl --endpoint 10.0.0.1:50051 --endpoint 10.0.0.2:50051 --ca ca.pem \
           --token-file op.token server list --output json

Global options come before the verb; every setting can also come from the
environment or the config file (see `vim.cli.settings`). Exit codes are listed
in `vim.cli.failures`. Output is a table on a terminal, or `--output json|yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vim.cli import admin, alarms, catalogue, compute, events, hosts, network
from vim.cli.failures import Exit
from vim.cli.runtime import fail
from vim.cli.settings import Flags, Output, SettingsError, resolve
from vim.demo.cli import demo

app = typer.Typer(
    name="vimctl",
    help="Operate the VIM: servers, networks, hosts, alarms, leaders, the event log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main_options(
    ctx: typer.Context,
    endpoint: Annotated[
        list[str] | None,
        typer.Option(help="API node host:port (repeatable; env VIM_ENDPOINTS, comma-separated)."),
    ] = None,
    token: Annotated[str | None, typer.Option(help="Bearer token (env VIM_TOKEN).")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the token (env VIM_TOKEN_FILE).")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="CA bundle for TLS (env VIM_CA).")] = None,
    cert: Annotated[Path | None, typer.Option(help="Client certificate (mTLS).")] = None,
    key: Annotated[Path | None, typer.Option(help="Client key (mTLS).")] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure", help="Plaintext (nodes started --insecure).")
    ] = None,
    output: Annotated[
        Output | None, typer.Option("--output", "-o", help="table, json or yaml.")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Per-call deadline in seconds.")] = None,
    config: Annotated[Path | None, typer.Option(help="Config file (env VIMCTL_CONFIG).")] = None,
    profile: Annotated[str | None, typer.Option(help="Config profile.")] = None,
) -> None:
    flags = Flags(
        endpoints=endpoint,
        token=token,
        token_file=token_file,
        ca=ca,
        cert=cert,
        key=key,
        insecure=insecure,
        output=output,
        timeout_s=timeout,
        config=config,
        profile=profile,
    )
    try:
        ctx.obj = resolve(flags)
    except SettingsError as exc:
        fail(Exit.USAGE, str(exc))


app.add_typer(compute.servers, name="server")
app.add_typer(compute.groups, name="affinity-group")
app.add_typer(network.networks, name="network")
app.add_typer(network.subnets, name="subnet")
app.add_typer(network.ports, name="port")
app.add_typer(catalogue.images, name="image")
app.add_typer(catalogue.flavours, name="flavour")
app.add_typer(catalogue.quotas, name="quota")
app.add_typer(catalogue.reservations, name="reservation")
app.add_typer(hosts.hosts, name="host")
app.add_typer(alarms.alarms, name="alarm")
app.add_typer(events.events, name="events")
app.add_typer(admin.projections, name="projections")
app.add_typer(admin.cluster, name="cluster")
app.command("leader")(admin.leaders)
app.command("demo")(demo)


def main() -> None:
    """Entry point of `vimctl`."""
    app()
