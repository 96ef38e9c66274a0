//! The node's network interfaces as the kernel lists them, with what the roles depend on besides a name:
//! whether an interface is a Linux bridge, and which bridge (if any) it is a port of.
//!
//! Read from sysfs (`/sys/class/net/<name>/bridge` exists for a bridge; `…/master` links a port to its
//! bridge): the kernel's stable interface for exactly these two facts, and visible in the agent's own
//! network namespace (`ip netns exec` and a host-network pod both mount the namespace's sysfs).

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Context as _;

/// One interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// A Linux bridge (`cni0`, `weave`, `br0`).
    pub is_bridge: bool,
    /// The bridge this interface is a port of.
    pub bridge: Option<String>,
}

/// Every interface of this network namespace, by index.
pub fn list() -> anyhow::Result<Vec<Interface>> {
    let sys = Path::new("/sys/class/net");
    Ok(nix::net::if_::if_nameindex()
        .context("listing network interfaces")?
        .iter()
        .filter_map(|i| {
            let name = i.name().to_str().ok()?.to_owned();
            let dir = sys.join(&name);
            let is_bridge = dir.join("bridge").is_dir();
            // A port of a bond or a VRF has a master too; only a bridge's ports share its packets' path.
            let bridge = std::fs::read_link(dir.join("master"))
                .ok()
                .and_then(|m| m.file_name().and_then(|f| f.to_str()).map(str::to_owned))
                .filter(|m| sys.join(m).join("bridge").is_dir());
            Some(Interface { index: i.index(), name, is_bridge, bridge })
        })
        .collect())
}

/// The IPv4 addresses of every interface, by name, as the kernel lists them.
pub fn addresses() -> anyhow::Result<BTreeMap<String, Vec<Ipv4Addr>>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        if let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(nix::sys::socket::SockaddrIn::ip)
        {
            out.entry(ifa.interface_name.clone()).or_default().push(addr);
        }
    }
    Ok(out)
}

/// The global IPv6 addresses of every interface, by interface name, as the kernel lists them. Link-local
/// (`fe80::/10`) ones are left out: a NodePort is not served on them, as kube-proxy does not.
pub fn ipv6_addresses() -> anyhow::Result<BTreeMap<String, Vec<std::net::Ipv6Addr>>> {
    let mut out: BTreeMap<String, Vec<std::net::Ipv6Addr>> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in6()).map(nix::sys::socket::SockaddrIn6::ip)
        else {
            continue;
        };
        if !addr.is_loopback() && !addr.is_unicast_link_local() {
            out.entry(ifa.interface_name.clone()).or_default().push(addr);
        }
    }
    Ok(out)
}
