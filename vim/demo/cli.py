"""`vimctl demo`: the same embedded cluster and tour as `vim-demo` (see `vim.demo`).

It ignores vimctl's global connection options: the demo starts its own
cluster on a free port. The control plane is imported only when the command
runs (by name, through `importlib`), so `vimctl` stays quick to start and the
CLI layer does not depend on the API's modules.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer


def demo(
    tour_only: Annotated[
        bool, typer.Option("--tour-only", help="Exit after the tour: 0 when every step passed.")
    ] = False,
    listen: Annotated[str, typer.Option(help="gRPC host:port (default: a free port).")] = (
        "127.0.0.1:0"
    ),
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Serve plaintext instead of TLS.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log the components at INFO.")] = False,
) -> None:
    """Run the control plane on embedded defaults with three simulated hosts, and the tour."""
    argv = ["--listen", listen]
    argv += ["--tour-only"] if tour_only else []
    argv += ["--insecure"] if insecure else []
    argv += ["--verbose"] if verbose else []
    app = importlib.import_module("vim.demo.app")
    raise typer.Exit(int(app.main(argv)))
