#!/usr/bin/env bash
# Routes and roles for one VM of vagrant/Vagrantfile, mirroring `connpub lab` (docs/lab.md).
# Args: ROLE NAME LBS SERVERS VIP4
set -euo pipefail
role=$1 name=$2 lbs=$3 servers=$4 vip4=$5
CONNPUB=/connpub/.venv/bin/connpub
sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
iface_of() { ip -o -4 addr show | awk -v a="$1" '$4 ~ "^"a"/" {print $2}'; }
case "$role" in
  client)
    ip route replace 10.200.0.0/24 via 10.100.1.1
    ;;
  router)
    nexthops=""
    for j in $(seq 1 "$lbs"); do nexthops="$nexthops nexthop via 10.101.$j.2"; done
    sysctl -qw net.ipv4.fib_multipath_hash_policy=1
    ip route replace "$vip4/32" $nexthops
    ;;
  lb)
    ip route replace 10.100.0.0/16 via "10.101.${name#lb}.1"
    # the LB program: XDP on the interface facing the router, IPIP to servers over the fabric
    $CONNPUB attach --role lb --iface "$(iface_of "10.101.${name#lb}.2")"
    ;;
  server)
    k=${name#srv}
    ip addr replace "$vip4/32" dev lo
    ip route replace 10.100.0.0/16 via "10.102.$k.1" advmss 1420
    # real kernels decapsulate IPIP with an ipip device in collect-metadata mode
    ip link add ipip0 type ipip external 2>/dev/null || true
    ip link set ipip0 up
    $CONNPUB attach --role server --iface "$(iface_of "10.103.0.$((100 + k))")"
    ;;
esac
echo "provisioned $name as $role"
