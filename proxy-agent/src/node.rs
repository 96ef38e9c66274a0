//! What this node is, read from the kernel: the addresses of its host interfaces.

use std::net::Ipv4Addr;

use crate::dataplane::ebpf::{InterfaceRoles, Role};

/// IPv4 addresses of the host interfaces, ordered by interface name, then as the kernel lists them.
pub fn host_addresses(roles: &InterfaceRoles) -> anyhow::Result<Vec<Ipv4Addr>> {
    let hosts: Vec<String> = roles
        .assign(&crate::dataplane::ebpf::interfaces::list()?)
        .into_values()
        .filter_map(|(name, role)| (role == Role::Host).then_some(name))
        .collect();
    let mut by_interface = crate::dataplane::ebpf::interfaces::addresses()?;
    by_interface.retain(|name, _| hosts.contains(name));
    Ok(by_interface.into_values().flatten().collect())
}
