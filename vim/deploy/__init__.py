"""The real topology on one machine: `LocalCluster` and the `vim-cluster` command.

A deployment tool over the whole system: it starts the services as processes
and talks to them only through their command lines, files and the public API.
Nothing in the product imports it (an import-linter contract says so).
"""

from vim.deploy.cluster import ClusterError, LocalCluster
from vim.deploy.config import ClusterConfig, ConfigError, load_config, overrides
from vim.deploy.state import Member

__all__ = [
    "ClusterConfig",
    "ClusterError",
    "ConfigError",
    "LocalCluster",
    "Member",
    "load_config",
    "overrides",
]
