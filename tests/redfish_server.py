"""A real Redfish BMC for tests: OpenStack's sushy-tools emulator over libvirt's test driver.

Run as a script it defines one libvirt `test:///default` domain per
`--system NAME=UUID` (all running), then serves them with sushy-tools'
`sushy-emulator` (its libvirt driver) in the same process, so a
`ComputerSystem.Reset` ForceOff really destroys the domain and `PowerState`
reads Off at once. (The emulator's fake driver applies power changes after a
random 1-11 s delay; `test:///default` is shared only within one process,
hence this wrapper instead of the emulator's own command line.)

`RedfishBmc.start(...)` runs it as a subprocess on a free port, waits until
it answers, and kills it (SIGKILL) on `stop()`; `--auth USER:PASSWORD`
turns on HTTP basic authentication (a bcrypt htpasswd file, as sushy wants).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import httpx

from vim.harness.ports import free_port, wait_until

_DOMAIN = (
    "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory>"
    "<vcpu>1</vcpu><os><type>hvm</type></os></domain>"
)


def _serve(argv: list[str]) -> int:
    import libvirt
    from sushy_tools.emulator import main as emulator

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--system", action="append", default=[])
    p.add_argument("--config", default="")
    a = p.parse_args(argv)
    conn = libvirt.open("test:///default")
    for dom in conn.listAllDomains():  # the driver's built-in "test" domain
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    for item in a.system:
        name, _, ident = item.partition("=")
        conn.defineXML(_DOMAIN.format(name=name, uuid=ident)).create()
    sys.argv = ["sushy-emulator", "-i", "127.0.0.1", "-p", str(a.port)]
    sys.argv += ["--libvirt-uri", "test:///default"]
    if a.config:
        sys.argv += ["--config", a.config]
    return int(emulator.main() or 0)


class RedfishBmc:
    """One emulator process serving several systems; see the module docstring."""

    def __init__(self, systems: dict[str, str], port: int, workdir: Path) -> None:
        self.systems = systems
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, names: list[str], auth: tuple[str, str] | None = None) -> RedfishBmc:
        workdir = Path(tempfile.mkdtemp(prefix="redfish-bmc-"))
        bmc = cls({n: str(uuid.uuid4()) for n in names}, free_port(), workdir)
        args = [sys.executable, __file__, "--port", str(bmc.port)]
        args += [f"--system={n}={u}" for n, u in bmc.systems.items()]
        if auth is not None:
            import bcrypt

            digest = bcrypt.hashpw(auth[1].encode(), bcrypt.gensalt(rounds=4)).decode()
            (workdir / "htpasswd").write_text(f"{auth[0]}:{digest}\n")
            conf = workdir / "emulator.conf"
            conf.write_text(f"SUSHY_EMULATOR_AUTH_FILE = {str(workdir / 'htpasswd')!r}\n")
            args += ["--config", str(conf)]
        log = workdir / "emulator.log"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        with log.open("wb") as out:
            bmc.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(bmc._answers, 30, what="the Redfish emulator", log=log)
        except Exception:
            bmc.stop()
            raise
        return bmc

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"emulator exited with {self.proc.returncode}")
        try:
            httpx.get(f"{self.base}/redfish/v1/", timeout=1.0)
        except httpx.HTTPError:
            return False
        return True

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self, name: str) -> str:
        """The host's OOB endpoint as registered (`redfish+http://.../Systems/<uuid>`)."""
        return f"redfish+http://127.0.0.1:{self.port}/redfish/v1/Systems/{self.systems[name]}"

    def power_state(self, name: str, auth: tuple[str, str] | None = None) -> str:
        url = f"{self.base}/redfish/v1/Systems/{self.systems[name]}"
        r = httpx.get(url, auth=auth, timeout=3.0)
        r.raise_for_status()
        return str(r.json()["PowerState"])

    def kill(self) -> None:
        """SIGKILL the emulator (the BMC stops answering: a host gone out of band too)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        with contextlib.suppress(OSError):
            for f in self.workdir.iterdir():
                f.unlink()
            self.workdir.rmdir()

    def __enter__(self) -> RedfishBmc:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
