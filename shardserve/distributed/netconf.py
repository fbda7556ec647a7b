"""Network settings for NCCL and gloo, found from the route to the head node and from sysfs.

Multi-node guides have users type ``NCCL_SOCKET_IFNAME``, ``GLOO_SOCKET_IFNAME``,
``NCCL_IB_HCA`` and ``NCCL_IB_GID_INDEX`` by hand (the RCP/RunAI guide greps
``/sys/class/infiniband`` for the IPv4-mapped RoCE v2 GID). Here they are derived:

* the socket interface is the one the kernel routes the head's address through
  (``ip -o route get``; without iproute2 a UDP ``connect()`` gives the source address, which is
  matched against the interface list);
* the RDMA devices are the ACTIVE ports under ``/sys/class/infiniband``; on RoCE the GID index is
  the RoCE v2 GID holding an IPv4-mapped address (``::ffff:a.b.c.d``).

Values the user already set are kept. No third-party dependencies.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SYSFS_INFINIBAND = Path("/sys/class/infiniband")
_SIOCGIFADDR = 0x8915
_IPV4_MAPPED_PREFIX = "0000:0000:0000:0000:0000:ffff:"
_SOCKET_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


# --------------------------------------------------------------------------- route to the head


def interface_for(addr: str) -> tuple[str, str]:
    """Interface and local source address the kernel uses to reach ``addr``.

    Args:
        addr: IPv4/IPv6 address or host name of the peer (the head node).

    Returns:
        ``(ifname, source_address)``, e.g. ``("eth0", "10.0.0.2")``. For a loopback peer
        ``("lo", "127.0.0.1")``. When ``addr`` is one of this host's own addresses (the head node
        looking up itself) the interface holding that address is returned, not ``lo``: the other
        nodes reach the head through it.

    Raises:
        OSError: the name does not resolve, or no route/interface is found.
    """
    ip = resolve(addr)
    route = _route_via_iproute2(ip)
    if route is None:
        src = _source_via_udp(ip)
        return _owner_of(src), src
    ifname, src, is_local = route
    if is_local and not ipaddress.ip_address(ip).is_loopback:
        return _owner_of(ip), ip
    return ifname, src


def resolve(addr: str) -> str:
    """IP address of ``addr`` (IPv4 preferred), e.g. ``"localhost"`` -> ``"127.0.0.1"``.

    Raises:
        OSError: the name does not resolve.
    """
    try:
        return str(ipaddress.ip_address(addr.strip("[]")))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve head address {addr!r}: {exc}") from exc
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0]


def _run_ip(*args: str) -> str | None:
    """Output of ``ip <args>``, or None when iproute2 is missing or fails."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _route_via_iproute2(ip: str) -> tuple[str, str, bool] | None:
    # "10.0.0.1 via 10.0.0.254 dev eth0 src 10.0.0.2 uid 0" / "local 10.0.0.2 dev lo src 10.0.0.2"
    out = _run_ip("-o", "route", "get", ip)
    if not out:
        return None
    words = out.split()
    fields = dict(zip(words, words[1:]))
    if "dev" not in fields:
        return None
    return fields["dev"], fields.get("src", ""), words[0] == "local"


def _source_via_udp(ip: str) -> str:
    # connect() on a UDP socket sends nothing; it only makes the kernel pick a route and source.
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((ip, 9))
        except OSError as exc:
            raise OSError(f"no route to {ip}: {exc}") from exc
        return sock.getsockname()[0]


def _owner_of(ip: str) -> str:
    """Name of the interface that holds the local address ``ip``.

    Raises:
        OSError: no interface holds it.
    """
    for ifname, addrs in interface_addresses().items():
        if ip in addrs:
            return ifname
    raise OSError(f"no local interface holds address {ip}")


def interface_addresses() -> dict[str, list[str]]:
    """Local addresses per interface, e.g. ``{"lo": ["127.0.0.1", "::1"], "eth0": [...]}``.

    From ``ip -o addr show`` (all addresses); without iproute2, the primary IPv4 address of each
    interface (ioctl ``SIOCGIFADDR``) plus ``/proc/net/if_inet6``.
    """
    out = _run_ip("-o", "addr", "show")
    if out:
        return _parse_ip_addr(out)
    table: dict[str, list[str]] = {}
    for _, ifname in socket.if_nameindex():
        ipv4 = _ipv4_of(ifname)
        table[ifname] = [ipv4] if ipv4 else []
    for ifname, ipv6 in _proc_inet6():
        table.setdefault(ifname, []).append(ipv6)
    return table


def _parse_ip_addr(out: str) -> dict[str, list[str]]:
    # "2: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\    valid_lft ..."
    table: dict[str, list[str]] = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4 and words[2] in ("inet", "inet6"):
            ifname = words[1].split("@")[0]
            table.setdefault(ifname, []).append(words[3].split("/")[0])
    return table


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            req = struct.pack("256s", ifname.encode()[:15])
            res = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, req)
        except OSError:
            return None  # interface without an IPv4 address
    return socket.inet_ntoa(res[20:24])


def _proc_inet6() -> list[tuple[str, str]]:
    # /proc/net/if_inet6: "fe800000000000000000000000000001 02 40 20 80 eth0"
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return []
    pairs = []
    for line in lines:
        words = line.split()
        if len(words) == 6:
            pairs.append((words[5], str(ipaddress.IPv6Address(bytes.fromhex(words[0])))))
    return pairs


# --------------------------------------------------------------------------- RDMA


@dataclass
class RdmaPort:
    """One RDMA port found in sysfs."""

    device: str
    """Device name, e.g. ``mlx5_0``."""
    port: int
    """Port number (from 1)."""
    link_layer: str
    """``InfiniBand`` or ``Ethernet`` (RoCE); empty when sysfs does not say."""
    gid_index: int | None
    """RoCE v2 GID index with an IPv4-mapped address; None on InfiniBand or when there is none."""
    gid: str = ""
    """The chosen GID, e.g. ``0000:0000:0000:0000:0000:ffff:0a00:0002``."""


def scan_rdma(sysfs_root: Path = SYSFS_INFINIBAND) -> list[RdmaPort]:
    """Usable RDMA ports: every port whose ``state`` is ACTIVE (or that has no state file).

    RoCE ports (link layer Ethernet) without a RoCE v2 GID holding an IPv4-mapped address are
    left out: NCCL would pick a default GID that may be link-local IPv6 or RoCE v1.
    """
    if not sysfs_root.is_dir():
        return []
    ports = []
    for dev in sorted(sysfs_root.iterdir()):
        for port_dir in sorted((dev / "ports").glob("*"), key=lambda p: _int_name(p.name)):
            found = _scan_port(dev.name, port_dir)
            if found is not None:
                ports.append(found)
    return ports


def _scan_port(device: str, port_dir: Path) -> RdmaPort | None:
    state = _read(port_dir / "state")
    if state is not None and "ACTIVE" not in state:
        return None
    link_layer = _read(port_dir / "link_layer") or ""
    index, gid = _roce_v2_ipv4_gid(port_dir)
    if link_layer == "InfiniBand":
        return RdmaPort(device, _int_name(port_dir.name), link_layer, None)
    if index is None:
        logger.info("RDMA %s port %s: no RoCE v2 GID with an IPv4 address, skipped", device, port_dir.name)
        return None
    return RdmaPort(device, _int_name(port_dir.name), link_layer, index, gid)


def _roce_v2_ipv4_gid(port_dir: Path) -> tuple[int | None, str]:
    # The same test as the RCP guide's one-liner: GID starts with ::ffff: and its type is RoCE v2.
    gids = sorted((port_dir / "gids").glob("*"), key=lambda p: _int_name(p.name))
    for gid_file in gids:
        gid = _read(gid_file)
        if not gid or not gid.startswith(_IPV4_MAPPED_PREFIX):
            continue
        gid_type = _read(port_dir / "gid_attrs" / "types" / gid_file.name)
        if gid_type is not None and "v2" in gid_type.lower():
            return _int_name(gid_file.name), gid
    return None, ""


def rdma_settings(sysfs_root: Path = SYSFS_INFINIBAND) -> dict[str, str]:
    """``NCCL_IB_HCA`` and ``NCCL_IB_GID_INDEX`` for this host's RDMA devices.

    Returns:
        e.g. ``{"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_IB_GID_INDEX": "3"}``; ``{}`` without RDMA
        devices. ``NCCL_IB_GID_INDEX`` is only set for RoCE. NCCL takes one GID index for all
        devices: if devices disagree, the index of most devices wins and only those devices are
        listed. ``NCCL_IB_HCA`` is a prefix list in NCCL; it gets a leading ``=`` (exact match)
        when a listed name is a prefix of an unlisted device (``mlx5_1`` vs ``mlx5_10``).
    """
    ports = scan_rdma(sysfs_root)
    if not ports:
        return {}
    settings: dict[str, str] = {}
    roce = [p for p in ports if p.gid_index is not None]
    if roce:
        indices = [p.gid_index for p in roce]
        index = max(sorted(set(indices)), key=indices.count)
        settings["NCCL_IB_GID_INDEX"] = str(index)
        ports = [p for p in ports if p.gid_index in (None, index)]
    devices = list(dict.fromkeys(p.device for p in ports))
    others = [d.name for d in sysfs_root.iterdir() if d.name not in devices]
    exact = any(o.startswith(d) for d in devices for o in others)
    settings["NCCL_IB_HCA"] = ("=" if exact else "") + ",".join(devices)
    return settings


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None  # missing file, or EINVAL for an unused GID's type


def _int_name(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 30


# --------------------------------------------------------------------------- together


def network_env(
    master_addr: str, env: Mapping[str, str], sysfs_root: Path = SYSFS_INFINIBAND
) -> tuple[dict[str, str], list[str]]:
    """Environment variables for NCCL/gloo on this node, and a log line per decision.

    Sets ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` (``=`` prefix: exact match) to the
    interface of the route to ``master_addr`` (``lo`` for a loopback master), and the RDMA
    variables from :func:`rdma_settings`. A variable already in ``env`` is not returned; the note
    says it was kept. ``NCCL_IB_DISABLE=1`` in ``env`` skips the RDMA scan.

    Returns:
        ``(variables_to_set, notes)``. Failures to find a route are reported in the notes, not
        raised: NCCL and gloo then choose an interface themselves.
    """
    to_set: dict[str, str] = {}
    notes: list[str] = []
    _socket_vars(master_addr, env, to_set, notes)
    _rdma_vars(env, sysfs_root, to_set, notes)
    return to_set, notes


def _socket_vars(master_addr: str, env: Mapping[str, str], to_set: dict[str, str], notes: list[str]) -> None:
    kept = [name for name in _SOCKET_VARS if name in env]
    for name in kept:
        notes.append(f"{name}={env[name]} kept as set by the user")
    if len(kept) == len(_SOCKET_VARS):
        return
    try:
        ifname, src = interface_for(master_addr)
    except OSError as exc:
        notes.append(f"socket interface not set: {exc}; NCCL and gloo will choose one")
        return
    notes.append(f"route to master {master_addr} leaves through {ifname} (local address {src})")
    values = {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": "=" + ifname}
    for name in _SOCKET_VARS:
        if name not in env:
            to_set[name] = values[name]
            notes.append(f"{name}={values[name]}")


def _rdma_vars(env: Mapping[str, str], sysfs_root: Path, to_set: dict[str, str], notes: list[str]) -> None:
    if env.get("NCCL_IB_DISABLE", "0") not in ("", "0"):
        notes.append(f"NCCL_IB_DISABLE={env['NCCL_IB_DISABLE']}: RDMA not configured")
        return
    ports = scan_rdma(sysfs_root)
    if not ports:
        notes.append(f"no usable RDMA device under {sysfs_root}: NCCL uses sockets between nodes")
        return
    for p in ports:
        gid = f", RoCE v2 GID {p.gid_index} = {p.gid}" if p.gid_index is not None else ""
        notes.append(f"RDMA {p.device} port {p.port} ({p.link_layer or 'link layer unknown'}{gid})")
    for name, value in rdma_settings(sysfs_root).items():
        if name in env:
            notes.append(f"{name}={env[name]} kept as set by the user (found {value})")
        else:
            to_set[name] = value
            notes.append(f"{name}={value}")
