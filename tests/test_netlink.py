"""connpub.datapath.netlink: netns, veths, sysctls, XDP attach/detach (root tests: real netns)."""

from __future__ import annotations

import pytest
from connpub.datapath import netlink
from connpub.errors import ConnpubError


def test_sysctl_outside_net_is_refused():
    with pytest.raises(ConnpubError, match=r"^sysctl kernel\.pid_max is not per-netns"):
        netlink.sysctl_set(None, "kernel.pid_max", 1)


def test_xdp_mode_is_checked_before_touching_anything():
    message = r"^unknown XDP mode turbo: use auto, native or generic$"
    with pytest.raises(ConnpubError, match=message):
        netlink.attach_xdp("lo", None, 0, "turbo")  # type: ignore[arg-type]


@pytest.fixture
def veth_pair(unique_prefix):
    """Two namespaces joined by a veth: (ns_a, 'va', ns_b, 'vb'); removed afterwards."""
    ns_a, ns_b = f"{unique_prefix}-a", f"{unique_prefix}-b"
    try:
        netlink.create_netns(ns_a)
        netlink.create_netns(ns_b)
        netlink.create_veth("va", ns_a, "vb", ns_b)
        yield ns_a, "va", ns_b, "vb"
    finally:
        netlink.delete_netns(ns_a)
        netlink.delete_netns(ns_b)


@pytest.fixture(scope="module")
def xdp_pass_fd():
    from bcc import BPF

    bpf = BPF(text="int xdp_pass_prog(struct xdp_md *ctx) { return XDP_PASS; }")
    yield bpf.load_func("xdp_pass_prog", BPF.XDP).fd
    bpf.cleanup()


@pytest.mark.root
def test_netns_and_veth_lifecycle(veth_pair):
    ns_a, va, ns_b, vb = veth_pair
    assert netlink.netns_exists(ns_a) and netlink.netns_exists(ns_b)
    assert netlink.list_netns(ns_a[:-1]) == [ns_a, ns_b]
    assert netlink.interface_exists(va, ns_a) and not netlink.interface_exists(va, ns_b)
    assert netlink.list_interfaces(ns_b) == ["lo", vb]
    netlink.add_address(va, ns_a, "10.77.0.1/24")
    netlink.add_address(va, ns_a, "fd00:77::1/64")
    assert sorted(netlink.addresses(va, ns_a)) == ["10.77.0.1/24", "fd00:77::1/64"]
    netlink.sysctl_set(ns_a, "net.ipv4.ip_forward", 1)
    assert netlink.sysctl_get(ns_a, "net.ipv4.ip_forward") == "1"
    assert netlink.sysctl_get(ns_b, "net.ipv4.ip_forward") == "0"
    with pytest.raises(ConnpubError, match=f"^netns {ns_a} already exists"):
        netlink.create_netns(ns_a)
    assert netlink.delete_netns(ns_b) is True
    assert netlink.delete_netns(ns_b) is False
    assert not netlink.interface_exists(va, ns_a)  # the peer's netns took the pair with it


@pytest.mark.root
def test_ifindex_errors_name_the_interface_and_netns(veth_pair, unique_prefix):
    ns_a, va, _, _ = veth_pair
    assert netlink.ifindex(va, ns_a) == netlink.ifindex(va, ns_a) > 1
    with pytest.raises(ConnpubError, match=f"^no interface nope in netns {ns_a}:"):
        netlink.ifindex("nope", ns_a)
    with pytest.raises(ConnpubError, match=f"^no netns {unique_prefix}-zz:"):
        netlink.ifindex(va, f"{unique_prefix}-zz")


@pytest.mark.root
def test_xdp_attach_native_refuse_double_detach(veth_pair, xdp_pass_fd):
    ns_a, va, _, _ = veth_pair
    assert netlink.xdp_prog_id(va, ns_a) is None
    assert netlink.attach_xdp(va, ns_a, xdp_pass_fd, "native") == "native"
    prog_id = netlink.xdp_prog_id(va, ns_a)
    assert prog_id is not None and prog_id > 0
    assert netlink.xdp_mode(va, ns_a) == "native"
    with pytest.raises(ConnpubError) as refused:
        netlink.attach_xdp(va, ns_a, xdp_pass_fd, "auto")
    assert str(refused.value) == (f"an XDP program (id {prog_id}) is already attached to {va} in "
                                  f"netns {ns_a}: detach it first (`connpub detach`)")
    assert "\n" not in str(refused.value)
    assert netlink.detach_xdp(va, ns_a) is True
    assert netlink.xdp_prog_id(va, ns_a) is None
    assert netlink.detach_xdp(va, ns_a) is False


@pytest.mark.root
def test_xdp_auto_prefers_native_and_generic_works(veth_pair, xdp_pass_fd):
    ns_a, va, ns_b, vb = veth_pair
    assert netlink.attach_xdp(va, ns_a, xdp_pass_fd, "auto") == "native"
    assert netlink.attach_xdp(vb, ns_b, xdp_pass_fd, "generic") == "generic"
    assert netlink.xdp_mode(vb, ns_b) == "generic"
    assert netlink.xdp_prog_id(va, ns_a) == netlink.xdp_prog_id(vb, ns_b)  # same program
    assert netlink.detach_xdp(vb, ns_b) is True
    assert netlink.xdp_prog_id(vb, ns_b) is None
    assert netlink.detach_xdp(va, ns_a) is True
