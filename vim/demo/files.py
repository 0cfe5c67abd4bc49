"""What one demo run writes in ./var/demo/: the log, the secret, tokens, TLS, a vimctl profile.

Everything is recreated on every run, so the tour always starts the same way:
the SQLite event log (and its WAL files), the token-signing secret, the admin
token, the simulated hosts' directories (libvirt test node files and agent
state) and, unless `insecure`, a private CA with a server certificate for
127.0.0.1 and localhost. The secret and the tokens are written with mode 0600.
Nothing outside the demo directory is touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from vim.api.auth import Authenticator
from vim.security import certs

DEMO_DIR = Path("var") / "demo"
TOKEN_TTL_S = 24 * 3600.0
PROFILE = "demo"


@dataclass(frozen=True, slots=True)
class Setup:
    """The files of one run."""

    directory: Path
    url: str
    secret: bytes
    token: str
    token_file: Path
    tls: certs.Issued | None
    ca: Path | None

    @property
    def hosts_dir(self) -> Path:
        return self.directory / "hosts"

    @property
    def profile_file(self) -> Path:
        return self.directory / "vimctl.toml"

    def agent_token(self, hostname: str) -> str:
        """A token for `hostname`'s agent (role agent, naming the host)."""
        return Authenticator(self.secret).mint_agent(hostname, ttl_s=TOKEN_TTL_S)


def prepare(workdir: Path, *, insecure: bool) -> Setup:
    """Recreate the demo's files under `workdir/var/demo` (see the module docstring)."""
    directory = (workdir / DEMO_DIR).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "eventlog.db"
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    shutil.rmtree(directory / "hosts", ignore_errors=True)
    (directory / "vimctl.toml").unlink(missing_ok=True)
    secret = secrets.token_urlsafe(48).encode()
    write_private(directory / "auth.secret", secret)
    token = Authenticator(secret).mint("demo-admin", "demo", ["admin"], ttl_s=TOKEN_TTL_S)
    token_file = directory / "admin.token"
    write_private(token_file, token.encode())
    tls: certs.Issued | None = None
    ca: Path | None = None
    if not insecure:
        pki = directory / "tls"
        ca = certs.make_ca(pki, common_name="vim-demo CA").cert
        tls = certs.issue(pki, "server", ["127.0.0.1", "localhost"])
    return Setup(directory, f"sqlite:///{db}", secret, token, token_file, tls, ca)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file readable by its owner only."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as sink:
        sink.write(data)


def write_profile(setup: Setup, endpoint: str) -> Path:
    """A vimctl config file with a `[demo]` profile (and `[default]`) for this run."""
    lines = [f'endpoints = ["{endpoint}"]', f'token_file = "{setup.token_file}"']
    lines.append(f'ca = "{setup.ca}"' if setup.ca else "insecure = true")
    body = "\n".join(lines)
    text = f"# Written by vim-demo for this run.\n[{PROFILE}]\n{body}\n\n[default]\n{body}\n"
    path = setup.profile_file
    path.write_text(text, encoding="utf-8")
    return path
