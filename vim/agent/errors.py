"""Errors of the host-side adapters (hypervisor, switch), within the project's tree.

```
VimError
├─ InvalidInput
│   └─ InvalidDomainSpec      a DomainSpec the driver cannot turn into a domain
├─ DomainError
│   └─ HypervisorError        libvirt refused an operation (the message is libvirt's)
└─ Unavailable
    └─ HypervisorUnavailable  no live connection (libvirtd down, or not connected yet)
```

`HypervisorUnavailable` is retryable: the agent reconnects (`connect()`) and
repeats, which is safe because every driver method is idempotent.
"""

from __future__ import annotations

from vim.errors import DomainError, FieldViolation, InvalidInput, Unavailable


class InvalidDomainSpec(InvalidInput):
    """The spec is malformed (bad id, MAC, sizes); never retry unchanged."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__(
            "invalid domain spec: " + "; ".join(f"{v.field}: {v.description}" for v in violations),
            violations,
        )


class HypervisorError(DomainError):
    """libvirt refused an operation; `code` is libvirt's error code (VIR_ERR_*), if any."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class HypervisorUnavailable(Unavailable):
    """The hypervisor connection is closed or was never opened; reconnect, then retry."""
