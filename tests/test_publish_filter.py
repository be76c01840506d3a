"""Hostile publishing from a non-server source (issue 15 item 7), with the real LB agent
process on a real LB attachment: the agent binds its fabric address (the program's tunnel
source) instead of every address, datagrams from senders that are no backend are dropped before
any HMAC is computed and counted (`source_filtered_total`), and the kernel's drops on the full
socket (SO_RXQ_OVFL) are counted (`socket_drops_total`): every flooded datagram is one or the
other."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from agent_lab_helpers import wait_for
from connpub.agents.common import status_path
from connpub.datapath import lbctl, netlink
from connpub.datapath.abi import DIRECTIVE_ENTRY_DTYPE, PUBLISH_ENTRY_DTYPE
from connpub.datapath.clock import datapath_clock
from connpub.lab.run import toml_text
from connpub.protocol.wire import Encoder
from test_operator_cli import LB_ADDR, PEER_ADDR, attach_lb, connpub, veth  # noqa: F401

pytestmark = pytest.mark.root

HOSTILE = "10.91.0.3"
PORT = 7392
FLOOD = 50_000


def forged_publish() -> bytes:
    entry = np.zeros(1, PUBLISH_ENTRY_DTYPE)
    entry["backend_id"] = 1
    entry["flow_count"] = 1
    entry["key"]["client_addr"] = lbctl.address_bytes("10.100.1.2")[0]
    entry["key"]["vip_addr"] = lbctl.address_bytes("10.200.0.1")[0]
    entry["key"]["client_port"] = 1234
    entry["key"]["vip_port"] = 80
    entry["key"]["proto"] = 6
    (packet,) = Encoder(1, bytes(32), 1400).publish(entry, datapath_clock().now_ns())
    return packet  # a well-formed PUBLISH signed with the wrong key: only the HMAC rejects it


def totals(path) -> dict:
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {**status.get("totals", {}), "decoder": status.get("decoder", {})}


def start_agent(role: str, pair, tmp_path, agent: dict, **sections) -> subprocess.Popen:
    """`connpub agent ROLE` on the veth pair's attachment with a fresh key; waits for its status."""
    key_file = tmp_path / "key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    config = tmp_path / f"{role}.toml"
    config.write_text(toml_text({"publish": {"interval_s": 0.2}, "lease": {"min_s": 0.1},
                                 "security": {"key_file": str(key_file)}, **sections,
                                 "agent": {"listen_port": PORT, "metrics_port": 0, **agent}}))
    proc = subprocess.Popen([sys.executable, "-m", "connpub.cli", "agent", role, "--config",
                             str(config), *pair["where"]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    status_file = status_path(role, pair["iface"], pair["netns"])
    try:
        wait_for(lambda: totals(status_file) or proc.poll() is not None, "the status file", 60)
        assert proc.poll() is None, proc.stderr.read()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
        raise
    return proc


def cleanup(agent: subprocess.Popen, senders: dict[str, socket.socket]) -> None:
    for sock in senders.values():
        sock.close()
    if agent.poll() is None:
        agent.terminate()
        agent.wait(timeout=20)


def sockets_of(netns: str, addresses) -> dict[str, socket.socket]:
    """A UDP socket bound to each address, in netns."""
    senders = {}
    with netlink.entered(netns):
        for address in addresses:
            senders[address] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            senders[address].bind((address, 0))
    return senders


def test_non_server_flood_costs_no_hmac_and_every_datagram_is_counted(
        veth, tmp_path):  # noqa: F811
    attach_lb(veth)
    where = veth["where"]
    connpub("lb", "backend", "add", "1", PEER_ADDR, *where)  # the one server
    connpub("lb", "vip", "add", "10.200.0.1", "80", "tcp", *where)
    netlink.add_address(veth["peer"], veth["netns"], f"{HOSTILE}/24")
    agent = start_agent("lb", veth, tmp_path, {})
    status_file = status_path("lb", veth["iface"], veth["netns"])
    senders = {}
    try:
        with netlink.entered(veth["netns"]):
            # bound to the fabric address, not the wildcard: 127.0.0.1:PORT is still free
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind(("127.0.0.1", PORT))
            except OSError as err:
                assert err.errno != errno.EADDRINUSE, "the agent listens on every address"
                raise
            finally:
                probe.close()
        senders = sockets_of(veth["netns"], (PEER_ADDR, HOSTILE))
        packet = forged_publish()
        for _ in range(10):  # from the server: verified (and rejected by the HMAC)
            senders[PEER_ADDR].sendto(packet, (LB_ADDR, PORT))
        wait_for(lambda: totals(status_file).get("tag_checks") == 10, "10 HMAC checks", 30)
        assert totals(status_file)["decoder"]["bad_tag"] == 10
        os.kill(agent.pid, signal.SIGSTOP)  # the flood fills the socket: the kernel drops
        # (1400-byte datagrams: 50k of them outgrow even the agent's forced 32 MiB buffer)
        flood = packet + bytes(1400 - len(packet))
        try:
            for _ in range(FLOOD):
                senders[HOSTILE].sendto(flood, (LB_ADDR, PORT))
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        wait_for(lambda: totals(status_file).get("source_filtered", 0) > 0, "filtered", 30)
        senders[HOSTILE].sendto(packet, (LB_ADDR, PORT))  # carries the final drop count

        def accounted():
            now = totals(status_file)
            seen = now.get("source_filtered", 0) + now.get("socket_drops", 0)
            return now if seen == FLOOD + 1 else None

        final = wait_for(accounted, "every flooded datagram filtered or dropped", 30)
        assert final["socket_drops"] > 0
        assert final["tag_checks"] == 10  # not one HMAC for the flood
        assert sum(final["decoder"].values()) == 10
        agent.terminate()
        _, errors = agent.communicate(timeout=20)
        assert f"listening on UDP {LB_ADDR}:{PORT}" in errors
        assert agent.returncode == 0 and not status_file.exists()
    finally:
        cleanup(agent, senders)


def forged_directive() -> bytes:
    entry = np.zeros(1, DIRECTIVE_ENTRY_DTYPE)
    entry["class_key"]["vip_addr"] = lbctl.address_bytes("10.200.0.1")[0]
    entry["class_key"]["vip_port"] = 80
    entry["class_key"]["proto"] = 6
    entry["level"] = 2
    (packet,) = Encoder(1, bytes(32), 1400).directive(entry, datapath_clock().now_ns())
    return packet  # well formed, signed with the wrong key


def test_server_agent_verifies_only_datagrams_from_its_lb_nodes(veth, tmp_path):  # noqa: F811
    """The server agent (DIRECTIVE, RESYNC-REQUEST from the LB nodes) filters its senders the
    way the LB agent does: `[agent] lb_addresses` (here the peer) are verified, every other
    sender is dropped before the HMAC and counted in `source_filtered`."""
    where = veth["where"]
    connpub("attach", "--role", "server", *where)
    netlink.add_address(veth["peer"], veth["netns"], f"{HOSTILE}/24")
    agent = start_agent("server", veth, tmp_path,
                        {"listen_address": LB_ADDR, "lb_addresses": [PEER_ADDR],
                         "history_path": str(tmp_path / "history")},
                        liveness={"tcp": "packets"})
    status_file = status_path("server", veth["iface"], veth["netns"])
    senders = {}
    try:
        senders = sockets_of(veth["netns"], (PEER_ADDR, HOSTILE))
        packet = forged_directive()
        for _ in range(10):  # from the LB node: verified (and rejected by the HMAC)
            senders[PEER_ADDR].sendto(packet, (LB_ADDR, PORT))
        wait_for(lambda: totals(status_file).get("tag_checks") == 10, "10 HMAC checks", 30)
        for _ in range(1000):
            senders[HOSTILE].sendto(packet, (LB_ADDR, PORT))

        def accounted():
            now = totals(status_file)
            seen = now.get("source_filtered", 0) + now.get("socket_drops", 0)
            return now if seen == 1000 else None

        final = wait_for(accounted, "every hostile datagram filtered or dropped", 30)
        assert final["tag_checks"] == 10  # not one HMAC for the other sender
        assert final["decoder"]["bad_tag"] == 10
        assert sum(final["decoder"].values()) == 10
        agent.terminate()
        agent.communicate(timeout=20)
        assert agent.returncode == 0
    finally:
        cleanup(agent, senders)
