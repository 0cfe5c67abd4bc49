"""Several processes starting on one fresh SQLite event log at once (the API node, the
scheduler and the fault manager of an embedded or test deployment): every one of them
brings the schema up without tripping over the others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

UPGRADE = "import sys; from vim.eventlog import migrating; migrating.upgrade(sys.argv[1])"


def test_concurrent_upgrades_of_a_fresh_sqlite_log_all_succeed(tmp_path: Path) -> None:
    for attempt in range(3):  # the race needs processes that really start together
        url = f"sqlite:///{tmp_path}/log-{attempt}.db"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", UPGRADE, url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
        for p in procs:
            if p.stdout:
                p.stdout.close()
            if p.stderr:
                p.stderr.close()
        failed = [err.strip().splitlines()[-1:] for code, err in results if code != 0]
        assert not failed, failed
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                tables = set(sa.inspect(conn).get_table_names())
                (revision,) = conn.execute(sa.text("SELECT version_num FROM alembic_version")).one()
        finally:
            engine.dispose()
        assert {"events", "streams"} <= tables and revision
