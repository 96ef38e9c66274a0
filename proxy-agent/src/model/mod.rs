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

use std::net::Ipv4Addr;

pub use build::HealthCheck;
pub use incremental::IncrementalModel;
#[cfg(test)]
pub use reference::{Desired, desired};
pub use table::{
    BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, LbAlgorithm, Protocol, ServicePortName, ServiceTable,
};
pub use validate::Rejection;

use crate::store::ClusterState;

/// Who "this node" is: its name (for Local policies and topology), and its addresses (for NodePorts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// The IPv4 addresses of this node's own interfaces (not loopback, not pod-facing).
    pub addresses: Vec<Ipv4Addr>,
    pub node_port_addresses: NodePortAddresses,
    /// `--service-cluster-ip-range`: service CIDRs configured on this node, joined by the cluster's
    /// `ServiceCIDR` objects.
    pub service_cidrs: Vec<(Ipv4Addr, u8)>,
}

/// The service CIDRs the dataplane drops unallocated addresses of: the configured ones and those of every
/// `ServiceCIDR` object, sorted and without repeats; and the objects that could not be read.
#[must_use]
pub fn service_cidrs(state: &ClusterState, node: &NodeIdentity) -> (Vec<(Ipv4Addr, u8)>, Vec<Rejection>) {
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

/// kube-proxy's `nodePortAddresses`: which node addresses NodePorts listen on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node (kube-proxy's iptables-mode default).
    #[default]
    All,
    /// Addresses within these CIDRs.
    Cidrs(Vec<(Ipv4Addr, u8)>),
    /// The node's primary address: the Node object's InternalIP, else its first address.
    Primary,
}

/// The mask of a prefix length, host byte order.
fn prefix_mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0)
}

/// Whether `addr` lies in `net/len`.
#[must_use]
pub fn in_cidr(addr: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    u32::from(addr) & prefix_mask(len) == u32::from(net) & prefix_mask(len)
}

/// `addr/len` as a network: host bits cleared, as kube-proxy's parser returns it and the rules print it.
#[must_use]
pub fn network(addr: Ipv4Addr, len: u8) -> (Ipv4Addr, u8) {
    (Ipv4Addr::from(u32::from(addr) & prefix_mask(len)), len)
}

impl NodeIdentity {
    /// The addresses NodePorts are served on.
    #[must_use]
    pub fn node_port_addresses(&self, state: &ClusterState) -> Vec<Ipv4Addr> {
        match &self.node_port_addresses {
            NodePortAddresses::All => self.addresses.clone(),
            NodePortAddresses::Cidrs(cidrs) => {
                self.addresses.iter().copied().filter(|a| cidrs.iter().any(|c| in_cidr(*a, *c))).collect()
            }
            NodePortAddresses::Primary => self.primary_address(state).into_iter().collect(),
        }
    }

    /// The Node object's first IPv4 InternalIP, else the first local address.
    #[must_use]
    pub fn primary_address(&self, state: &ClusterState) -> Option<Ipv4Addr> {
        let from_node = state.nodes.get(&self.name).and_then(|n| {
            n.status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .find_map(|a| a.address.parse().ok())
        });
        from_node.or_else(|| self.addresses.first().copied())
    }
}

#[cfg(test)]
mod tests;
