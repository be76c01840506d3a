"""The datapath of a lab: the LB program on every LB node, the server program on every server."""

from __future__ import annotations

from connpub.errors import ConnpubError
from connpub.lab.state import Lab, save_lab, service_ports

# the datapath: LB program on every LB node, server program on every server


def attach_datapath(lab: Lab, forward: str = "redirect", lb_settings: dict | None = None) -> dict:
    """Attach the LB program on each LB node's ingress and the server program where the
    encapsulated packets arrive; configure backends (server k = backend id k) and every VIP
    service port. forward: "redirect" (LB -> fabric, XDP_REDIRECT) or "tx" (back to the
    router, XDP_TX). Returns (and records in the lab state) what was attached."""
    from connpub import paths  # noqa: PLC0415 - bcc only where needed
    from connpub.datapath import lbctl, loader

    if forward not in ("redirect", "tx"):
        raise ConnpubError(f"forward must be redirect or tx, not {forward!r}")
    attached: dict = {"forward": forward, "lb": [], "server": []}
    server_iface = "fab" if forward == "redirect" else "eth0"
    for server in lab.servers:
        iface = server.ifaces[server_iface]
        loader.attach("server", iface.name, server.netns, "native")
        attached["server"].append({"node": server.name, "netns": server.netns,
                                   "iface": iface.name})
    for lb in lab.lbs:
        ingress = lab.lb_ingress(lb.name)
        loader.attach("lb", ingress.name, ingress.netns, "native")
        pin_dir = paths.pin_dir(ingress.name, ingress.netns)
        lbctl.init_lb_maps(pin_dir, **(lb_settings or {}))
        if forward == "redirect":
            lbctl.set_config(pin_dir, redirect_iface=lab.lb_fabric(lb.name).name,
                             netns=ingress.netns)
        else:
            lbctl.set_config(pin_dir, gateway_mac=lab.lb_gateway_mac(lb.name))
        for backend_id, backend in enumerate(lab.backends(), start=1):
            if forward == "redirect":
                lbctl.add_backend(pin_dir, backend_id, backend["ipv4"], mac=backend["mac"])
            else:
                lbctl.add_backend(pin_dir, backend_id, backend["routed_ipv4"])
        for vip in lab.vips4 + lab.vips6:
            for port in service_ports(lab, 6):
                lbctl.add_vip(pin_dir, vip, port, "tcp")
            for port in service_ports(lab, 17):
                lbctl.add_vip(pin_dir, vip, port, "udp")
        attached["lb"].append({"node": lb.name, "netns": ingress.netns, "iface": ingress.name,
                               "pin_dir": str(pin_dir)})
    lab.datapath = attached
    save_lab(lab)
    return attached
