"""Build a tiny real guest whose i6300esb watchdog fires: a Debian kernel and a busybox initramfs.

Role: the evidence that the watchdog path works end to end needs a real VM whose
guest arms a real (emulated) watchdog and then stops feeding it. :func:`build_guest`
returns a kernel, an initramfs and a command line for a domain with ``<kernel>``,
``<initrd>`` and ``<cmdline>`` (no disk)::

    guest = build_guest(heartbeat_s=2, feeds=3)
    spec = DomainSpec(..., kernel_path=str(guest.kernel), initrd_path=str(guest.initrd),
                      kernel_cmdline=guest.cmdline, watchdog=WatchdogAction.RESET)

What the guest does (its ``/init``, busybox sh): mount /dev, /proc, /sys; load the
watchdog modules; open ``/dev/watchdog``; feed it ``feeds`` times, once a second;
print ``vim-guest: stopped feeding`` and sleep forever, keeping the device open
(closing it without the magic ``V`` would not stop it either). The watchdog then
fires within about ``heartbeat_s`` of the last feed and the hypervisor applies the
domain's watchdog action; after a reset the guest boots and does it all again.

Invariants:

* The kernel is the generic Debian ``linux-image-<abi>-amd64`` (the ``-cloud``
  flavour lacks i6300esb), found through the ``linux-image-amd64`` metapackage,
  fetched with ``apt-get download`` and unpacked with ``dpkg-deb`` (never
  installed); only the kernel image and the modules needed (``i6300esb`` and what
  ``modinfo -F depends`` says it needs, recursively) are kept. The image is the
  bzImage's uncompressed ELF when the kernel has ``CONFIG_PVH`` (booted directly,
  ~10 s faster under emulation), else the bzImage itself.
* Everything is cached under ``cache_root()/guest`` (see
  :func:`vim.harness.libvirtd.cache_root`): the kernel per package, the initramfs
  per content hash. A rerun costs nothing; a build takes ~5-10 s plus the download.
  Builds take an exclusive ``flock`` so concurrent test processes build once.
* Needs Debian ``busybox-static``, ``cpio``, ``kmod`` (modinfo) and apt; failures
  raise :class:`~vim.harness.ports.HarnessError` saying what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vim.harness.libvirtd import cache_root
from vim.harness.ports import HarnessError

__all__ = ["MARK_ARMED", "MARK_STOPPED", "Guest", "build_guest", "kernel_package"]

WATCHDOG_MODULE = "i6300esb"
BUSYBOX = "/bin/busybox"
MARK_ARMED = "vim-guest: watchdog armed"
MARK_STOPPED = "vim-guest: stopped feeding"
_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /bin /dev /proc /sys
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "vim-guest: booted at $(cat /proc/uptime)"
{insmods}
i=0
while [ ! -e /dev/watchdog ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
exec 3>/dev/watchdog
echo "{armed} (timeout $(cat /sys/class/watchdog/watchdog0/timeout 2>&1) s)"
n=0
while [ $n -lt {feeds} ]; do echo -n k >&3; echo "vim-guest: fed $n"; sleep 1; n=$((n+1)); done
echo "{stopped} at $(cat /proc/uptime)"
while true; do sleep 3600; done
"""


@dataclass(frozen=True, slots=True)
class Guest:
    """A bootable guest: pass these to a domain's ``<kernel>``, ``<initrd>``, ``<cmdline>``."""

    kernel: Path
    initrd: Path
    cmdline: str


def _run(args: list[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise HarnessError(f"{args[0]} not found: install it (deploy/install-deps.sh)") from e
    if done.returncode != 0:
        raise HarnessError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def kernel_package() -> str:
    """The generic kernel package the ``linux-image-amd64`` metapackage depends on."""

    def lookup() -> str | None:
        try:
            out = _run(["apt-cache", "depends", "linux-image-amd64"])
        except HarnessError:
            return None
        found = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out)
        generic = [p for p in found if "-cloud-" not in p and "-rt-" not in p]
        return generic[0] if generic else None

    pkg = lookup()
    if pkg is None:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"])
        pkg = lookup()
    if pkg is None:
        raise HarnessError("no linux-image-*-amd64 package found through linux-image-amd64")
    return pkg


def _extract(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The contents of the package's files whose path satisfies ``wanted`` (one pass)."""
    out: dict[str, bytes] = {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    f = tar.extractfile(member)
                    if f is not None:
                        out[member.name] = f.read()
        proc.stdout.close()
    if proc.returncode != 0:
        raise HarnessError(f"dpkg-deb --fsys-tarfile {deb} failed ({proc.returncode})")
    return out


def _module_name(member: str) -> str | None:
    base = member.rsplit("/", 1)[-1]
    for suffix in (".ko", ".ko.xz"):
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return None


def _write_module(dest: Path, member: str, data: bytes) -> Path:
    name = _module_name(member)
    assert name is not None
    path = dest / f"{name}.ko"
    path.write_bytes(lzma.decompress(data) if member.endswith(".xz") else data)
    return path


def _kernel(cache: Path, package: str) -> tuple[Path, Path, list[str]]:
    """(kernel image, modules dir, modules in load order) for ``package``; unpacked once.

    The image is the uncompressed ELF ``vmlinux`` when the kernel supports PVH boot
    (QEMU then jumps straight to it: decompressing the bzImage under emulation costs
    7-15 s per boot on a loaded machine), else the bzImage ``vmlinuz``.
    """
    out = cache / package
    modules, manifest = out / "modules", out / "manifest.json"
    if manifest.is_file():
        done = json.loads(manifest.read_text())
        return out / str(done["kernel"]), modules, [str(m) for m in done["modules"]]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vim-kernel-", dir=cache) as tmp_s:
        tmp = Path(tmp_s)
        _run(["apt-get", "download", "-q", package], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise HarnessError(f"apt-get download {package} produced {debs}")
        staged = tmp / "modules"
        staged.mkdir()
        # One pass for the kernel, its config and the watchdog drivers; more passes
        # only for dependencies that live elsewhere (none for i6300esb on 6.1).
        files = _extract(
            debs[0],
            lambda m: (
                m.startswith(("./boot/vmlinuz-", "./boot/config-"))
                or "/kernel/drivers/watchdog/" in m
            ),
        )
        kernels = [m for m in files if m.startswith("./boot/vmlinuz-")]
        configs = [m for m in files if m.startswith("./boot/config-")]
        if len(kernels) != 1:
            raise HarnessError(f"{package} holds kernels {kernels}")
        bzimage = files.pop(kernels[0])
        config = b"".join(files.pop(c) for c in configs)
        vmlinux = _vmlinux(bzimage) if b"\nCONFIG_PVH=y\n" in config else None
        name = "vmlinux" if vmlinux is not None else "vmlinuz"
        (tmp / name).write_bytes(vmlinux if vmlinux is not None else bzimage)
        available = {n: m for m in files if (n := _module_name(m)) is not None}
        order: list[str] = []
        _resolve(WATCHDOG_MODULE, available, files, debs[0], staged, order, set())
        shutil.rmtree(modules, ignore_errors=True)
        staged.rename(modules)
        (tmp / name).replace(out / name)
        manifest.write_text(json.dumps({"kernel": name, "modules": order}) + "\n")
    return out / name, modules, order


def _vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside an XZ-compressed bzImage, or None if it is not one."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def _resolve(
    name: str,
    available: dict[str, str],
    files: dict[str, bytes],
    deb: Path,
    staged: Path,
    order: list[str],
    seen: set[str],
) -> None:
    """Stage module ``name`` after its dependencies (``modinfo -F depends``), depth first."""
    if name in seen:
        return
    seen.add(name)
    if name not in available:
        more = _extract(deb, lambda m: _module_name(m) == name)
        if not more:
            raise HarnessError(f"module {name} not found in {deb.name}")
        files.update(more)
        available[name] = next(iter(more))
    member = available[name]
    path = _write_module(staged, member, files[member])
    deps = [d for d in _run(["modinfo", "-F", "depends", str(path)]).strip().split(",") if d]
    for dep in deps:
        _resolve(dep.replace("-", "_"), available, files, deb, staged, order, seen)
    order.append(name)


def _initrd(out: Path, modules: Path, order: list[str], script: str) -> None:
    """A gzipped newc cpio: busybox, the modules, /init."""
    if not Path(BUSYBOX).is_file():
        raise HarnessError(f"{BUSYBOX} missing: install busybox-static")
    with tempfile.TemporaryDirectory(prefix="vim-initrd-", dir=out.parent) as tmp_s:
        root = Path(tmp_s) / "root"
        for sub in ("bin", "dev", "proc", "sys", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for name in order:
            shutil.copy2(modules / f"{name}.ko", root / "lib" / "modules" / f"{name}.ko")
        init = root / "init"
        init.write_text(script)
        init.chmod(0o755)
        with contextlib.suppress(OSError):  # the kernel's console before /dev is mounted
            os.mknod(root / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=root,
            input="\n".join(names).encode() + b"\n",
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise HarnessError(f"cpio failed: {archive.stderr.decode(errors='replace')}")
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(archive.stdout, compresslevel=6, mtime=0))
        tmp.replace(out)


def build_guest(cache_dir: Path | None = None, *, heartbeat_s: int = 2, feeds: int = 3) -> Guest:
    """The watchdog guest, built (or taken from the cache) for these parameters."""
    if not 1 <= heartbeat_s <= 60 or not 0 <= feeds <= 1000:
        raise ValueError("heartbeat_s must be 1..60 and feeds 0..1000")
    cache = (cache_dir or cache_root() / "guest").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        package = kernel_package()
        vmlinuz, modules, order = _kernel(cache, package)
        script = _INIT.format(
            insmods="\n".join(
                f"insmod /lib/modules/{m}.ko"
                + (f" heartbeat={heartbeat_s}" if m == WATCHDOG_MODULE else "")
                + f' || echo "vim-guest: insmod {m} failed"'
                for m in order
            ),
            armed=MARK_ARMED,
            stopped=MARK_STOPPED,
            feeds=feeds,
        )
        busybox_id = hashlib.sha256(Path(BUSYBOX).read_bytes()).hexdigest()[:16]
        key = hashlib.sha256(f"{package}\n{busybox_id}\n{script}".encode()).hexdigest()[:16]
        initrd = cache / f"initrd-{key}.img"
        if not initrd.is_file():
            _initrd(initrd, modules, order, script)
    return Guest(kernel=vmlinuz, initrd=initrd, cmdline="console=ttyS0 quiet panic=-1")
