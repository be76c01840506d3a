"""The kernel side: bcc loader, libbpf, pinned maps, netlink, C ABI mirrors, masks, Maglev."""
