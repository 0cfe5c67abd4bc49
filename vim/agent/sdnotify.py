"""The agent's sd_notify: `vim.sdnotify` (shared by every service since the API node,
scheduler, fault manager and SDN controller notify systemd too); kept so existing
imports (`from vim.agent.sdnotify import Notifier`) keep working."""

from __future__ import annotations

from vim.sdnotify import Notifier, keep_pinging

__all__ = ["Notifier", "keep_pinging"]
