//! Builds the desired service table from checked objects, following kube-proxy's rules.

use std::net::IpAddr;

use super::{
    BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, NodeIdentity, ServicePortName,
    validate::{CheckedService, CheckedServicePort, CheckedSlice, Rejection, ServiceType, TrafficPolicy},
};
use crate::store::{ClusterState, ObjectKey};

/// What a healthCheckNodePort answers: kube-proxy's `{"service": …, "localEndpoints": N}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `namespace/name`
    pub service: String,
    pub local_endpoints: usize,
}

/// What a node contributes to every Service's entries: its name (for Local policies and hints), its zone
/// and the addresses its NodePorts are served on. When these change, every Service is recomputed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct NodeContext {
    pub name: String,
    pub zone: Option<String>,
    pub node_port_addrs: Vec<IpAddr>,
    /// kube-proxy's `nodeIP` of each family: the Node object's InternalIP, else the first local address.
    pub primary_addrs: Vec<IpAddr>,
}

impl NodeContext {
    pub fn of(state: &ClusterState, node: &NodeIdentity) -> Self {
        Self {
            name: node.name.clone(),
            zone: node_zone(state, &node.name),
            node_port_addrs: node.node_port_addresses(state),
            primary_addrs: [false, true].into_iter().filter_map(|ipv6| node.primary_address(state, ipv6)).collect(),
        }
    }
}

/// A Service port's claim on one frontend. Two Services can claim the same address; the first claim in
/// (Service, port, position) order wins, and the others are rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Claim {
    pub frontend: Frontend,
    /// Index into `spec.ports`, for the rejection's field.
    pub port_index: usize,
    pub entry: FrontendEntry,
}

/// Everything one checked Service contributes, computed from it, its slices and the node alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ServiceOutput {
    /// In claim order.
    pub claims: Vec<Claim>,
    /// Ports that cannot be programmed.
    pub rejected: Vec<Rejection>,
    /// The healthCheckNodePort this Service serves, if any.
    pub health_check: Option<(u16, HealthCheck)>,
}

/// The rejection of a claim that lost to an earlier Service's claim on the same frontend.
pub(super) fn conflict(service: &ObjectKey, claim: &Claim, owner: &ServicePortName) -> Rejection {
    Rejection {
        kind: "Service",
        object: service.to_string(),
        field: format!("spec.ports[{}]", claim.port_index),
        reason: format!("{} is already used by {owner}", claim.frontend),
    }
}

/// One Service's frontends, rejected ports and health check.
pub(super) fn service_output(checked: &CheckedService, slices: &[&CheckedSlice], node: &NodeContext) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    let mut local_endpoints = 0;
    for (i, port) in checked.ports.iter().enumerate() {
        let all_candidates = candidates(port, slices, &node.name);
        if port.protocol == super::Protocol::Sctp && all_candidates.iter().any(|c| c.endpoint.port != port.port) {
            // SCTP's CRC32c covers the ports but not the addresses: the data path translates addresses
            // only, and would have to recompute the whole checksum to change a port.
            out.rejected.push(Rejection {
                kind: "Service",
                object: format!("{}/{}", checked.namespace, checked.name),
                field: format!("spec.ports[{i}].targetPort"),
                reason: "SCTP with a targetPort different from port is not supported by the eBPF dataplane".into(),
            });
            continue;
        }
        // As kube-proxy's one proxier per family: a family's frontends use that family's endpoints only.
        let mut local_of_port = 0;
        for ipv6 in [false, true] {
            // A family's proxier serves only Services with a cluster IP of that family
            // (`GetClusterIPByFamily`): an IPv4-only Service gets no NodePort on the node's IPv6 addresses,
            // and an IPv6 external or load-balancer IP of it is ignored.
            if !checked.cluster_ips.iter().any(|ip| ip.is_ipv6() == ipv6) {
                continue;
            }
            let frontends: Vec<(Frontend, FrontendKind)> = frontends_of(checked, port, &node.node_port_addrs)
                .into_iter()
                .filter(|(f, _)| f.addr.is_ipv6() == ipv6)
                .collect();
            if frontends.is_empty() {
                continue;
            }
            let candidates: Vec<&Candidate> =
                all_candidates.iter().filter(|c| c.endpoint.addr.is_ipv6() == ipv6).collect();
            let sets = Sets::of(&candidates, node.zone.as_deref(), &node.name);
            // kube-proxy's count (`LocalReadyEndpoints`): ready local endpoints, summed over the Service's
            // ports. Terminating ones do not count even where they still take traffic, so a load balancer
            // drains a node whose endpoints are all going away. A dual-stack pod is one endpoint of each
            // family: the larger family's count is the number of pods.
            local_of_port = local_of_port.max(candidates.iter().filter(|c| c.endpoint.local && c.ready).count());
            for (frontend, kind) in frontends {
                let entry = entry_for(checked, port, kind, &sets, node, ipv6);
                out.claims.push(Claim { frontend, port_index: i, entry });
            }
        }
        local_endpoints += local_of_port;
    }
    if let Some(port) = checked.health_check_node_port
        && checked.external_policy == TrafficPolicy::Local
        && matches!(checked.type_, ServiceType::LoadBalancer | ServiceType::NodePort)
    {
        let service = format!("{}/{}", checked.namespace, checked.name);
        out.health_check = Some((port, HealthCheck { service, local_endpoints }));
    }
    out
}

/// The zone of this node, from its Node object's `topology.kubernetes.io/zone` label.
fn node_zone(state: &ClusterState, node: &str) -> Option<String> {
    state.nodes.get(node)?.metadata.labels.as_ref()?.get("topology.kubernetes.io/zone").cloned()
}

/// Every address one Service port is reachable at, and how.
fn frontends_of(
    svc: &CheckedService,
    port: &CheckedServicePort,
    node_addrs: &[IpAddr],
) -> Vec<(Frontend, FrontendKind)> {
    if svc.type_ == ServiceType::ExternalName {
        return Vec::new();
    }
    let at =
        |addr: IpAddr, port_number: u16, kind| (Frontend { addr, port: port_number, protocol: port.protocol }, kind);
    let mut out: Vec<_> = svc.cluster_ips.iter().map(|a| at(*a, port.port, FrontendKind::ClusterIp)).collect();
    if let Some(node_port) =
        port.node_port.filter(|_| matches!(svc.type_, ServiceType::NodePort | ServiceType::LoadBalancer))
    {
        out.extend(node_addrs.iter().map(|a| at(*a, node_port, FrontendKind::NodePort)));
    }
    out.extend(svc.external_ips.iter().map(|a| at(*a, port.port, FrontendKind::ExternalIp)));
    if svc.type_ == ServiceType::LoadBalancer {
        out.extend(svc.load_balancer_ips.iter().map(|a| at(*a, port.port, FrontendKind::LoadBalancer)));
    }
    out
}

/// `loadBalancerSourceRanges` as kube-proxy applies them: when the node's primary address is inside a range,
/// the load-balancer IPs themselves are allowed too. A load balancer that hairpins a node's own request to
/// its VIP (or a VIP the node holds as a local address) delivers it with the VIP as its source.
/// Per family, as kube-proxy's proxiers: an IPv6 load-balancer IP is guarded by the IPv6 ranges only, so a
/// Service listing only IPv4 ranges leaves its IPv6 load-balancer IPs open, as with kube-proxy.
fn source_ranges(svc: &CheckedService, node: &NodeContext, ipv6: bool) -> Vec<super::Cidr> {
    let mut ranges: Vec<super::Cidr> = svc.source_ranges.iter().copied().filter(|(n, _)| n.is_ipv6() == ipv6).collect();
    let primary = node.primary_addrs.iter().copied().find(|a| a.is_ipv6() == ipv6);
    if primary.is_some_and(|a| ranges.iter().any(|r| super::in_cidr(a, *r))) {
        let host = if ipv6 { 128 } else { 32 };
        ranges.extend(svc.load_balancer_ips.iter().filter(|ip| ip.is_ipv6() == ipv6).map(|ip| (*ip, host)));
    }
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

fn entry_for(
    svc: &CheckedService,
    port: &CheckedServicePort,
    kind: FrontendKind,
    sets: &Sets,
    node: &NodeContext,
    ipv6: bool,
) -> FrontendEntry {
    let service = ServicePortName { namespace: svc.namespace.clone(), name: svc.name.clone(), port: port.name.clone() };
    let cluster_wide = !sets.usable.is_empty();
    let local_policy = |policy: TrafficPolicy| {
        let set = if policy == TrafficPolicy::Local { &sets.local } else { &sets.cluster };
        // An empty set is refused at once only if the Service has no usable endpoint anywhere; if a Local
        // policy filtered remote endpoints out, the traffic is dropped, as kube-proxy does.
        BackendSet { endpoints: set.endpoints.clone(), reject_when_empty: !cluster_wide }
    };
    let (external, internal) = match kind {
        // internalTrafficPolicy applies to all ClusterIP traffic, from pods and from outside alike: kube-proxy
        // sends every packet to a ClusterIP through the internal policy's chain (outside traffic is also
        // masqueraded, see `masquerade_external`).
        FrontendKind::ClusterIp => (local_policy(svc.internal_policy), local_policy(svc.internal_policy)),
        // externalTrafficPolicy applies to external traffic; pods and the node reach every endpoint.
        _ => (local_policy(svc.external_policy), local_policy(TrafficPolicy::Cluster)),
    };
    FrontendEntry {
        service,
        kind,
        external,
        internal,
        terminating: sets.terminating.clone(),
        masquerade_external: kind == FrontendKind::ClusterIp || svc.external_policy == TrafficPolicy::Cluster,
        affinity_timeout: svc.affinity_timeout,
        lb_algorithm: svc.lb_algorithm,
        source_ranges: if kind == FrontendKind::LoadBalancer { source_ranges(svc, node, ipv6) } else { Vec::new() },
    }
}

/// One endpoint address for one Service port, with what kube-proxy looks at.
struct Candidate {
    endpoint: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Option<Vec<String>>,
    node_hints: Option<Vec<String>>,
}

/// The EndpointSlice port whose name and protocol match the Service port carries the resolved target
/// port; this is how kube-proxy resolves named and numbered targetPorts alike.
fn candidates(port: &CheckedServicePort, slices: &[&CheckedSlice], node: &str) -> Vec<Candidate> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(slice_port) = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol) else {
            continue;
        };
        for ep in &slice.endpoints {
            let local = ep.node_name.as_deref() == Some(node);
            out.extend(ep.addresses.iter().map(|addr| Candidate {
                endpoint: Endpoint { addr: *addr, port: slice_port.port, local },
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                zone_hints: ep.zone_hints.clone(),
                node_hints: ep.node_hints.clone(),
            }));
        }
    }
    out
}

/// The endpoint sets of one Service port.
struct Sets {
    /// Usable anywhere: ready ones, or if none is ready, the serving-and-terminating ones.
    usable: Vec<Endpoint>,
    /// `usable`, narrowed by topology hints where kube-proxy would narrow it.
    cluster: BackendSet,
    /// This node's: ready ones, or if none is ready here, serving-and-terminating ones here.
    local: BackendSet,
    /// Serving and terminating but not used for new flows: kept for established ones.
    terminating: Vec<Endpoint>,
}

impl Sets {
    fn of(candidates: &[&Candidate], zone: Option<&str>, node: &str) -> Self {
        let pick = |filter: &dyn Fn(&Candidate) -> bool| -> Vec<&Candidate> {
            let ready: Vec<&Candidate> = candidates.iter().copied().filter(|c| c.ready && filter(c)).collect();
            if ready.is_empty() {
                candidates.iter().copied().filter(|c| c.serving && c.terminating && filter(c)).collect()
            } else {
                ready
            }
        };
        let usable = pick(&|_| true);
        let local = pick(&|c| c.endpoint.local);
        let cluster = topology_filter(&usable, zone, node);
        let endpoints = |cs: &[&Candidate]| sorted(cs.iter().map(|c| c.endpoint).collect());
        let in_use = endpoints(&usable);
        let terminating = sorted(
            candidates
                .iter()
                .filter(|c| c.serving && c.terminating && !in_use.contains(&c.endpoint))
                .map(|c| c.endpoint)
                .collect(),
        );
        Self {
            cluster: BackendSet { endpoints: endpoints(&cluster), reject_when_empty: false },
            local: BackendSet { endpoints: endpoints(&local), reject_when_empty: false },
            usable: in_use,
            terminating,
        }
    }
}

fn sorted(mut v: Vec<Endpoint>) -> Vec<Endpoint> {
    v.sort_unstable();
    v.dedup();
    v
}

/// kube-proxy's topology-aware routing: if every usable endpoint carries hints and some hint names this node
/// (`forNodes`) or its zone (`forZones`), only those endpoints are used; otherwise all of them are.
fn topology_filter<'a>(usable: &[&'a Candidate], zone: Option<&str>, node: &str) -> Vec<&'a Candidate> {
    let by_node: Vec<&Candidate> =
        usable.iter().copied().filter(|c| c.node_hints.as_ref().is_some_and(|h| h.iter().any(|n| n == node))).collect();
    if !by_node.is_empty() && usable.iter().all(|c| c.node_hints.is_some()) {
        return by_node;
    }
    let Some(zone) = zone else { return usable.to_vec() };
    if usable.is_empty() || !usable.iter().all(|c| c.zone_hints.is_some()) {
        return usable.to_vec();
    }
    let by_zone: Vec<&Candidate> =
        usable.iter().copied().filter(|c| c.zone_hints.as_ref().is_some_and(|h| h.iter().any(|z| z == zone))).collect();
    if by_zone.is_empty() { usable.to_vec() } else { by_zone }
}
