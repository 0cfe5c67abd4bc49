"""The Open vSwitch adapter of :class:`vim.agent.drivers.SwitchDriver` (ovsdbapp + ovs-ofctl).

Role: converge one host's Open vSwitch (userspace ``netdev`` datapath) to what
the SDN plan says: bridges, one port per server NIC, VXLAN tunnels to the
other hosts, the flows that map local VLAN tags to VNIs, and the flows that
map local VLAN tags to the provider VLANs (or to untagged, for flat networks)
of the underlay.

Layout (every bridge ``datapath_type=netdev``)::

    server NICs (tap/veth, access ports, tag = local VLAN)
        │
      br-int   (standalone: NORMAL switching, VLAN-aware)
        │ patch-tun <-> patch-int (trunk)          │ int-prv <-> prv-int (trunk)
      br-tun   (fail_mode=secure: only our flows;  br-prv  (fail_mode=secure: only our
        │       VXLAN ports vx-<hex ip>,             │       flows; local VLAN <-> provider
        │       remote_ip, local_ip, key=flow)       │       VLAN / untagged)
        │ tunnel traffic is routed by OVS itself     │ prv-phy <-> phy-prv (trunk)
        │ (its routes and ARP come from the kernel   │
        │ tables of its namespace)                   │
      br-phy   (standalone: NORMAL) holds the underlay link; its internal port
               carries the tunnel endpoint address (local_ip)

br-tun flows (tables; every flow carries one cookie, a hash of the whole set)::

    0  in_port=patch-int -> 1 ; in_port=LOCAL -> drop ; anything else (a tunnel) -> 2
    1  from br-int: dl_vlan=LV -> 20                     (unknown VLAN: drop)
    2  from a tunnel: tun_id=VNI -> set VLAN LV, learn (MAC -> that tunnel) into 20,
       output patch-int only: never tunnel -> tunnel     (unknown VNI: drop)
    20 learned unicast: dl_vlan=LV,dl_dst=MAC -> strip VLAN, set VNI, output the tunnel
       miss -> 22
    22 flood: dl_vlan=LV -> strip VLAN, set VNI, output every tunnel

br-prv flows (one table, one cookie for the set; a pure translator between two
patches, so no learning: br-int and br-phy switch on either side)::

    0  vlan: in_port=prv-int,dl_vlan=LV  -> mod_vlan_vid:VID, output prv-phy
             in_port=prv-phy,dl_vlan=VID -> mod_vlan_vid:LV,  output prv-int
       flat: in_port=prv-int,dl_vlan=LV  -> strip_vlan,       output prv-phy
             in_port=prv-phy,untagged (vlan_tci=0x0000/0x1fff) -> push LV, output prv-int
       anything else (unknown VLAN, LOCAL)                     -> drop

Provider networks: ``vlan`` (segmentation id = the 802.1Q VLAN on the
underlay) and ``flat`` (untagged on the underlay: it shares the link with the
tunnel endpoint's own traffic, as a flat network does). The host has one
underlay link, on one physical network (``physical_network``, the agent's
``--physical-network``): only flat and vlan networks of that physical network
are bridged to it. VLAN ids are unique per physical network only, so a network
of another one may carry the same id: bridged here, it would join the first on
the wire. Its ports stay on br-int with their local tag and no way out (logged
once per network); a plan entry that names no physical network (from an API
node older than the field) is taken as this host's.

Why a separate secure bridge rather than flows in br-int and br-phy:
after ovs-vswitchd restarts, br-int and br-phy fall back to NORMAL and keep
VXLAN and the endpoint working, while br-prv, like br-tun, has no flows and
drops: no frame crosses with an untranslated (host-local) tag until the
reconcile pass reinstalls the translation. Without an underlay device there
is no br-phy and no br-prv: provider networks are then invalid input.

Invariants:

* Every method is idempotent and converges from any starting point. Ports
  carry ``external_ids`` ``iface-id``/``vim-port-id``, ``vim-server-id``,
  ``vim-network-id``, ``attached-mac``; only ports carrying ``vim-port-id``
  are ours (listed, removed); others are never touched.
* ``ensure_flows`` is cheap when nothing changed: one ``dump-flows`` per
  bridge (br-tun, br-prv); it rewrites a bridge's table (``del-flows`` then
  ``add-flows``; ``replace-flows`` does not work with this datapath) only
  when the flows carrying the expected cookie are not exactly the expected
  count or a foreign flow exists. After ovs-vswitchd restarts, br-tun and
  br-prv have no flows: the next call reinstalls them (a reconcile duty).
  Learned flows (br-tun table 20) are not ours to check.
* Database writes never wait for ovs-vswitchd (it may be dead: reconciling
  must still record the desired state); reads of ``ofport`` wait, bounded.
* Blocking calls (the OVSDB IDL, netlink, ovs-ofctl) run in threads, never on
  the event loop. Bad specs raise :class:`vim.errors.InvalidInput` with field
  violations; an unreachable switch raises :class:`vim.errors.Unavailable`.
* Per host: local VLANs unique over all networks; VXLAN VNIs unique; provider
  VLAN ids unique and in 1..4094; at most one flat network.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ovsdbapp.backend.ovs_idl import connection as ovs_connection
from ovsdbapp.backend.ovs_idl import transaction as ovs_transaction
from ovsdbapp.schema.open_vswitch import impl_idl

from vim.agent import netdev
from vim.agent.drivers import NetworkPlanEntry, PortBinding, SwitchDriver, TunnelSpec
from vim.errors import FieldViolation, InvalidInput, Unavailable

__all__ = ["BR_INT", "BR_PHY", "BR_PRV", "BR_TUN", "OvsDriver"]

log = logging.getLogger(__name__)

BR_INT = "br-int"
BR_TUN = "br-tun"
BR_PHY = "br-phy"
BR_PRV = "br-prv"
PATCH_TUN = "patch-tun"  # on br-int
PATCH_INT = "patch-int"  # on br-tun
INT_PRV = "int-prv"  # on br-int, peer prv-int
PRV_INT = "prv-int"  # on br-prv, peer int-prv
PRV_PHY = "prv-phy"  # on br-prv, peer phy-prv
PHY_PRV = "phy-prv"  # on br-phy, peer prv-phy
_PATCHES = {INT_PRV: PRV_INT, PRV_INT: INT_PRV, PRV_PHY: PHY_PRV, PHY_PRV: PRV_PHY}
_RESERVED = {BR_INT, BR_TUN, BR_PHY, BR_PRV, PATCH_TUN, PATCH_INT, *_PATCHES}
TUNNEL_PREFIX = "vx-"

EXT_PORT_ID = "vim-port-id"
EXT_IFACE_ID = "iface-id"
EXT_SERVER_ID = "vim-server-id"
EXT_NETWORK_ID = "vim-network-id"
EXT_MAC = "attached-mac"
EXT_REMOTE_HOST = "vim-remote-host"
EXT_LOCAL_IP = "vim-local-ip"

T_CLASSIFY, T_FROM_INT, T_FROM_TUN, T_UCAST, T_FLOOD = 0, 1, 2, 20, 22
LEARN_TIMEOUT = 300
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_COOKIE = re.compile(r"cookie=(0x[0-9a-f]+)")
_TABLE = re.compile(r"table=(\d+)")
_T = TypeVar("_T")


class _NoWaitTransaction(impl_idl.OvsVsctlTransaction):  # type: ignore[misc]
    """A transaction that does not wait for ovs-vswitchd to apply it (it may be down)."""

    def pre_commit(self, txn: Any) -> None:
        txn.expected_ifaces = set()

    def post_commit(self, txn: Any) -> None:
        ovs_transaction.Transaction.post_commit(self, txn)


def _api_class() -> type[Any]:
    """A fresh API class: ovsdbapp keeps the connection on the class, and each driver
    (several per process in tests) needs its own."""

    class _Api(impl_idl.OvsdbIdl):  # type: ignore[misc]
        _ovsdb_connection = None

        def create_transaction(
            self, check_error: bool = False, log_errors: bool = True, **kwargs: Any
        ) -> Any:
            return _NoWaitTransaction(
                self, self.ovsdb_connection, check_error=check_error, log_errors=log_errors
            )

    return _Api


def tunnel_port_name(remote_ip: str) -> str:
    """``vx-`` + the remote address in hex (IPv4: 11 chars; IPv6: a hash), ≤ 15 chars."""
    addr = ipaddress.ip_address(remote_ip)
    if addr.version == 4:
        return f"{TUNNEL_PREFIX}{int(addr):08x}"
    return f"{TUNNEL_PREFIX}{hashlib.sha256(addr.packed).hexdigest()[:12]}"


def _bad(field: str, description: str) -> InvalidInput:
    return InvalidInput(f"{field}: {description}", [FieldViolation(field, description)])


def _validate_binding(binding: PortBinding, device: str) -> None:
    violations = []
    if not binding.port_id:
        violations.append(FieldViolation("binding.port_id", "must not be empty"))
    if not 1 <= binding.vlan_tag <= 4094:
        violations.append(FieldViolation("binding.vlan_tag", "must be 1..4094"))
    if not _MAC.match(binding.mac_address):
        violations.append(FieldViolation("binding.mac_address", "must be xx:xx:xx:xx:xx:xx"))
    try:
        netdev.check_ifname(device)
    except ValueError as exc:
        violations.append(FieldViolation("device", str(exc)))
    if device in _RESERVED or device.startswith(TUNNEL_PREFIX):
        violations.append(FieldViolation("device", "is a name the driver reserves"))
    if violations:
        raise InvalidInput(f"bad port binding {binding.port_id!r}", violations)


def _parse_local_ip(local_ip: str, default_prefixlen: int) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.ip_interface(
            local_ip if "/" in local_ip else f"{local_ip}/{default_prefixlen}"
        )
    except ValueError as exc:
        raise _bad("local_ip", f"not an IP address: {exc}") from None
    if not isinstance(iface, ipaddress.IPv4Interface):
        raise _bad("local_ip", "only IPv4 tunnel endpoints are supported")
    return iface


def build_flows(
    patch_ofport: int, tunnel_ofports: Sequence[int], networks: Sequence[NetworkPlanEntry]
) -> list[str]:
    """The br-tun flow set (without cookies) for ``networks``; see the module docstring."""
    learn = (
        f"learn(table={T_UCAST},hard_timeout={LEARN_TIMEOUT},priority=1,"
        "NXM_OF_VLAN_TCI[0..11],NXM_OF_ETH_DST[]=NXM_OF_ETH_SRC[],"
        "load:0->NXM_OF_VLAN_TCI[],load:NXM_NX_TUN_ID[]->NXM_NX_TUN_ID[],"
        "output:OXM_OF_IN_PORT[])"
    )
    outputs = "".join(f",output:{p}" for p in sorted(tunnel_ofports))
    flows = [
        f"table={T_CLASSIFY},priority=10,in_port={patch_ofport},actions=resubmit(,{T_FROM_INT})",
        f"table={T_CLASSIFY},priority=5,in_port=LOCAL,actions=drop",
        f"table={T_CLASSIFY},priority=1,actions=resubmit(,{T_FROM_TUN})",
        f"table={T_FROM_INT},priority=0,actions=drop",
        f"table={T_FROM_TUN},priority=0,actions=drop",
        f"table={T_UCAST},priority=0,actions=resubmit(,{T_FLOOD})",
        f"table={T_FLOOD},priority=0,actions=drop",
    ]
    for net in sorted(networks, key=lambda n: n.local_vlan):
        lv, vni = net.local_vlan, net.segmentation_id
        flows += [
            f"table={T_FROM_INT},priority=10,dl_vlan={lv},actions=resubmit(,{T_UCAST})",
            f"table={T_FROM_TUN},priority=10,tun_id={vni},"
            f"actions=mod_vlan_vid:{lv},{learn},output:{patch_ofport}",
            f"table={T_FLOOD},priority=10,dl_vlan={lv},actions=strip_vlan,set_tunnel:{vni}{outputs}"
            if outputs
            else f"table={T_FLOOD},priority=10,dl_vlan={lv},actions=drop",
        ]
    return flows


def build_provider_flows(
    int_ofport: int, phy_ofport: int, networks: Sequence[NetworkPlanEntry]
) -> list[str]:
    """The br-prv flow set (without cookies) for the flat and vlan ``networks``;
    see the module docstring. ``int_ofport``/``phy_ofport``: br-prv's patches to
    br-int and br-phy."""
    flows = ["table=0,priority=0,actions=drop"]
    for net in sorted(networks, key=lambda n: n.local_vlan):
        lv = net.local_vlan
        if net.network_type == "flat":
            out, back = "strip_vlan", f"in_port={phy_ofport},vlan_tci=0x0000/0x1fff"
        else:
            vid = net.segmentation_id
            out, back = f"mod_vlan_vid:{vid}", f"in_port={phy_ofport},dl_vlan={vid}"
        flows += [
            f"table=0,priority=10,in_port={int_ofport},dl_vlan={lv},"
            f"actions={out},output:{phy_ofport}",
            f"table=0,priority=10,{back},actions=mod_vlan_vid:{lv},output:{int_ofport}",
        ]
    return flows


def flow_cookie(flows: Sequence[str]) -> int:
    """A non-zero 60-bit cookie naming exactly this flow set."""
    digest = hashlib.sha256("\n".join(flows).encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 4) or 1


def _vxlan_networks(networks: Sequence[NetworkPlanEntry]) -> list[NetworkPlanEntry]:
    chosen = [n for n in networks if n.network_type == "vxlan"]
    violations = []
    for i, n in enumerate(chosen):
        if not 1 <= n.segmentation_id < 1 << 24:
            violations.append(FieldViolation(f"networks[{i}].segmentation_id", "must be 1..2^24-1"))
        if not 1 <= n.local_vlan <= 4094:
            violations.append(FieldViolation(f"networks[{i}].local_vlan", "must be 1..4094"))
    for attr in ("segmentation_id", "local_vlan"):
        values = [getattr(n, attr) for n in chosen]
        if len(set(values)) != len(values):
            violations.append(FieldViolation(f"networks.{attr}", "must be unique per host"))
    if violations:
        raise InvalidInput("bad network plan", violations)
    return chosen


def _provider_networks(networks: Sequence[NetworkPlanEntry]) -> list[NetworkPlanEntry]:
    """The flat and vlan networks of ``networks``, checked (local VLANs are checked
    over every network: br-int is shared)."""
    violations = []
    for i, n in enumerate(networks):
        if n.network_type == "vlan" and not 1 <= n.segmentation_id <= 4094:
            violations.append(FieldViolation(f"networks[{i}].segmentation_id", "must be 1..4094"))
        if n.network_type in ("flat", "vlan") and not 1 <= n.local_vlan <= 4094:
            violations.append(FieldViolation(f"networks[{i}].local_vlan", "must be 1..4094"))
    chosen = [n for n in networks if n.network_type in ("flat", "vlan")]
    vids = [(n.physical_network, n.segmentation_id) for n in chosen if n.network_type == "vlan"]
    if len(set(vids)) != len(vids):
        violations.append(
            FieldViolation(
                "networks.segmentation_id", "VLAN ids must be unique per physical network"
            )
        )
    flats = [n.physical_network for n in chosen if n.network_type == "flat"]
    if len(set(flats)) != len(flats):
        violations.append(
            FieldViolation("networks.network_type", "at most one flat network per physical network")
        )
    lvs = [n.local_vlan for n in networks if n.network_type in ("flat", "vlan", "vxlan")]
    if len(set(lvs)) != len(lvs):
        violations.append(FieldViolation("networks.local_vlan", "must be unique per host"))
    if violations:
        raise InvalidInput("bad network plan", violations)
    return chosen


class OvsDriver:
    """One host's Open vSwitch, reached through its database socket and ``ovs-ofctl``.

    ``run_dir`` is where ovs-vswitchd keeps the bridges' ``<bridge>.mgmt``
    OpenFlow sockets. ``underlay_device`` is the host's data link given to
    br-phy (``None``: no br-phy; the tunnel endpoint address must then be
    routable by other means). ``netns`` is the namespace of the switch's
    kernel devices when the driver runs outside it (tests); the agent itself
    runs in its host's namespace and leaves it ``None``.
    """

    def __init__(
        self,
        db_socket: str | Path,
        *,
        run_dir: str | Path = "/var/run/openvswitch",
        underlay_device: str | None = None,
        physical_network: str | None = None,
        netns: str | None = None,
        underlay_mtu: int = 1600,
        underlay_prefixlen: int = 24,
        timeout: float = 10.0,
    ) -> None:
        self._db = f"unix:{db_socket}"
        self._run_dir = Path(run_dir)
        self._underlay = underlay_device
        self._physnet = physical_network
        """None: every flat and vlan network is taken as on the underlay's network."""
        self._elsewhere: set[str] = set()
        self._netns = netns
        self._mtu = underlay_mtu
        self._prefixlen = underlay_prefixlen
        self._timeout = timeout
        self._api: Any = None
        self._local_ip: str | None = None
        self._flow_lock = asyncio.Lock()

    # ------------------------------------------------------------ plumbing
    async def connect(self) -> None:
        """Open the OVSDB connection (a background IDL thread); no-op when open."""
        if self._api is None:
            self._api = await asyncio.to_thread(self._open)

    def _open(self) -> Any:
        try:
            idl = ovs_connection.OvsdbIdl.from_server(self._db, "Open_vSwitch")
            conn = ovs_connection.Connection(idl=idl, timeout=self._timeout)
            return _api_class()(conn)
        except Exception as exc:
            raise Unavailable(f"OVSDB at {self._db} unreachable: {exc}") from exc

    async def close(self) -> None:
        api, self._api = self._api, None
        if api is not None:
            await asyncio.to_thread(api.ovsdb_connection.stop, self._timeout)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._api is None:
            await self.connect()
        return await asyncio.to_thread(fn, *args)

    def _execute(self, *commands: Any) -> list[Any]:
        """Run ``commands`` in one OVSDB transaction; their results."""
        if not commands:
            return []
        try:
            with self._api.transaction(check_error=True, log_errors=False) as txn:
                for cmd in commands:
                    txn.add(cmd)
            return [cmd.result for cmd in commands]
        except InvalidInput:
            raise
        except Exception as exc:
            raise Unavailable(f"OVSDB transaction failed: {exc}") from exc

    def _rows(self, table: str, columns: Sequence[str]) -> list[dict[str, Any]]:
        try:
            rows: list[dict[str, Any]] = self._api.db_list(table, columns=list(columns)).execute(
                check_error=True
            )
        except Exception as exc:
            raise Unavailable(f"OVSDB read of {table} failed: {exc}") from exc
        return rows

    def _bridge_row(self, bridge: str) -> Any:
        """The IDL replica's row of ``bridge`` (caller holds the connection lock), or None."""
        for row in self._api.tables["Bridge"].rows.values():
            if row.name == bridge:
                return row
        return None

    def _bridge_ports(self, bridge: str) -> set[str]:
        """Names of the ports on ``bridge`` (empty when it does not exist)."""
        with self._api.ovsdb_connection.lock:
            row = self._bridge_row(bridge)
            return {p.name for p in row.ports} if row is not None else set()

    # ------------------------------------------------------------- bridges
    async def ensure_bridges(self, local_ip: str) -> None:
        """br-int, br-tun (secure) and their patch; br-phy with the underlay link and
        ``local_ip`` (``a.b.c.d`` or ``a.b.c.d/len``) on its internal port."""
        iface = _parse_local_ip(local_ip, self._prefixlen)
        await self._call(self._ensure_bridges_db, str(iface.ip))
        self._local_ip = str(iface.ip)
        if self._underlay is not None:
            try:
                await asyncio.to_thread(self._ensure_underlay_kernel, str(iface))
            except (OSError, ValueError) as exc:
                raise Unavailable(f"underlay {self._underlay}: {exc}") from exc

    def _ensure_bridges_db(self, local_ip: str) -> None:
        api = self._api
        cmds: list[Any] = [
            api.add_br(BR_INT, may_exist=True, datapath_type="netdev"),
            api.add_br(BR_TUN, may_exist=True, datapath_type="netdev"),
            api.db_set("Bridge", BR_INT, ("datapath_type", "netdev")),
            api.db_set("Bridge", BR_TUN, ("datapath_type", "netdev"), ("fail_mode", "secure")),
            api.db_set("Bridge", BR_TUN, ("external_ids", {EXT_LOCAL_IP: local_ip})),
            api.add_port(BR_INT, PATCH_TUN, may_exist=True),
            api.add_port(BR_TUN, PATCH_INT, may_exist=True),
            api.db_set("Interface", PATCH_TUN, ("type", "patch"), ("options", {"peer": PATCH_INT})),
            api.db_set("Interface", PATCH_INT, ("type", "patch"), ("options", {"peer": PATCH_TUN})),
        ]
        if self._underlay is not None:
            cmds += [
                api.add_br(BR_PHY, may_exist=True, datapath_type="netdev"),
                api.db_set("Bridge", BR_PHY, ("datapath_type", "netdev")),
                api.add_port(BR_PHY, self._underlay, may_exist=True),
                api.db_set("Interface", self._underlay, ("mtu_request", self._mtu)),
                api.db_set("Interface", BR_PHY, ("mtu_request", self._mtu)),
                api.add_br(BR_PRV, may_exist=True, datapath_type="netdev"),
                api.db_set("Bridge", BR_PRV, ("datapath_type", "netdev"), ("fail_mode", "secure")),
                api.add_port(BR_INT, INT_PRV, may_exist=True),
                api.add_port(BR_PRV, PRV_INT, may_exist=True),
                api.add_port(BR_PRV, PRV_PHY, may_exist=True),
                api.add_port(BR_PHY, PHY_PRV, may_exist=True),
            ]
            cmds += [
                api.db_set("Interface", name, ("type", "patch"), ("options", {"peer": peer}))
                for name, peer in _PATCHES.items()
            ]
        self._execute(*cmds)

    def _ensure_underlay_kernel(self, cidr: str) -> None:
        """Kernel side of br-phy: no kernel ingress on the underlay link; the endpoint
        address on br-phy's tap (created by ovs-vswitchd: waited for, bounded)."""
        assert self._underlay is not None
        ns = self._netns
        if not netdev.link_exists(self._underlay, ns):
            raise FileNotFoundError(f"no such link in {ns or 'this namespace'}")
        netdev.drop_kernel_ingress(self._underlay, netns=ns)
        deadline = time.monotonic() + self._timeout
        while not netdev.link_exists(BR_PHY, ns):
            if time.monotonic() > deadline:
                raise Unavailable(f"{BR_PHY} did not appear: is ovs-vswitchd running?")
            time.sleep(0.05)
        netdev.set_link(BR_PHY, mtu=self._mtu, netns=ns)
        netdev.add_address(BR_PHY, cidr, netns=ns)

    # --------------------------------------------------------------- ports
    async def ensure_port(self, binding: PortBinding, device: str) -> None:
        """``device`` on br-int, tagged ``binding.vlan_tag``, with our external_ids.

        A port of the same ``port_id`` under another device name (a stale tap)
        is removed first.
        """
        _validate_binding(binding, device)
        await self._call(self._ensure_port, binding, device)

    def _ensure_port(self, binding: PortBinding, device: str) -> None:
        api = self._api
        stale = [
            row["name"]
            for row in self._rows("Interface", ("name", "external_ids"))
            if row["external_ids"].get(EXT_PORT_ID) == binding.port_id and row["name"] != device
        ]
        ids = {
            EXT_IFACE_ID: binding.port_id,
            EXT_PORT_ID: binding.port_id,
            EXT_SERVER_ID: binding.server_id,
            EXT_NETWORK_ID: binding.network_id,
            EXT_MAC: binding.mac_address.lower(),
        }
        owner = self._port_bridge(device)
        cmds: list[Any] = [api.del_port(name, if_exists=True) for name in stale]
        if owner not in (None, BR_INT):
            cmds.append(api.del_port(device, bridge=owner, if_exists=True))
        cmds += [
            api.add_port(BR_INT, device, may_exist=owner == BR_INT),
            api.db_set("Port", device, ("tag", binding.vlan_tag)),
            api.db_set("Interface", device, ("external_ids", ids)),
        ]
        self._execute(*cmds)

    def _port_bridge(self, port: str) -> str | None:
        """The bridge holding port ``port`` (read from the IDL replica), or None."""
        with self._api.ovsdb_connection.lock:
            for br in self._api.tables["Bridge"].rows.values():
                if any(p.name == port for p in br.ports):
                    return str(br.name)
        return None

    async def remove_port(self, port_id: str) -> None:
        """Remove every br-int port carrying ``vim-port-id=port_id`` (none is fine)."""
        await self._call(self._remove_port, port_id)

    def _remove_port(self, port_id: str) -> None:
        names = [
            row["name"]
            for row in self._rows("Interface", ("name", "external_ids"))
            if row["external_ids"].get(EXT_PORT_ID) == port_id
        ]
        self._execute(*(self._api.del_port(name, if_exists=True) for name in names))

    async def list_ports(self) -> Sequence[PortBinding]:
        return await self._call(self._list_ports)

    def _list_ports(self) -> list[PortBinding]:
        on_int = self._bridge_ports(BR_INT)
        tags = {
            row["name"]: row["tag"]
            for row in self._rows("Port", ("name", "tag"))
            if row["name"] in on_int
        }
        found = []
        for row in self._rows("Interface", ("name", "external_ids", "ofport")):
            ids: Mapping[str, str] = row["external_ids"]
            if row["name"] not in tags or EXT_PORT_ID not in ids:
                continue
            tag = tags[row["name"]]
            ofport = row["ofport"]
            found.append(
                PortBinding(
                    port_id=ids[EXT_PORT_ID],
                    server_id=ids.get(EXT_SERVER_ID, ""),
                    network_id=ids.get(EXT_NETWORK_ID, ""),
                    mac_address=ids.get(EXT_MAC, ""),
                    vlan_tag=int(tag[0] if isinstance(tag, list) and tag else tag or 0),
                    ofport=int(ofport[0] if isinstance(ofport, list) and ofport else ofport or 0),
                )
            )
        return sorted(found, key=lambda b: b.port_id)

    async def device_of(self, port_id: str) -> str | None:
        """The br-int device name carrying ``port_id``, if any (for diagnostics)."""

        def find() -> str | None:
            for row in self._rows("Interface", ("name", "external_ids")):
                if row["external_ids"].get(EXT_PORT_ID) == port_id:
                    return str(row["name"])
            return None

        return await self._call(find)

    # ------------------------------------------------------------- tunnels
    async def ensure_tunnels(self, tunnels: Sequence[TunnelSpec]) -> None:
        """Exactly one VXLAN port per tunnel on br-tun (``key=flow``); others are removed.

        Needs the endpoint address from :meth:`ensure_bridges` (this process, or
        recorded on br-tun by an earlier one).
        """
        desired: dict[str, TunnelSpec] = {}
        for i, t in enumerate(tunnels):
            try:
                name = tunnel_port_name(t.remote_ip)
            except ValueError:
                raise _bad(
                    f"tunnels[{i}].remote_ip", f"not an IP address: {t.remote_ip!r}"
                ) from None
            if name in desired:
                raise _bad(f"tunnels[{i}].remote_ip", f"duplicate {t.remote_ip}")
            desired[name] = t
        await self._call(self._ensure_tunnels, desired)

    def _recorded_local_ip(self) -> str:
        if self._local_ip is None:
            with self._api.ovsdb_connection.lock:
                row = self._bridge_row(BR_TUN)
                self._local_ip = row.external_ids.get(EXT_LOCAL_IP) if row is not None else None
        if not self._local_ip:
            raise Unavailable("no tunnel endpoint yet: call ensure_bridges first")
        return self._local_ip

    def _ensure_tunnels(self, desired: Mapping[str, TunnelSpec]) -> None:
        api = self._api
        local_ip = self._recorded_local_ip()
        for t in desired.values():
            if t.remote_ip == local_ip:
                raise _bad("tunnels.remote_ip", f"{t.remote_ip} is this host's own endpoint")
        on_tun = self._bridge_ports(BR_TUN)
        existing = {
            row["name"]: row
            for row in self._rows("Interface", ("name", "type", "options", "external_ids"))
            if row["name"] in on_tun and row["name"].startswith(TUNNEL_PREFIX)
        }
        cmds: list[Any] = [
            api.del_port(n, bridge=BR_TUN, if_exists=True) for n in existing if n not in desired
        ]
        for name, t in desired.items():
            options = {"remote_ip": t.remote_ip, "local_ip": local_ip, "key": "flow"}
            ids = {EXT_REMOTE_HOST: t.remote_host}
            row = existing.get(name)
            if (
                row is not None
                and row["type"] == "vxlan"
                and row["options"] == options
                and all(row["external_ids"].get(k) == v for k, v in ids.items())
            ):
                continue
            cmds += [
                api.add_port(BR_TUN, name, may_exist=True),
                api.db_set("Interface", name, ("type", "vxlan"), ("options", options)),
                api.db_set("Interface", name, ("external_ids", ids)),
            ]
        self._execute(*cmds)

    # --------------------------------------------------------------- flows
    async def ensure_flows(self, networks: Sequence[NetworkPlanEntry]) -> None:
        """Install exactly the br-tun flows for ``networks`` (VXLAN ones) and the
        current tunnels, and the br-prv flows for the flat and vlan ones; a no-op
        (one dump per bridge) when they are there already.

        Provider networks without an underlay device (no br-prv) are invalid
        input, raised after the br-tun flows are installed.
        """
        chosen = _vxlan_networks(networks)
        provider = self._on_this_physnet(_provider_networks(networks))
        async with self._flow_lock:
            await self._call(self._ensure_flows, chosen)
            if self._underlay is not None:
                await self._call(self._ensure_provider_flows, provider)
        if self._underlay is None and provider:
            raise _bad("networks.network_type", "flat and vlan networks need an underlay device")

    def _on_this_physnet(self, networks: list[NetworkPlanEntry]) -> list[NetworkPlanEntry]:
        """The provider networks on the underlay's physical network (module docstring)."""
        if self._physnet is None:
            return networks
        kept = []
        for n in networks:
            if n.physical_network in ("", self._physnet):
                kept.append(n)
            elif n.network_id not in self._elsewhere:
                self._elsewhere.add(n.network_id)
                log.error(
                    "network %s is on physical network %s, not %s: not bridged to %s",
                    n.network_id,
                    n.physical_network,
                    self._physnet,
                    self._underlay,
                )
        return kept

    def _patch_ofports(self, bridge: str, names: Sequence[str]) -> list[int]:
        """The ofports of ``names`` on ``bridge``, waiting (bounded) for ovs-vswitchd."""
        deadline = time.monotonic() + self._timeout
        while True:
            on_bridge = self._bridge_ports(bridge)
            ports: dict[str, int] = {}
            for row in self._rows("Interface", ("name", "ofport")):
                if row["name"] in on_bridge:
                    of = row["ofport"]
                    ports[row["name"]] = int(of[0] if isinstance(of, list) and of else of or 0)
            found = [ports.get(n, 0) for n in names]
            if all(p > 0 for p in found):
                return found
            if time.monotonic() > deadline:
                raise Unavailable(f"{bridge} ports have no ofport: is ovs-vswitchd running?")
            time.sleep(0.05)

    def _ensure_provider_flows(self, networks: Sequence[NetworkPlanEntry]) -> None:
        int_port, phy_port = self._patch_ofports(BR_PRV, (PRV_INT, PRV_PHY))
        self._install(BR_PRV, build_provider_flows(int_port, phy_port, networks), None)

    def _ofports(self) -> tuple[int, list[int]]:
        """(patch-int's ofport, every tunnel's ofport), waiting (bounded) for
        ovs-vswitchd to assign them."""
        deadline = time.monotonic() + self._timeout
        while True:
            on_tun = self._bridge_ports(BR_TUN)
            ports: dict[str, int] = {}
            for row in self._rows("Interface", ("name", "ofport")):
                if row["name"] in on_tun:
                    of = row["ofport"]
                    ports[row["name"]] = int(of[0] if isinstance(of, list) and of else of or 0)
            tunnels = {n: p for n, p in ports.items() if n.startswith(TUNNEL_PREFIX)}
            patch = ports.get(PATCH_INT, 0)
            if patch > 0 and all(p != 0 for p in tunnels.values()):
                return patch, [p for p in tunnels.values() if p > 0]
            if time.monotonic() > deadline:
                raise Unavailable(f"{BR_TUN} ports have no ofport: is ovs-vswitchd running?")
            time.sleep(0.05)

    def _ofctl(self, *args: str, stdin: str | None = None) -> str:
        argv = ["ovs-ofctl", f"--timeout={max(1, int(self._timeout))}", *args]
        try:
            proc = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self._timeout + 5,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"ovs-ofctl {args[0]} timed out") from exc
        if proc.returncode != 0:
            raise Unavailable(f"ovs-ofctl {args[0]} failed: {proc.stderr.strip()}")
        return proc.stdout

    def mgmt_target(self, bridge: str) -> str:
        return f"unix:{self._run_dir / bridge}.mgmt"

    def _ensure_flows(self, networks: Sequence[NetworkPlanEntry]) -> None:
        patch, tunnels = self._ofports()
        self._install(BR_TUN, build_flows(patch, tunnels, networks), T_UCAST)

    def _install(self, bridge: str, flows: Sequence[str], learned_table: int | None) -> None:
        """Make ``flows`` (one cookie) exactly the table of ``bridge``, besides
        flows in ``learned_table``; one dump when they are there already."""
        cookie = flow_cookie(flows)
        target = self.mgmt_target(bridge)
        dump = self._ofctl("dump-flows", target)
        if self._flows_match(dump, cookie, len(flows), learned_table):
            return
        self._ofctl("del-flows", target)
        text = "".join(f"cookie={cookie:#x},{flow}\n" for flow in flows)
        self._ofctl("add-flows", target, "-", stdin=text)

    @staticmethod
    def _flows_match(
        dump: str, cookie: int, count: int, learned_table: int | None = T_UCAST
    ) -> bool:
        ours = 0
        for line in dump.splitlines():
            c, t = _COOKIE.search(line), _TABLE.search(line)
            if c is None or t is None:
                continue
            if int(c.group(1), 16) == cookie:
                ours += 1
            elif int(t.group(1)) != learned_table:
                return False  # a foreign or stale flow
        return ours == count


def _conforms(driver: OvsDriver) -> SwitchDriver:
    """Static check (mypy): OvsDriver implements the SwitchDriver contract."""
    return driver
