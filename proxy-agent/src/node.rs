//! What this node is, read from the kernel: the addresses of its host interfaces.

use std::net::IpAddr;

use crate::dataplane::ebpf::{InterfaceRoles, Role};

/// The addresses of the host interfaces, IPv4 ones first (the first is the default SNAT and primary
/// address), each family ordered by interface name, then as the kernel lists them. IPv6 link-local
/// addresses are left out.
pub fn host_addresses(roles: &InterfaceRoles) -> anyhow::Result<Vec<IpAddr>> {
    let hosts: Vec<String> = roles
        .assign(&crate::dataplane::ebpf::interfaces::list()?)
        .into_values()
        .filter_map(|(name, role)| (role == Role::Host).then_some(name))
        .collect();
    let mut v4 = crate::dataplane::ebpf::interfaces::addresses()?;
    v4.retain(|name, _| hosts.contains(name));
    let mut v6 = crate::dataplane::ebpf::interfaces::ipv6_addresses()?;
    v6.retain(|name, _| hosts.contains(name));
    let v4 = v4.into_values().flatten().map(IpAddr::V4);
    Ok(v4.chain(v6.into_values().flatten().map(IpAddr::V6)).collect())
}
