"""IFA005 alarms: rules from fault facts, the fenced reactor that records them, ageing.

- `vim.alarms.rules`: fact -> alarm decisions (pure);
- `vim.alarms.ageing`: the ageing policy (pure);
- `vim.alarms.reactor`: `AlarmReactor`, run by the elected fault manager.

The API side (`GetAlarmList`, `Acknowledge`, `SubscribeAlarms`, `WatchHostHealth`)
is `vim.api.alarms`; like the fault manager, this package acts only through the log.

See docs/ALARMS.md.
"""

from __future__ import annotations

from vim.alarms.ageing import AgeingPolicy
from vim.alarms.reactor import AlarmReactor, ReactorConfig

__all__ = ["AgeingPolicy", "AlarmReactor", "ReactorConfig"]
