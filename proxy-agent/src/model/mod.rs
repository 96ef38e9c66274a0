//! The model: from the cluster state and this node's identity to the desired service table, kept up to date
//! change by change (`incremental`) and held to the from-scratch specification (`reference`).
//!
//! No I/O happens here, so everything in this module is tested without a cluster or a kernel.

mod build;
mod incremental;
#[cfg(test)]
mod reference;
pub mod sloppy_ip;
mod table;
pub mod validate;

use std::net::IpAddr;

pub use build::HealthCheck;
pub use incremental::IncrementalModel;
#[cfg(test)]
pub use reference::{Desired, desired};
pub use table::{
    BackendSet, Cidr, Endpoint, Frontend, FrontendEntry, FrontendKind, LbAlgorithm, Protocol, ServicePortName,
    ServiceTable,
};
pub use validate::Rejection;

use crate::store::ClusterState;

/// Who "this node" is: its name (for Local policies and topology), and its addresses (for NodePorts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// The addresses of this node's own interfaces, of both families (not loopback, link-local or
    /// pod-facing).
    pub addresses: Vec<IpAddr>,
    pub node_port_addresses: NodePortAddresses,
    /// `--service-cluster-ip-range`: service CIDRs configured on this node, joined by the cluster's
    /// `ServiceCIDR` objects.
    pub service_cidrs: Vec<Cidr>,
}

/// The service CIDRs the dataplane drops unallocated addresses of: the configured ones and those of every
/// `ServiceCIDR` object, sorted and without repeats; and the objects that could not be read.
#[must_use]
pub fn service_cidrs(state: &ClusterState, node: &NodeIdentity) -> (Vec<Cidr>, Vec<Rejection>) {
    let mut cidrs = node.service_cidrs.clone();
    let mut rejected = Vec::new();
    for obj in state.service_cidrs.values() {
        match validate::service_cidr(obj) {
            Ok(found) => cidrs.extend(found),
            Err(rejection) => rejected.push(rejection),
        }
    }
    cidrs.sort_unstable();
    cidrs.dedup();
    (cidrs, rejected)
}

/// kube-proxy's `clusterCIDR`: the pods' networks, at most one per family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterCidrs(Vec<Cidr>);

impl ClusterCidrs {
    /// `cidrs` as networks, or why not: more than one of a family.
    ///
    /// # Errors
    /// Two CIDRs of one family (a dual-stack pair has one of each), or more than two.
    pub fn new(cidrs: &[Cidr]) -> Result<Self, String> {
        match cidrs {
            [a, b] if a.0.is_ipv6() == b.0.is_ipv6() => {
                Err("two CIDRs of one family; a dual-stack pair has one of each".into())
            }
            [_, _, _, ..] => Err("more than two CIDRs; a dual-stack pair has one of each family".into()),
            _ => Ok(Self(cidrs.iter().map(|(a, l)| network(*a, *l)).collect())),
        }
    }

    /// The pods' network of one family.
    #[must_use]
    pub fn of_family(&self, ipv6: bool) -> Option<Cidr> {
        self.0.iter().copied().find(|(a, _)| a.is_ipv6() == ipv6)
    }
}

impl std::fmt::Display for ClusterCidrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(a, l)| format!("{a}/{l}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// kube-proxy's `nodePortAddresses`: which node addresses NodePorts listen on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node (kube-proxy's iptables-mode default).
    #[default]
    All,
    /// Addresses within these CIDRs; all addresses of a family none of them is of.
    Cidrs(Vec<Cidr>),
    /// The node's primary address of each family: the Node object's InternalIP, else its first address.
    Primary,
}

/// The mask of a prefix length over `bits` bits.
fn prefix_mask(len: u8, bits: u32) -> u128 {
    let len = u32::from(len).min(bits);
    let all = if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
    all & !(all.checked_shr(len).unwrap_or(0))
}

/// An address as an integer, and its width in bits.
fn bits(addr: IpAddr) -> (u128, u32) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// Whether `addr` lies in `net/len` (never, across families).
#[must_use]
pub fn in_cidr(addr: IpAddr, (net, len): Cidr) -> bool {
    let ((a, width), (n, net_width)) = (bits(addr), bits(net));
    width == net_width && a & prefix_mask(len, width) == n & prefix_mask(len, width)
}

/// `addr/len` as a network: host bits cleared, as kube-proxy's parser returns it and the rules print it.
#[must_use]
pub fn network(addr: IpAddr, len: u8) -> Cidr {
    let (a, width) = bits(addr);
    let masked = a & prefix_mask(len, width);
    let net = match addr {
        IpAddr::V4(_) => IpAddr::V4(u32::try_from(masked).expect("32 bits").into()),
        IpAddr::V6(_) => IpAddr::V6(masked.into()),
    };
    (net, len.min(u8::try_from(width).expect("32 or 128")))
}

impl NodeIdentity {
    /// The addresses NodePorts are served on.
    #[must_use]
    pub fn node_port_addresses(&self, state: &ClusterState) -> Vec<IpAddr> {
        match &self.node_port_addresses {
            NodePortAddresses::All => self.addresses.clone(),
            // Per family, as kube-proxy's `NewNodePortAddresses`: a family none of the CIDRs is of serves
            // NodePorts on all its addresses (`0.0.0.0/0` or `::/0`).
            NodePortAddresses::Cidrs(cidrs) => self
                .addresses
                .iter()
                .copied()
                .filter(|a| {
                    let mut of_family = cidrs.iter().filter(|(net, _)| net.is_ipv6() == a.is_ipv6()).peekable();
                    of_family.peek().is_none() || of_family.any(|c| in_cidr(*a, *c))
                })
                .collect(),
            NodePortAddresses::Primary => {
                [false, true].into_iter().filter_map(|ipv6| self.primary_address(state, ipv6)).collect()
            }
        }
    }

    /// kube-proxy's `nodeIP` of one family: the Node object's first InternalIP of that family, else the
    /// first local address of it.
    #[must_use]
    pub fn primary_address(&self, state: &ClusterState, ipv6: bool) -> Option<IpAddr> {
        let from_node = state.nodes.get(&self.name).and_then(|n| {
            n.status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .find(|a| a.is_ipv6() == ipv6)
        });
        from_node.or_else(|| self.addresses.iter().copied().find(|a| a.is_ipv6() == ipv6))
    }
}

#[cfg(test)]
mod tests;
