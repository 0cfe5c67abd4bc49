"""The VIM's Python gRPC client: several API nodes, one consistent, retrying client.

`VimClient` (in `vim.client.client`) is the entry point; `vim.client.channel`
holds the machinery every call goes through and documents its guarantees.
"""

from __future__ import annotations

from vim.client.channel import RetryingChannel, RetryPolicy, StreamCall
from vim.client.client import VimClient

__all__ = ["RetryPolicy", "RetryingChannel", "StreamCall", "VimClient"]
