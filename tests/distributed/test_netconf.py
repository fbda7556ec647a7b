"""Socket interface from the route to the head, RDMA settings from a fake /sys/class/infiniband."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from shardserve.distributed import netconf
from shardserve.distributed.netconf import interface_for, network_env, rdma_settings, scan_rdma

# A ConnectX port as mlx5 lays it out with IPv4 and IPv6: per address one RoCE v1 and one v2 GID.
LINK_LOCAL = "fe80:0000:0000:0000:0a9e:01ff:fe02:0304"
IPV4_MAPPED = "0000:0000:0000:0000:0000:ffff:0a00:0002"  # ::ffff:10.0.0.2
UNUSED = "0000:0000:0000:0000:0000:0000:0000:0000"


def make_port(
    root: Path, dev: str, port: int, gids: list[tuple[str, str | None]], state="4: ACTIVE", link_layer="Ethernet"
) -> None:
    port_dir = root / dev / "ports" / str(port)
    (port_dir / "gids").mkdir(parents=True)
    (port_dir / "gid_attrs" / "types").mkdir(parents=True)
    if state is not None:
        (port_dir / "state").write_text(state + "\n")
    (port_dir / "link_layer").write_text(link_layer + "\n")
    for i, (gid, gid_type) in enumerate(gids):
        (port_dir / "gids" / str(i)).write_text(gid + "\n")
        if gid_type is not None:  # the kernel returns EINVAL for unused GIDs: no file here
            (port_dir / "gid_attrs" / "types" / str(i)).write_text(gid_type + "\n")


ROCE_GIDS = [
    (LINK_LOCAL, "IB/RoCE v1"),
    (LINK_LOCAL, "RoCE v2"),
    (IPV4_MAPPED, "IB/RoCE v1"),
    (IPV4_MAPPED, "RoCE v2"),
    (UNUSED, None),
]


def test_rdma_picks_ipv4_mapped_roce_v2_gid(tmp_path):
    make_port(tmp_path, "mlx5_bond_0", 1, ROCE_GIDS)
    assert rdma_settings(tmp_path) == {"NCCL_IB_HCA": "mlx5_bond_0", "NCCL_IB_GID_INDEX": "3"}


def test_rdma_order_of_gids_does_not_matter(tmp_path):
    # IPv4-mapped v2 GID listed first, before a link-local v2 one: still the IPv4-mapped index.
    make_port(tmp_path, "mlx5_0", 1, [(IPV4_MAPPED, "IB/RoCE v1"), (LINK_LOCAL, "RoCE v2"), (IPV4_MAPPED, "RoCE v2")])
    assert rdma_settings(tmp_path)["NCCL_IB_GID_INDEX"] == "2"


def test_rdma_skips_inactive_ports_and_exact_matches_prefix_names(tmp_path):
    make_port(tmp_path, "mlx5_1", 1, ROCE_GIDS)
    make_port(tmp_path, "mlx5_10", 1, ROCE_GIDS, state="1: DOWN")
    make_port(tmp_path, "mlx5_2", 1, ROCE_GIDS)
    settings = rdma_settings(tmp_path)
    # NCCL_IB_HCA is a prefix list: "mlx5_1" alone would also select the DOWN mlx5_10.
    assert settings["NCCL_IB_HCA"] == "=mlx5_1,mlx5_2"
    assert [p.device for p in scan_rdma(tmp_path)] == ["mlx5_1", "mlx5_2"]


def test_rdma_roce_without_ipv4_gid_is_not_used(tmp_path):
    make_port(tmp_path, "mlx5_0", 1, [(LINK_LOCAL, "IB/RoCE v1"), (LINK_LOCAL, "RoCE v2"), (IPV4_MAPPED, "IB/RoCE v1")])
    assert rdma_settings(tmp_path) == {}


def test_rdma_infiniband_needs_no_gid_index(tmp_path):
    make_port(
        tmp_path, "mlx5_0", 1, [("fe80:0000:0000:0000:0002:c903:0001:0001", "IB/RoCE v1")], link_layer="InfiniBand"
    )
    assert rdma_settings(tmp_path) == {"NCCL_IB_HCA": "mlx5_0"}


def test_rdma_none(tmp_path):
    assert rdma_settings(tmp_path / "missing") == {}
    (tmp_path / "empty").mkdir()
    assert rdma_settings(tmp_path / "empty") == {}


def test_interface_for_loopback():
    assert interface_for("127.0.0.1") == ("lo", "127.0.0.1")
    assert interface_for("localhost")[0] == "lo"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _global_ipv4() -> tuple[str, str] | None:
    """(ifname, address) of this host's first global IPv4 address, as `ip -4 -o addr` lists it."""
    for line in _ip("-4", "-o", "addr", "show", "scope", "global").splitlines():
        words = line.split()
        return words[1], words[3].split("/")[0]
    return None


needs_ip = pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 not installed")


@needs_ip
def test_own_address_maps_to_its_interface_not_lo():
    # On the head, MASTER_ADDR is its own address: the kernel routes it via lo, but the other nodes
    # reach the head through the interface that holds it.
    found = _global_ipv4()
    if found is None:
        pytest.skip("no global IPv4 address on this host")
    ifname, addr = found
    assert interface_for(addr) == (ifname, addr)


@needs_ip
def test_fallback_without_iproute2_agrees_with_ip(monkeypatch):
    found = _global_ipv4()
    targets = ["127.0.0.1"] + ([found[1]] if found else [])
    expected = {t: interface_for(t) for t in targets}
    monkeypatch.setattr(netconf, "_run_ip", lambda *args: None)  # as if `ip` were missing
    for target in targets:
        assert interface_for(target) == expected[target]


def test_unresolvable_host_raises_oserror():
    with pytest.raises(OSError, match="cannot resolve"):
        interface_for("no-such-host.invalid")


def test_network_env_loopback_master(tmp_path):
    to_set, notes = network_env("127.0.0.1", {}, sysfs_root=tmp_path)
    assert to_set["GLOO_SOCKET_IFNAME"] == "lo"
    assert to_set["NCCL_SOCKET_IFNAME"].lstrip("=") == "lo"
    assert not any(k.startswith("NCCL_IB") for k in to_set)
    assert any("RDMA" in n for n in notes)


def test_network_env_keeps_user_values(tmp_path):
    make_port(tmp_path, "mlx5_0", 1, ROCE_GIDS)
    user = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_GID_INDEX": "5"}
    to_set, notes = network_env("localhost", user, sysfs_root=tmp_path)
    assert "NCCL_SOCKET_IFNAME" not in to_set and "NCCL_IB_GID_INDEX" not in to_set
    assert to_set["GLOO_SOCKET_IFNAME"] == "lo" and to_set["NCCL_IB_HCA"] == "mlx5_0"
    assert any("NCCL_SOCKET_IFNAME=ib0 kept" in n for n in notes)
    assert any("NCCL_IB_GID_INDEX=5 kept" in n and "found 3" in n for n in notes)


def test_network_env_ib_disabled_skips_rdma(tmp_path):
    make_port(tmp_path, "mlx5_0", 1, ROCE_GIDS)
    to_set, notes = network_env("127.0.0.1", {"NCCL_IB_DISABLE": "1"}, sysfs_root=tmp_path)
    assert "NCCL_IB_HCA" not in to_set and any("NCCL_IB_DISABLE" in n for n in notes)


def test_network_env_unreachable_master_is_a_note_not_an_error(tmp_path):
    to_set, notes = network_env("no-such-host.invalid", {}, sysfs_root=tmp_path)
    assert "NCCL_SOCKET_IFNAME" not in to_set
    assert any("not set" in n for n in notes)
