"""The fault manager (`vim-faultd`): host liveness, failure classification, fencing, evacuation.

See `vim.faultd.service` and docs/FAULTS.md.
"""
