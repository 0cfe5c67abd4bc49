"""The SDN controller (`vim-sdn`): per-host network plans, written by one elected master.

See `vim.sdn.service` and docs/SDN.md; the plan computation itself is pure and
lives in `vim.domain.netplan`.
"""
