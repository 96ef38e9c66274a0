//! The desired service table: what the dataplane must make true.

use std::{collections::BTreeMap, fmt, net::IpAddr};

/// A network: address and prefix length, host bits clear.
pub type Cidr = (IpAddr, u8);

/// An L4 protocol a Service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling; an absent protocol means TCP, as the API server defaults it.
    #[must_use]
    pub fn from_k8s(value: Option<&str>) -> Option<Self> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::proto::TCP,
            Self::Udp => proxy_common::proto::UDP,
            Self::Sctp => proxy_common::proto::SCTP,
        }
    }

    /// The lower-case name netfilter tools and kube-proxy's chain hashes use.
    #[must_use]
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }

    #[must_use]
    pub fn from_number(number: u8) -> Option<Self> {
        [Self::Tcp, Self::Udp, Self::Sctp].into_iter().find(|p| p.number() == number)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// An address clients send to: a Service IP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.addr, self.port), self.protocol)
    }
}

/// A backend address: a pod IP and the resolved target port. Its protocol is its frontend's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node. External traffic to a local endpoint can keep its source address.
    pub local: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.addr, self.port))
    }
}

/// How a frontend is reached; decides which traffic counts as external.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// How new flows pick a backend, by the Service's `proxy-agent.io/lb-algorithm` annotation (eBPF mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LbAlgorithm {
    /// At random, as kube-proxy does.
    Random,
    /// By a Maglev table: the same backend for the same 5-tuple on every node.
    Maglev,
}

/// The endpoints new flows of one kind of traffic may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendSet {
    /// Sorted, without duplicates.
    pub endpoints: Vec<Endpoint>,
    /// With no endpoint: refuse the client at once (the Service has no usable endpoint anywhere) rather than
    /// drop (a Local policy filtered the endpoints out), as kube-proxy does.
    pub reject_when_empty: bool,
}

/// kube-proxy's name for one port of a Service: `namespace/name:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's name; empty for an unnamed single port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// What one frontend resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// For traffic from outside the node's pods (arriving on a host interface).
    pub external: BackendSet,
    /// For traffic from this node's pods.
    pub internal: BackendSet,
    /// Terminating endpoints that are still serving: no new flows, but established ones continue.
    pub terminating: Vec<Endpoint>,
    /// External traffic is SNATed to the node (externalTrafficPolicy Cluster, and ClusterIPs).
    pub masquerade_external: bool,
    /// sessionAffinity ClientIP: a client keeps its backend for this many seconds of inactivity.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges: only these sources may use the frontend (load-balancer IPs only).
    pub source_ranges: Vec<Cidr>,
    /// The Service's choice of algorithm; `None`: the node's default (`--lb-algorithm`, external frontends).
    pub lb_algorithm: Option<LbAlgorithm>,
}

impl FrontendEntry {
    /// Every endpoint the entry refers to, in any role.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.external.endpoints.iter().chain(&self.internal.endpoints).chain(&self.terminating)
    }
}

/// The whole desired state of this node's service dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    pub frontends: BTreeMap<Frontend, FrontendEntry>,
    /// The cluster's service CIDRs (`--service-cluster-ip-range` and `ServiceCIDR` objects), sorted: an
    /// address in one that no Service holds is dropped, not routed on.
    pub service_cidrs: Vec<Cidr>,
}

impl ServiceTable {
    /// The frontends and service CIDRs of one family (`ipv6` or not): what one family's dataplane
    /// programs, as kube-proxy runs one proxier per family. Frontends and their endpoints never mix
    /// families (the model builds them so).
    #[must_use]
    pub fn family(&self, ipv6: bool) -> Self {
        Self {
            frontends: self
                .frontends
                .iter()
                .filter(|(f, _)| f.addr.is_ipv6() == ipv6)
                .map(|(f, e)| (*f, e.clone()))
                .collect(),
            service_cidrs: self.service_cidrs.iter().copied().filter(|(net, _)| net.is_ipv6() == ipv6).collect(),
        }
    }

    /// How many distinct backends (address, port, protocol) the table uses.
    #[cfg(test)]
    #[must_use]
    pub fn distinct_backends(&self) -> usize {
        let mut all: Vec<_> = self
            .frontends
            .iter()
            .flat_map(|(f, e)| e.all_endpoints().map(move |b| (b.addr, b.port, f.protocol)))
            .collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }
}
