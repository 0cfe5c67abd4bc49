"""`python -m vim.demo`: the same as `vim-demo`."""

from __future__ import annotations

import sys

from vim.demo import main

sys.exit(main())
