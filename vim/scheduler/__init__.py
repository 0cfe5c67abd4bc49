"""The scheduler: places BUILDING servers on hosts (see docs/SCHEDULER.md).

- `filters`, `weighers`: pure host checks and preferences;
- `planner`: a `Snapshot` of the read model in, a `Plan` (placements with the
  versions they were decided against, and failures with reasons) out; no I/O;
- `applying`: commits a plan, one optimistic append per placement;
- `service`: the leader-only `vim-scheduler` loop (election, fencing).
"""

from __future__ import annotations
