"""`vim-demo` (`make demo`, `vimctl demo`): the control plane on embedded defaults, and a tour.

One process runs the API node (SQLite event log in `./var/demo/`, TLS with a
private CA, minted tokens), the scheduler, the SDN controller, the fault
manager with its alarm reactor (in-process elections) and three simulated
compute hosts (real agents on libvirt `test:///` nodes, OVS "none"): see
`vim.demo.cluster`. The tour (`vim.demo.tour`) then creates a network, an
anti-affinity group and servers, powers the host of one of them off, and shows
the alarm, the fencing and the evacuation as they happen, then the event log.
See docs/DEMO.md.

This package's `__init__` imports nothing heavy: `vimctl` registers its `demo`
command from `vim.demo.cli` without loading the control plane.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `vim-demo`."""
    app = importlib.import_module("vim.demo.app")
    code: int = app.main(argv)
    return code
