"""The namespace lab: end-to-end TCP/UDP through router -> LB -> server (DSR), clean teardown."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys

import pytest
from connpub.datapath import netlink
from connpub.errors import ConnpubError
from connpub.lab import topology as labmod
from connpub.traffic.services import payload_for, udp_query


def test_plan_names_and_limits():
    lab = labmod.plan("cp", clients=2, lbs=1, servers=3)
    assert sorted(lab.nodes) == ["client1", "client2", "fabric", "lb1", "router", "srv1", "srv2",
                                 "srv3"]
    assert lab.nodes["srv3"].netns == "cp-srv3"
    with pytest.raises(ConnpubError, match=r"^--servers 0 out of range: use 1\.\.50$"):
        labmod.plan("cp", 1, 1, 0)
    with pytest.raises(ConnpubError, match=r"^bad lab prefix 'a b'"):
        labmod.plan("a b", 1, 1, 1)


def test_payload_is_deterministic_and_per_connection():
    assert payload_for(3, 100) == payload_for(3, 100)
    assert payload_for(3, 100) != payload_for(4, 100)
    assert len(payload_for(0, 12345)) == 12345


def test_status_of_missing_lab_is_one_line_exit_2(unique_prefix):
    from click.testing import CliRunner
    from connpub.cli import main

    result = CliRunner().invoke(main, ["lab", "status", "--prefix", unique_prefix])
    assert result.exit_code == 2
    assert result.output == (f"connpub: error: no lab {unique_prefix} (no "
                             f"{labmod.state_path(unique_prefix)}): run `connpub lab up --prefix "
                             f"{unique_prefix}`\n")


def _leftovers(prefix: str, pids: list[int]) -> dict:
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and labmod._alive(pid)]
    return {"netns": netlink.list_netns(f"{prefix}-"), "pids": alive,
            "state": labmod.state_path(prefix).exists() or labmod.log_dir(prefix).exists()}


@pytest.fixture
def lab_prefix(unique_prefix):
    try:
        yield unique_prefix
    finally:
        labmod.down(unique_prefix)


def _load(lab: labmod.Lab, vip: str, connections: int, size: int) -> dict:
    result = labmod.run_in_netns(
        lab.clients[0].netns,
        [sys.executable, "-m", "connpub.traffic.services", "load", "--vip", vip, "--port",
         str(lab.tcp_port), "--connections", str(connections), "--bytes", str(size), "--json",
         "--timeout", "5"], timeout_s=30)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


@pytest.mark.root
def test_lab_up_echo_then_down_leaves_nothing(lab_prefix):
    lab = labmod.up(lab_prefix, clients=1, lbs=1, servers=2)
    assert labmod.load_lab(lab_prefix).to_json() == lab.to_json()
    assert netlink.list_netns(f"{lab_prefix}-") == sorted(n.netns for n in lab.nodes.values())
    for vip in (lab.vip4, lab.vip6):
        report = _load(lab, vip, connections=4, size=70_000)
        assert (report["ok"], report["failed"]) == (4, 0), report["results"]
        assert report["bytes_echoed"] == report["bytes_sent"] == 4 * 70_000
        # without an XDP LB program the LB routes every VIP packet to the first server
        assert report["servers"] == {"srv1": 4}

    # tunnelled packets (as the XDP LB will send them) are decapsulated by the server, whose
    # UDP reply goes straight to the client from the VIP: IPIP to srv2's fabric address.
    client = lab.clients[0].ifaces["eth0"]
    srv2 = lab.nodes["srv2"].ifaces["fab"]
    with netlink.entered(lab.clients[0].netns):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netlink.entered(lab.lbs[0].netns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
    with receiver, sender:
        receiver.bind((client.ip4, 40_000))
        receiver.settimeout(3)
        sender.sendto(_ipv4_udp(client.ip4, 40_000, lab.vip4, lab.udp_port, b"tunnelled"),
                      (srv2.ip4, 0))
        data, source = receiver.recvfrom(2048)
    assert (data, source) == (b"srv2\ntunnelled", (lab.vip4, lab.udp_port))

    # impairment: 100 % egress loss on the router's client port drops every reply
    applied = labmod.impair(lab_prefix, "router", "c1", loss_pct=100)
    assert applied["method"] in ("netem", "bpf-loss")
    assert labmod.load_lab(lab_prefix).impairments == {"router/c1": applied}
    with netlink.entered(lab.clients[0].netns):
        with pytest.raises(TimeoutError):
            udp_query(lab.vip4, lab.udp_port, b"lost", timeout_s=0.3)
        labmod.impair(lab_prefix, "router", "c1")  # clears
        assert udp_query(lab.vip6, lab.udp_port, b"back") == ("srv1", b"back")
    assert labmod.load_lab(lab_prefix).impairments == {}

    pids = list(lab.pids.values())
    assert len(pids) == 2
    removed = labmod.down(lab_prefix)
    assert sorted(removed["pids"]) == sorted(pids)
    assert _leftovers(lab_prefix, pids) == {"netns": [], "pids": [], "state": False}


def _ipv4_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4+UDP packet (UDP checksum 0 = none, allowed over IPv4)."""
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    header = bytearray(b"\x45\0" + (20 + len(udp)).to_bytes(2, "big") + b"\0\0\0\0\x40\x11\0\0"
                       + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed)
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, 20, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(header) + udp


@pytest.mark.root
def test_lab_up_down_twice_is_clean(lab_prefix):
    for _ in range(2):
        lab = labmod.up(lab_prefix, clients=1, lbs=1, servers=1)
        with pytest.raises(ConnpubError, match=f"^lab {lab_prefix} already exists"):
            labmod.up(lab_prefix, clients=1, lbs=1, servers=1)
        pids = list(lab.pids.values())
        labmod.down(lab_prefix)
        assert _leftovers(lab_prefix, pids) == {"netns": [], "pids": [], "state": False}


@pytest.mark.root
def test_crash_half_way_then_down_cleans_up(lab_prefix, monkeypatch):
    def crash(lab):
        raise RuntimeError("simulated crash")

    # a crash after the services started, with no rollback (as if the process was killed)
    steps = labmod.STEPS
    monkeypatch.setattr(labmod, "STEPS", (*steps, crash))
    with pytest.raises(RuntimeError, match="simulated crash"):
        labmod.up(lab_prefix, clients=1, lbs=1, servers=2, rollback=False)
    assert not labmod.state_path(lab_prefix).exists()
    assert len(netlink.list_netns(f"{lab_prefix}-")) == 6
    orphans = labmod.pids_in_netns(netlink.list_netns(f"{lab_prefix}-"))
    assert len(orphans) == 2  # the two echo servers, found by their netns alone
    removed = labmod.down(lab_prefix)
    assert sorted(removed["pids"]) == sorted(orphans)
    assert _leftovers(lab_prefix, orphans) == {"netns": [], "pids": [], "state": False}

    # the same failure with rollback (the default): up removes what it built itself
    monkeypatch.setattr(labmod, "STEPS", (steps[0], steps[1], crash))
    with pytest.raises(RuntimeError, match="simulated crash"):
        labmod.up(lab_prefix, clients=1, lbs=1, servers=2)
    assert _leftovers(lab_prefix, []) == {"netns": [], "pids": [], "state": False}


ENCAP_XDP = r"""
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
/* Minimal IPIP "LB": every IPv4 packet to the VIP goes to one backend. */
int test_lb(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP)) return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->daddr != htonl(VIP)) return XDP_PASS;
    __u16 inner_len = ntohs(ip->tot_len);
    if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr))) return XDP_DROP;
    data = (void *)(long)ctx->data; end = (void *)(long)ctx->data_end;
    eth = data;
    struct iphdr *outer = data + sizeof(struct ethhdr);
    if ((void *)(outer + 1) > end) return XDP_DROP;
    unsigned char dmac[6] = {DMAC}, smac[6] = {SMAC};
    __builtin_memcpy(eth->h_dest, dmac, 6);
    __builtin_memcpy(eth->h_source, smac, 6);
    eth->h_proto = htons(ETH_P_IP);
    outer->version = 4; outer->ihl = 5; outer->tos = 0; outer->id = 0; outer->frag_off = 0;
    outer->tot_len = htons(inner_len + sizeof(struct iphdr));
    outer->ttl = 64; outer->protocol = IPPROTO_IPIP; outer->check = 0;
    outer->saddr = htonl(SRC); outer->daddr = htonl(DST);
    __u32 csum = 0;
    __u16 *word = (__u16 *)outer;
#pragma unroll
    for (int i = 0; i < 10; i++) csum += word[i];
    csum = (csum & 0xffff) + (csum >> 16);
    csum = (csum & 0xffff) + (csum >> 16);
    outer->check = ~csum;
    return ACTION;
}
"""


def _mac_c(mac: str) -> str:
    return ",".join(f"0x{part}" for part in mac.split(":"))


@pytest.mark.root
@pytest.mark.parametrize("action", ["redirect", "tx"])
def test_xdp_lb_on_lab_reaches_second_server(lab_prefix, action):
    """The lab carries what an XDP LB sends: IPIP out of `fab` (REDIRECT) or back (TX)."""
    from bcc import BPF

    lab = labmod.up(lab_prefix, clients=1, lbs=1, servers=2)
    ingress, fabric = lab.lb_ingress("lb1"), lab.lb_fabric("lb1")
    backend = lab.backends()[1]
    if action == "redirect":
        src, dst, smac, dmac = fabric.ip4, backend["ipv4"], fabric.mac, backend["mac"]
        verdict = f"bpf_redirect({fabric.ifindex}, 0)"
    else:
        src, dst = ingress.ip4, backend["routed_ipv4"]
        smac, dmac, verdict = ingress.mac, lab.lb_gateway_mac("lb1"), "XDP_TX"
    flags = [f"-D{name}=0x{int(ipaddress.ip_address(addr)):08x}"
             for name, addr in (("VIP", lab.vip4), ("SRC", src), ("DST", dst))]
    flags += [f"-DSMAC={_mac_c(smac)}", f"-DDMAC={_mac_c(dmac)}", f"-DACTION={verdict}"]
    bpf = BPF(text=ENCAP_XDP, cflags=flags)
    try:
        fd = bpf.load_func("test_lb", BPF.XDP).fd
        assert netlink.attach_xdp(ingress.name, ingress.netns, fd, "native") == "native"
        report = _load(lab, lab.vip4, connections=5, size=100_000)
        assert (report["ok"], report["servers"]) == (5, {"srv2": 5}), report["results"]
        assert report["bytes_echoed"] == 5 * 100_000
    finally:
        bpf.cleanup()
