"""Impairments of a running lab: egress loss (netem, or bpf/lab/loss.c) and delay."""

from __future__ import annotations

from connpub.datapath import netlink
from connpub.errors import ConnpubError
from connpub.lab.state import load_lab, save_lab
from connpub.paths import BPF_DIR

# impairments (loss / delay on one interface, egress)


def impair(prefix: str, node: str, iface: str, loss_pct: float = 0.0,
           delay_ms: float = 0.0) -> dict:
    """Set egress loss/delay on one lab interface (0/0 clears); returns what was applied.

    Uses netem when the kernel has it; otherwise loss alone is done by a tc egress BPF program
    (bpf/lab/loss.c) and delay is refused.
    """
    lab = load_lab(prefix)
    if node not in lab.nodes or iface not in lab.nodes[node].ifaces:
        raise ConnpubError(f"no interface {node}/{iface} in lab {prefix}: see `connpub lab status`")
    if not 0 <= loss_pct <= 100 or delay_ms < 0:
        raise ConnpubError(f"bad impairment loss={loss_pct}% delay={delay_ms}ms: "
                           "loss must be 0..100, delay >= 0")
    netns = lab.nodes[node].netns
    netlink.clear_root_qdisc(iface, netns)
    netlink.detach_tc_filters(iface, netns, "egress")
    applied = {"loss_pct": loss_pct, "delay_ms": delay_ms, "method": "none"}
    if loss_pct or delay_ms:
        try:
            netlink.set_netem(iface, netns, delay_ms=delay_ms, loss_pct=loss_pct)
            applied["method"] = "netem"
        except ConnpubError:
            if delay_ms:
                raise
            from bcc import BPF

            bpf = BPF(src_file=str(BPF_DIR / "lab" / "loss.c").encode())
            threshold = min(int(loss_pct / 100 * 2**32), 2**32 - 1)
            table = bpf["lab_loss_threshold"]
            table[table.Key(0)] = table.Leaf(threshold)
            program = bpf.load_func("lab_loss", BPF.SCHED_CLS)
            netlink.attach_tc(iface, netns, program.fd, "lab_loss", "egress")
            applied["method"] = "bpf-loss"
    key = f"{node}/{iface}"
    if applied["method"] == "none":
        lab.impairments.pop(key, None)
    else:
        lab.impairments[key] = applied
    save_lab(lab)
    return applied


# ---------------------------------------------------------------------------------------------
