//! What this node is, read from the kernel: the addresses of its host interfaces.

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::dataplane::ebpf::{InterfaceRoles, Role};

/// IPv4 addresses of the host interfaces, ordered by interface name, then as the kernel lists them.
pub fn host_addresses(roles: &InterfaceRoles) -> anyhow::Result<Vec<Ipv4Addr>> {
    let hosts: Vec<String> = roles
        .assign(&crate::dataplane::ebpf::interfaces::list()?)
        .into_values()
        .filter_map(|(name, role)| (role == Role::Host).then_some(name))
        .collect();
    let mut by_interface: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(nix::sys::socket::SockaddrIn::ip)
        else {
            continue;
        };
        if hosts.contains(&ifa.interface_name) {
            by_interface.entry(ifa.interface_name.clone()).or_default().push(addr);
        }
    }
    Ok(by_interface.into_values().flatten().collect())
}
