"""The server program on a real veth in a namespace: real kernel TCP, counters checked against an
independent AF_PACKET capture; the CLI's attach/detach/status/maps and its one-line errors."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from connpub import paths
from connpub.datapath import netlink
from datapath_fixtures import mapped

pytestmark = pytest.mark.root

PAYLOAD_SIZE = 100_000
CLIENT_IP, SERVER_IP, PORT = "10.77.0.1", "10.77.0.2", 8080


def connpub(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "connpub.cli", *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def pair(unique_prefix):
    client_ns, server_ns = f"{unique_prefix}c", f"{unique_prefix}s"
    client_if, server_if = f"{unique_prefix}cv", f"{unique_prefix}sv"
    try:
        netlink.create_netns(client_ns)
        netlink.create_netns(server_ns)
        netlink.create_veth(client_if, client_ns, server_if, server_ns)
        netlink.add_address(client_if, client_ns, f"{CLIENT_IP}/24")
        netlink.add_address(server_if, server_ns, f"{SERVER_IP}/24")
        # the capture must see the frames XDP saw, not GRO's merged ones
        subprocess.run(
            ["ip", "netns", "exec", server_ns, "ethtool", "-K", server_if, "gro", "off"],
            check=True,
            capture_output=True,
        )
        yield {"client_ns": client_ns, "server_ns": server_ns, "server_if": server_if}
    finally:
        if netlink.netns_exists(server_ns) and netlink.interface_exists(server_if, server_ns):
            connpub("detach", "--iface", server_if, "--netns", server_ns, check=False)
        netlink.delete_netns(client_ns)
        netlink.delete_netns(server_ns)


def capture_socket(netns: str, iface: str) -> socket.socket:
    with netlink.entered(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE
        sock.bind((iface, 0))
    sock.setblocking(False)
    return sock


def captured_client_packets(sock: socket.socket) -> tuple[int, int, int]:
    """(packets, IP bytes, TCP payload bytes) the client sent to the server port, as captured."""
    packets = ip_bytes = payload = 0
    while True:
        try:
            frame, addr = sock.recvfrom(65536)
        except BlockingIOError:
            return packets, ip_bytes, payload
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        ihl = (frame[14] & 0x0F) * 4
        total_len = struct.unpack_from("!H", frame, 16)[0]
        if frame[23] != 6 or struct.unpack_from("!H", frame, 14 + ihl + 2)[0] != PORT:
            continue
        doff = (frame[14 + ihl + 12] >> 4) * 4
        packets += 1
        ip_bytes += total_len
        payload += total_len - ihl - doff


def poll(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value and not isinstance(value, tuple):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: last {value!r}")


def dump(pair, name: str) -> list[dict]:
    out = connpub(
        "maps",
        "dump",
        name,
        "--iface",
        pair["server_if"],
        "--netns",
        pair["server_ns"],
        "--json",
        "--limit",
        "0",
    )
    return json.loads(out.stdout)["rows"]


def test_real_tcp_counters_match_capture_and_active_returns_to_zero(pair):
    server_ns, server_if = pair["server_ns"], pair["server_if"]
    connpub(
        "attach",
        "--role",
        "server",
        "--iface",
        server_if,
        "--netns",
        server_ns,
        "--default-level",
        "1",
    )
    status = json.loads(connpub("status", "--json").stdout)["attachments"]
    mine = [a for a in status if a["attachment"] == f"{server_ns}/{server_if}"]
    assert len(mine) == 1 and mine[0]["attached"] and mine[0]["role"] == "server"

    capture = capture_socket(server_ns, server_if)
    with netlink.entered(server_ns):
        listener = socket.create_server((SERVER_IP, PORT))
    received = []

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                received.append(total)
                conn.sendall(b"done")

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    with netlink.entered(pair["client_ns"]):
        clients = [socket.create_connection((SERVER_IP, PORT), timeout=10) for _ in range(2)]
    try:

        def active_flows():
            rows = dump(pair, "aggregates")
            return rows and rows[0]["active_flows"] == 2 and rows

        rows = poll(active_flows, "two active flows in the session aggregate")
        assert len(rows) == 1 and rows[0]["level"] == 1 and rows[0]["vip"] == f"{SERVER_IP}:{PORT}"
        for client in clients:
            client.sendall(b"z" * PAYLOAD_SIZE)
            client.shutdown(socket.SHUT_WR)
            assert client.recv(16) == b"done"
    finally:
        for client in clients:
            client.close()
        server_thread.join(timeout=10)
        listener.close()
    assert received == [PAYLOAD_SIZE, PAYLOAD_SIZE]

    def all_closed():
        flows = dump(pair, "flows")
        return len(flows) == 2 and all(row["closed"] == 1 for row in flows) and flows

    flows = poll(all_closed, "both flows closed")
    # the last ACK after the server's FIN may still be on its way: wait for the capture to settle
    totals = [0, 0, 0]

    def capture_settled():
        got = captured_client_packets(capture)
        for i in range(3):
            totals[i] += got[i]
        flows_now = dump(pair, "flows")
        seen = sum(row["packets"] for row in flows_now)
        return (seen == totals[0] and flows_now) or (seen, list(totals))

    flows = poll(capture_settled, "flow counters equal to the capture")
    capture.close()
    assert totals[2] == 2 * PAYLOAD_SIZE
    assert sum(row["bytes"] for row in flows) == totals[1]
    for row in flows:
        assert row["client"].startswith(CLIENT_IP + ":") and row["vip"] == f"{SERVER_IP}:{PORT}"
        assert row["level"] == 1 and row["sketch_count"] == 8
    (agg,) = dump(pair, "aggregates")
    assert (agg["active_flows"], agg["total_flows"]) == (0, 2)
    assert (agg["packets"], agg["bytes"]) == (totals[0], totals[1])
    stats = json.loads(
        connpub("maps", "stats", "--iface", server_if, "--netns", server_ns, "--json").stdout
    )
    assert stats["stats"]["new_flow"] == 2 and stats["stats"]["flow_closed"] == 2
    assert stats["stats"]["bytes"] == totals[1]
    assert bytes(mapped(SERVER_IP))  # the helper round-trips

    connpub("detach", "--iface", server_if, "--netns", server_ns)
    assert netlink.xdp_prog_id(server_if, server_ns) is None
    assert not paths.pin_dir(server_if, server_ns).exists()
    assert not (paths.PIN_ROOT / server_ns).exists()
    assert f"{server_ns}/{server_if}" not in connpub("status", "--json").stdout


def test_cli_errors_are_one_line_and_exit_2(pair):
    server_ns, server_if = pair["server_ns"], pair["server_if"]
    cases = [
        (
            ("attach", "--role", "server", "--iface", "nope0", "--netns", server_ns),
            "no interface nope0",
        ),
        (
            ("attach", "--role", "server", "--iface", server_if, "--netns", "nonexistent-ns"),
            "no netns",
        ),
        (("detach", "--iface", "nope0", "--netns", server_ns), "no interface nope0"),
        (("maps", "dump", "flows", "--iface", server_if, "--netns", server_ns), "nothing attached"),
    ]
    for args, message in cases:
        proc = connpub(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)
    assert not (paths.PIN_ROOT / server_ns).exists()

    connpub("attach", "--role", "server", "--iface", server_if, "--netns", server_ns)
    proc = connpub(
        "attach", "--role", "server", "--iface", server_if, "--netns", server_ns, check=False
    )
    assert proc.returncode == 2 and "already has XDP program" in proc.stderr
    proc = connpub(
        "maps", "dump", "nosuchmap", "--iface", server_if, "--netns", server_ns, check=False
    )
    assert proc.returncode == 2 and "no map 'nosuchmap'" in proc.stderr
    connpub("detach", "--iface", server_if, "--netns", server_ns)
    assert not (paths.PIN_ROOT / server_ns).exists()


def test_non_root_is_refused_with_one_line(pair):
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "connpub.cli",
            "attach",
            "--role",
            "server",
            "--iface",
            pair["server_if"],
            "--netns",
            pair["server_ns"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "connpub: error: needs root (XDP, bpffs and netns need CAP_SYS_ADMIN/CAP_NET_ADMIN): "
        "use sudo"
    ]
