#!/usr/bin/env bash
# Installs the Debian packages the project needs, once; idempotent and quiet when
# everything is already there. Runs as root on Debian 12 (the supported platform).
set -euo pipefail

PKGS=(postgresql etcd-server etcd-client libvirt-dev pkg-config libvirt-daemon-system
      qemu-system-x86 qemu-utils openvswitch-switch iproute2 iputils-ping ethtool nftables
      python3-venv python3-dev gcc make git sqlite3
      busybox-static cpio kmod)  # the watchdog test guest (vim/harness/guest.py)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages (${missing[*]}); run as root" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts nothing here (no systemd), but be explicit: the project starts its own
# PostgreSQL, etcd, OVS and libvirt on free ports; system-wide instances must not run.
exit 0
