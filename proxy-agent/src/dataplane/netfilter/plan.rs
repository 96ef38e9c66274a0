//! kube-proxy's decisions for the netfilter modes, made once: a typed plan of chains, rules (matches →
//! verdict) and frontend dispatch, built from the service table. The iptables and nftables printers turn
//! the same plan into their own syntax; neither decides anything about Services.
//!
//! Per Service port the plan holds kube-proxy's chains: the service chain (every usable endpoint), the
//! local chain (Local policies), the external chain (where NodePort, external and load-balancer traffic
//! enters: masquerade or not), the firewall chain (load-balancer source ranges) and one endpoint chain per
//! endpoint with its DNAT. Node-wide it holds where each frontend's new packets go first, the frontends
//! without an endpoint (reject or drop), and the ClusterIPs and service CIDRs for the cluster-IPs check.

use std::{collections::BTreeMap, net::IpAddr};

use super::{Family, RuleConfig, ServicePort};
pub use crate::model::Cidr;
use crate::model::{
    BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, Protocol, ServicePortName, ServiceTable,
};

/// One chain of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortChain {
    /// Every usable endpoint (kube-proxy's `KUBE-SVC-`).
    Service,
    /// The local endpoints only, for Local policies (`KUBE-SVL-`).
    Local,
    /// Where external traffic enters (`KUBE-EXT-`).
    External,
    /// A load-balancer IP's source-range check (`KUBE-FW-`).
    Firewall,
    /// One endpoint's DNAT (`KUBE-SEP-`).
    Endpoint(Endpoint),
}

/// What a rule matches; a rule matches when all of its matches do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Addressed to this frontend: destination address, protocol and port.
    Frontend(Frontend),
    /// Of this protocol (a DNAT to a port needs one).
    Protocol(Protocol),
    /// From this network.
    Source(Cidr),
    /// Not from this network.
    NotSource(Cidr),
    /// From one of these networks.
    SourceIn(Vec<Cidr>),
    /// Arrived on an interface this pattern matches (`veth*`: any suffix).
    InInterface(String),
    /// Arrived on none of the pod interfaces ([`Plan::pod_interfaces`]).
    NotFromPodInterface,
    /// From an address of this node.
    SourceLocal,
    /// Taken with probability 1/n.
    OneIn(usize),
    /// The client's last new flow went to this endpoint less than `seconds` ago (session affinity).
    AffinityHit { endpoint: Endpoint, seconds: u32 },
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Continue in this chain of the same Service port; nothing comes back.
    Goto(PortChain),
    /// Mark the packet for masquerade and go on with the next rule.
    MarkMasquerade,
    /// Drop the packet.
    Drop,
    /// DNAT to the endpoint, remembering the client for this many seconds under session affinity.
    Dnat { endpoint: Endpoint, affinity: Option<u32> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    /// Shown with the rule where the backend keeps rule comments (iptables).
    pub comment: Option<String>,
}

impl Rule {
    fn new(matches: Vec<Match>, verdict: Verdict, comment: impl Into<Option<String>>) -> Self {
        Self { matches, verdict, comment: comment.into() }
    }
}

/// The chains of one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPlan {
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub chains: BTreeMap<PortChain, Vec<Rule>>,
}

/// Where a frontend's new packets go first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub frontend: Frontend,
    pub kind: FrontendKind,
    /// Index of the Service port in [`Plan::ports`].
    pub port: usize,
    pub target: PortChain,
}

/// A frontend without an endpoint to go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoEndpoint {
    pub frontend: Frontend,
    pub kind: FrontendKind,
    /// Index of the Service port in [`Plan::ports`].
    pub port: usize,
    /// Refused (no endpoint anywhere), else dropped (a Local policy left none here).
    pub reject: bool,
}

/// Everything the netfilter modes install for one family, decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Every address in the plan is of this family.
    pub family: Family,
    pub ports: Vec<PortPlan>,
    /// In kube-proxy's rule order: Service ports in order, each one's frontends in order.
    pub dispatch: Vec<Dispatch>,
    /// Checked after DNAT, in the same order.
    pub no_endpoints: Vec<NoEndpoint>,
    /// Every ClusterIP, with the first Service port that holds it: a new packet still addressed to one
    /// after DNAT used a port or protocol no Service defines, and is refused.
    pub cluster_ips: BTreeMap<IpAddr, usize>,
    /// Addresses in these networks that no Service holds are dropped, not routed.
    pub service_cidrs: Vec<Cidr>,
    /// The packet-mark bit that asks for masquerade, as a mask.
    pub masquerade_mark: u32,
    /// Forwarded packets conntrack finds INVALID are dropped (unless conntrack is liberal).
    pub drop_invalid: bool,
    /// The pod interface patterns, for [`Match::NotFromPodInterface`].
    pub pod_interfaces: Vec<String>,
}

impl Plan {
    /// Whether some Service port has a firewall chain (its drops need the backend's drop machinery).
    #[must_use]
    pub fn has_firewall(&self) -> bool {
        self.ports.iter().any(|p| p.chains.contains_key(&PortChain::Firewall))
    }
}

/// A frontend's label in kube-proxy's rule comments.
#[must_use]
pub fn kind_label(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "cluster IP",
        FrontendKind::NodePort => "nodePort",
        FrontendKind::ExternalIp => "external IP",
        FrontendKind::LoadBalancer => "loadbalancer IP",
    }
}

/// Builds the plan of `family`'s half of `table`.
#[must_use]
pub fn build(table: &ServiceTable, config: &RuleConfig, family: Family) -> Plan {
    let mut plan = Plan {
        family,
        ports: Vec::new(),
        dispatch: Vec::new(),
        no_endpoints: Vec::new(),
        cluster_ips: BTreeMap::new(),
        service_cidrs: table
            .service_cidrs
            .iter()
            .copied()
            .filter(|(net, _)| net.is_ipv6() == family.is_ipv6())
            .collect(),
        masquerade_mark: config.masq_mark(),
        drop_invalid: !config.tcp_be_liberal,
        pod_interfaces: config.pod_interface_patterns().map(str::to_owned).collect(),
    };
    for sp in &super::service_ports(table, family) {
        let index = plan.ports.len();
        let cluster_cidr = config.cluster_cidrs.of_family(family.is_ipv6());
        let mut builder = PortBuilder { config, cluster_cidr, sp, index, plan: &mut plan, chains: BTreeMap::new() };
        builder.build();
        let chains = builder.chains;
        plan.ports.push(PortPlan { name: sp.name.clone(), protocol: sp.protocol, chains });
    }
    plan
}

/// Decides one Service port's chains and its frontends' dispatch.
struct PortBuilder<'a, 'p> {
    config: &'a RuleConfig,
    /// The pods' network of the plan's family.
    cluster_cidr: Option<Cidr>,
    sp: &'a ServicePort<'a>,
    index: usize,
    plan: &'p mut Plan,
    chains: BTreeMap<PortChain, Vec<Rule>>,
}

impl PortBuilder<'_, '_> {
    fn build(&mut self) {
        let sp = self.sp;
        let affinity = sp.affinity();
        self.balancing(PortChain::Service, &sp.cluster_set().endpoints, affinity);
        // The local chain, for internalTrafficPolicy Local on the ClusterIP or externalTrafficPolicy Local.
        if sp.uses_local() {
            self.balancing(PortChain::Local, &sp.local_endpoints(), affinity);
        }
        let comment = sp.name.to_string();
        let host = self.plan.family.host_len();
        for ep in sp.all_endpoints() {
            let rules = vec![
                // Hairpin: an endpoint reaching itself through the Service must see the node, not itself.
                Rule::new(vec![Match::Source((ep.addr, host))], Verdict::MarkMasquerade, comment.clone()),
                Rule::new(
                    vec![Match::Protocol(sp.protocol)],
                    Verdict::Dnat { endpoint: ep, affinity },
                    comment.clone(),
                ),
            ];
            self.chains.insert(PortChain::Endpoint(ep), rules);
        }
        let cluster = sp.cluster_set().clone();
        for (f, e) in &sp.entries {
            if e.kind == FrontendKind::ClusterIp {
                self.cluster_ip(*f, e, &cluster);
            } else {
                self.external(*f, e);
            }
        }
        if let Some(e) = sp.external_entry() {
            self.external_chain(e.masquerade_external);
        }
    }

    /// A chain that spreads new flows evenly over `endpoints`, keeping affinity clients where they were.
    fn balancing(&mut self, chain: PortChain, endpoints: &[Endpoint], affinity: Option<u32>) {
        let comment = |ep: &Endpoint| format!("{} -> {ep}", self.sp.name);
        let mut rules = Vec::new();
        if let Some(seconds) = affinity {
            for ep in endpoints {
                let hit = Match::AffinityHit { endpoint: *ep, seconds };
                rules.push(Rule::new(vec![hit], Verdict::Goto(PortChain::Endpoint(*ep)), comment(ep)));
            }
        }
        // Endpoint i of n is taken with probability 1/(n-i) among those left: uniform overall.
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let matches = if i + 1 < n { vec![Match::OneIn(n - i)] } else { Vec::new() };
            rules.push(Rule::new(matches, Verdict::Goto(PortChain::Endpoint(*ep)), comment(ep)));
        }
        self.chains.insert(chain, rules);
    }

    fn no_endpoint(&mut self, f: Frontend, kind: FrontendKind, set: &BackendSet) {
        self.plan.no_endpoints.push(NoEndpoint { frontend: f, kind, port: self.index, reject: set.reject_when_empty });
    }

    fn cluster_ip(&mut self, f: Frontend, e: &FrontendEntry, cluster: &BackendSet) {
        self.plan.cluster_ips.entry(f.addr).or_insert(self.index);
        if e.internal.endpoints.is_empty() {
            self.no_endpoint(f, e.kind, &e.internal);
            return;
        }
        // The internal set is the cluster set unless internalTrafficPolicy is Local.
        let target = if e.internal.endpoints == cluster.endpoints { PortChain::Service } else { PortChain::Local };
        self.plan.dispatch.push(Dispatch { frontend: f, kind: e.kind, port: self.index, target });
        // As kube-proxy: in the chain ClusterIP traffic goes to (the local one under internalTrafficPolicy
        // Local), masquerade all of it with masqueradeAll, else what does not come from a pod (it may have
        // to leave the node again, and its replies must come back here).
        // (Without a cluster CIDR or pod interfaces nothing tells pod traffic apart: none is masqueraded.)
        let not_from_pods = if self.config.masquerade_all {
            Some(None)
        } else if let Some(cidr) = self.cluster_cidr {
            Some(Some(Match::NotSource(cidr)))
        } else if !self.plan.pod_interfaces.is_empty() {
            Some(Some(Match::NotFromPodInterface))
        } else {
            None
        };
        if let Some(extra) = not_from_pods {
            let mut matches = vec![Match::Frontend(f)];
            matches.extend(extra);
            let masq = Rule::new(matches, Verdict::MarkMasquerade, format!("{} cluster IP", self.sp.name));
            self.chains.get_mut(&target).expect("balancing chains come first").insert(0, masq);
        }
    }

    fn external(&mut self, f: Frontend, e: &FrontendEntry) {
        if e.external.endpoints.is_empty() {
            self.no_endpoint(f, e.kind, &e.external);
        }
        let target = if e.source_ranges.is_empty() {
            PortChain::External
        } else {
            let comment = format!("{} {}", self.sp.name, kind_label(e.kind));
            let rules = vec![
                Rule::new(
                    vec![Match::SourceIn(e.source_ranges.clone())],
                    Verdict::Goto(PortChain::External),
                    comment.clone(),
                ),
                Rule::new(Vec::new(), Verdict::Drop, comment),
            ];
            self.chains.insert(PortChain::Firewall, rules);
            PortChain::Firewall
        };
        self.plan.dispatch.push(Dispatch { frontend: f, kind: e.kind, port: self.index, target });
    }

    /// Where external traffic enters: masquerade under policy Cluster; under Local, pod and node traffic
    /// still reach every endpoint and the rest only local ones.
    fn external_chain(&mut self, masquerade_external: bool) {
        let spn = &self.sp.name;
        let service = Verdict::Goto(PortChain::Service);
        let mut rules = Vec::new();
        if masquerade_external {
            let comment = format!("masquerade traffic for {spn} external destinations");
            rules.push(Rule::new(Vec::new(), Verdict::MarkMasquerade, comment));
            rules.push(Rule::new(Vec::new(), service, None));
        } else {
            let pods = format!("pod traffic for {spn} external destinations");
            if let Some(cidr) = self.cluster_cidr {
                rules.push(Rule::new(vec![Match::Source(cidr)], service, pods.clone()));
            }
            for pattern in &self.plan.pod_interfaces {
                rules.push(Rule::new(vec![Match::InInterface(pattern.clone())], service, pods.clone()));
            }
            let masq = format!("masquerade LOCAL traffic for {spn} external destinations");
            let route = format!("route LOCAL traffic for {spn} external destinations");
            rules.push(Rule::new(vec![Match::SourceLocal], Verdict::MarkMasquerade, masq));
            rules.push(Rule::new(vec![Match::SourceLocal], service, route));
            rules.push(Rule::new(Vec::new(), Verdict::Goto(PortChain::Local), None));
        }
        self.chains.insert(PortChain::External, rules);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::ClusterCidrs;
    use crate::model::{BackendSet, Endpoint};

    fn ep(last: u8, local: bool) -> Endpoint {
        Endpoint { addr: Ipv4Addr::new(10, 200, 1, last).into(), port: 8080, local }
    }

    fn set(endpoints: Vec<Endpoint>) -> BackendSet {
        BackendSet { reject_when_empty: endpoints.is_empty(), endpoints }
    }

    fn entry(kind: FrontendKind, external: Vec<Endpoint>, internal: Vec<Endpoint>) -> FrontendEntry {
        FrontendEntry {
            service: ServicePortName { namespace: "default".into(), name: "web".into(), port: "http".into() },
            kind,
            external: set(external),
            internal: set(internal),
            terminating: Vec::new(),
            masquerade_external: true,
            affinity_timeout: None,
            lb_algorithm: None,
            source_ranges: Vec::new(),
        }
    }

    fn frontend(a: u8, b: u8, port: u16) -> Frontend {
        Frontend { addr: Ipv4Addr::new(10, a, 0, b).into(), port, protocol: Protocol::Tcp }
    }

    /// kube-proxy's decisions for one port with every frontend kind: an internalTrafficPolicy Local
    /// ClusterIP, externalTrafficPolicy Local on a NodePort and a load-balancer IP with source ranges.
    #[test]
    fn one_port_with_local_policies_and_source_ranges() {
        let all = vec![ep(2, true), ep(3, false)];
        let mut t = ServiceTable::default();
        let (cip, np, lb) = (frontend(32, 20, 80), frontend(240, 11, 30080), frontend(250, 1, 80));
        t.frontends.insert(cip, entry(FrontendKind::ClusterIp, vec![ep(2, true)], vec![ep(2, true)]));
        let mut external = entry(FrontendKind::NodePort, vec![ep(2, true)], all.clone());
        external.masquerade_external = false;
        t.frontends.insert(np, external.clone());
        external.kind = FrontendKind::LoadBalancer;
        external.source_ranges = vec![(Ipv4Addr::new(192, 0, 2, 0).into(), 24)];
        t.frontends.insert(lb, external);
        let pods: Cidr = (Ipv4Addr::new(10, 200, 0, 0).into(), 16);
        let config = RuleConfig { cluster_cidrs: ClusterCidrs::new(&[pods]).unwrap(), ..RuleConfig::default() };
        let plan = build(&t, &config, Family::V4);
        assert_eq!(plan.ports.len(), 1);
        let chains = &plan.ports[0].chains;
        let targets: Vec<(Frontend, PortChain)> = plan.dispatch.iter().map(|d| (d.frontend, d.target)).collect();
        assert_eq!(targets, [(cip, PortChain::Local), (np, PortChain::External), (lb, PortChain::Firewall)]);
        // The ClusterIP's masquerade rule heads the chain its traffic goes to.
        assert_eq!(chains[&PortChain::Local][0].matches, [Match::Frontend(cip), Match::NotSource(pods)]);
        assert_eq!(chains[&PortChain::Service].len(), 2, "every endpoint");
        assert_eq!(chains[&PortChain::Local].len(), 2, "the masquerade rule and the one local endpoint");
        let external = &chains[&PortChain::External];
        assert_eq!(external.first().unwrap().matches, [Match::Source(pods)]);
        assert_eq!(external.last().unwrap().verdict, Verdict::Goto(PortChain::Local), "outside traffic: local only");
        let firewall = &chains[&PortChain::Firewall];
        assert_eq!(firewall[0].verdict, Verdict::Goto(PortChain::External));
        assert_eq!(firewall[1].verdict, Verdict::Drop);
        assert!(plan.has_firewall());
        let endpoint_chains = chains.keys().filter(|c| matches!(c, PortChain::Endpoint(_))).count();
        assert_eq!(endpoint_chains, 2);
        assert_eq!(plan.cluster_ips.keys().copied().collect::<Vec<_>>(), [cip.addr]);
        assert!(plan.no_endpoints.is_empty());
    }

    /// Without any endpoint the ClusterIP is refused and has no dispatch; a Local policy with no local
    /// endpoint drops at the external frontends, which still dispatch (pods and the node reach the others).
    #[test]
    fn frontends_without_endpoints_are_refused_or_dropped() {
        let mut t = ServiceTable::default();
        t.frontends.insert(frontend(32, 21, 80), entry(FrontendKind::ClusterIp, vec![], vec![]));
        let mut np = entry(FrontendKind::NodePort, vec![], vec![ep(3, false)]);
        np.external.reject_when_empty = false;
        np.masquerade_external = false;
        t.frontends.insert(frontend(240, 11, 30080), np);
        let plan = build(&t, &RuleConfig::default(), Family::V4);
        let verdicts: Vec<(FrontendKind, bool)> = plan.no_endpoints.iter().map(|n| (n.kind, n.reject)).collect();
        assert_eq!(verdicts, [(FrontendKind::ClusterIp, true), (FrontendKind::NodePort, false)]);
        let kinds: Vec<FrontendKind> = plan.dispatch.iter().map(|d| d.kind).collect();
        assert_eq!(kinds, [FrontendKind::NodePort]);
    }
}
