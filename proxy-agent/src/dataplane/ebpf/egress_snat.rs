//! The address SNATed flows leave each interface with. netfilter's MASQUERADE takes the address of the
//! interface a packet leaves by, so kube-proxy's masqueraded traffic to a pod on a bridge comes from the
//! bridge's address (`cni0`'s), and to another node from the uplink's. The data path does the same: an
//! attached interface with an address of its own, or a port of a bridge with one, masquerades with it
//! (`EGRESS_SNAT`, `EGRESS_SNAT6`); any other with the node's SNAT address of the family (`snat_addr`).
//! Both families alike: an overlay's IPv6 replies must come back through the overlay too.

use std::{collections::BTreeMap, net::Ipv4Addr};

use proxy_common::config::MAX_SNAT_ADDRS;

use super::interfaces::Interface;

/// Where SNAT differs from `snat_addr`: the address per attached interface index, and the distinct
/// addresses (at most [`MAX_SNAT_ADDRS`], in interface order; interfaces beyond them use `snat_addr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressSnat<A = Ipv4Addr> {
    pub by_interface: BTreeMap<u32, A>,
    pub addresses: Vec<A>,
}

impl<A> Default for EgressSnat<A> {
    fn default() -> Self {
        Self { by_interface: BTreeMap::new(), addresses: Vec::new() }
    }
}

/// The SNAT address of each of `attached` (interface indexes), from the `interfaces` and the addresses of
/// one family each holds (`addresses`, first is primary; for IPv6 the global ones).
#[must_use]
pub fn plan<A: Copy + PartialEq>(
    interfaces: &[Interface],
    attached: impl IntoIterator<Item = u32>,
    addresses: &BTreeMap<String, Vec<A>>,
    snat_addr: Option<A>,
) -> EgressSnat<A> {
    let first = |name: &str| addresses.get(name).and_then(|a| a.first()).copied();
    let mut out = EgressSnat::default();
    for index in attached {
        let Some(interface) = interfaces.iter().find(|i| i.index == index) else { continue };
        let own = first(&interface.name).or_else(|| interface.bridge.as_deref().and_then(first));
        let Some(addr) = own.filter(|a| Some(*a) != snat_addr) else { continue };
        if !out.addresses.contains(&addr) {
            if out.addresses.len() == MAX_SNAT_ADDRS {
                continue;
            }
            out.addresses.push(addr);
        }
        out.by_interface.insert(index, addr);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str, bridge: Option<&str>) -> Interface {
        Interface {
            index,
            name: name.into(),
            is_bridge: bridge.is_none() && name == "cni0",
            bridge: bridge.map(Into::into),
        }
    }

    #[test]
    fn bridge_ports_masquerade_with_the_bridges_address_routed_veths_and_the_uplink_with_the_nodes() {
        let node: Ipv4Addr = "10.240.0.11".parse().unwrap();
        let cni0: Ipv4Addr = "10.200.1.1".parse().unwrap();
        let interfaces =
            [iface(2, "eth0", None), iface(3, "cni0", None), iface(4, "veth1", Some("cni0")), iface(5, "cali1", None)];
        let addresses = BTreeMap::from([("eth0".to_owned(), vec![node]), ("cni0".to_owned(), vec![cni0])]);
        let plan = plan(&interfaces, [2, 4, 5], &addresses, Some(node));
        assert_eq!(plan.by_interface, BTreeMap::from([(4, cni0)]));
        assert_eq!(plan.addresses, vec![cni0]);
    }

    #[test]
    fn ipv6_bridge_ports_and_an_overlay_masquerade_with_their_own_global_address() {
        let node: std::net::Ipv6Addr = "fd00:240::11".parse().unwrap();
        let cni0: std::net::Ipv6Addr = "fd00:200:1::1".parse().unwrap();
        let overlay: std::net::Ipv6Addr = "fd00:200:1::f1".parse().unwrap();
        let interfaces = [
            iface(2, "eth0", None),
            iface(3, "cni0", None),
            iface(4, "veth1", Some("cni0")),
            iface(5, "flannel.1", None),
        ];
        let addresses = BTreeMap::from([
            ("eth0".to_owned(), vec![node]),
            ("cni0".to_owned(), vec![cni0]),
            ("flannel.1".to_owned(), vec![overlay]),
        ]);
        let plan = plan(&interfaces, [2, 4, 5], &addresses, Some(node));
        assert_eq!(plan.by_interface, BTreeMap::from([(4, cni0), (5, overlay)]));
        assert_eq!(plan.addresses, vec![cni0, overlay]);
    }

    #[test]
    fn addresses_beyond_the_data_paths_room_fall_back_to_the_nodes() {
        let interfaces: Vec<Interface> = (1..=6).map(|i| iface(i, &format!("eth{i}"), None)).collect();
        let addresses = (1..=6u8).map(|i| (format!("eth{i}"), vec![Ipv4Addr::new(10, 0, i, 1)])).collect();
        let plan = plan(&interfaces, 1..=6, &addresses, None);
        assert_eq!(plan.addresses.len(), MAX_SNAT_ADDRS);
        assert_eq!(plan.by_interface.len(), MAX_SNAT_ADDRS);
    }
}
