//! Renders the desired table as one nftables table of its own: a pure function, tested without a kernel.
//!
//! Every frontend is one element of a verdict map keyed by `address . protocol . port`, so finding a
//! Service costs one lookup however many there are (iptables walks a list). The element jumps to the
//! Service port's chains, which mirror the iptables mode's: `service-` (every usable endpoint, chosen by a
//! cascade of `numgen random` rules), `local-`
//! (local endpoints, for Local policies), `external-` (masquerade or not), `firewall-` (load-balancer source
//! ranges) and one `endpoint-` chain per endpoint with its DNAT. Frontends without an endpoint are elements
//! of a second map, checked in the filter hooks, that rejects or drops.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use super::naming;
use crate::{
    dataplane::netfilter::{self, RuleConfig, ServicePort},
    model::{BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind},
};

/// The table's family and name, as nft commands take them.
pub const TABLE: &str = "ip proxy-agent";
pub const TABLE_FAMILY: &str = "ip";
pub const TABLE_NAME: &str = "proxy-agent";

/// Frontends with somewhere to go.
pub const SERVICE_IPS: &str = "service-ips";
/// Frontends without an endpoint: reject or drop.
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
/// Every ClusterIP, whatever its ports: kube-proxy's `cluster-ips` set, as a verdict map here so it shares
/// the maps' element bookkeeping. A new packet still addressed to one after DNAT is refused.
pub const CLUSTER_IPS: &str = "cluster-ips";
/// The frontend maps' declaration.
pub const MAP_TYPE: &str = "type ipv4_addr . inet_proto . inet_service : verdict;";

/// The declaration of map `name`.
#[must_use]
pub fn map_type(name: &str) -> &'static str {
    if name == CLUSTER_IPS { "type ipv4_addr : verdict;" } else { MAP_TYPE }
}
/// An affinity set's declaration: client addresses, each forgotten after its own timeout.
pub const AFFINITY_SET_TYPE: &str = "type ipv4_addr; flags dynamic,timeout;";

/// One chain: its hook declaration if it is a base chain, and its rules in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub hook: Option<&'static str>,
    pub rules: Vec<String>,
}

/// A verdict map's elements: key → the rest of the element (comment and verdict).
pub type Elements = BTreeMap<String, String>;

/// Everything the table holds except the affinity sets' dynamic contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Chain>,
    pub maps: BTreeMap<&'static str, Elements>,
    pub sets: BTreeSet<String>,
}

impl Ruleset {
    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }

    #[must_use]
    pub fn element_count(&self) -> usize {
        self.maps.values().map(BTreeMap::len).sum()
    }
}

/// Left out with `--conntrack-tcp-be-liberal`, as the iptables mode leaves out its `KUBE-FORWARD` rule.
const DROP_INVALID: &str = "ct state invalid drop";

/// Base chains: where the kernel's hooks enter the table, and their rules.
const BASE_CHAINS: [(&str, &str, &[&str]); 6] = [
    ("nat-prerouting", "type nat hook prerouting priority dstnat; policy accept;", &["jump services"]),
    // nft 1.0.6 takes `dstnat` only on prerouting; -100 is the same priority.
    ("nat-output", "type nat hook output priority -100; policy accept;", &["jump services"]),
    ("nat-postrouting", "type nat hook postrouting priority srcnat; policy accept;", &["jump masquerading"]),
    // The filter hooks run after DNAT: a frontend still addressed here found no endpoint.
    ("filter-input", "type filter hook input priority filter; policy accept;", &["ct state new jump endpoints-check"]),
    (
        "filter-forward",
        "type filter hook forward priority filter; policy accept;",
        // A segment conntrack finds out of window is INVALID and skips NAT: let through, it would reach the
        // client from the backend's own address and the client's RST would kill the connection
        // (kubernetes/kubernetes#74839). The iptables mode drops these in KUBE-FORWARD, as kube-proxy's does.
        &[DROP_INVALID, "ct state new jump endpoints-check"],
    ),
    (
        "filter-output",
        "type filter hook output priority filter; policy accept;",
        &["ct state new jump endpoints-check"],
    ),
];

/// A frontend as a map key.
fn key(f: Frontend) -> String {
    format!("{} . {} . {}", f.addr, f.protocol.lower(), f.port)
}

/// Matches packets for one frontend, inside a rule.
fn matches(f: Frontend) -> String {
    format!("ip daddr {} meta l4proto {} th dport {}", f.addr, f.protocol.lower(), f.port)
}

/// The chains of one Service port.
struct PortChains {
    service: String,
    local: String,
    external: String,
    firewall: String,
}

struct Renderer<'a> {
    config: &'a RuleConfig,
    out: Ruleset,
}

impl<'a> Renderer<'a> {
    fn new(config: &'a RuleConfig) -> Self {
        let mut out = Ruleset::default();
        for (name, hook, rules) in BASE_CHAINS {
            let wanted = |r: &&&str| !(config.tcp_be_liberal && **r == DROP_INVALID);
            let rules = rules.iter().filter(wanted).map(|r| (*r).to_owned()).collect();
            out.chains.insert(name.into(), Chain { hook: Some(hook), rules });
        }
        let mark = config.masq_mark();
        let fixed: [(&str, Vec<String>); 5] = [
            ("services", vec![format!("ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}")]),
            ("endpoints-check", vec![format!("ip daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}")]),
            ("reject-chain", vec!["reject".into()]),
            ("mark-for-masquerade", vec![format!("meta mark set meta mark | {mark:#x}")]),
            (
                "masquerading",
                vec![
                    format!("meta mark & {mark:#x} == 0 return"),
                    format!("meta mark set meta mark ^ {mark:#x}"),
                    "masquerade fully-random".into(),
                ],
            ),
        ];
        for (name, rules) in fixed {
            out.chains.insert(name.into(), Chain { hook: None, rules });
        }
        out.maps.insert(SERVICE_IPS, Elements::new());
        out.maps.insert(NO_ENDPOINT_SERVICES, Elements::new());
        out.maps.insert(CLUSTER_IPS, Elements::new());
        for base in ["filter-forward", "filter-output"] {
            out.chains.get_mut(base).expect("base chain").rules.push("ct state new jump cluster-ips-check".into());
        }
        Self { config, out }
    }

    fn chain(&mut self, name: &str) -> &mut Vec<String> {
        &mut self.out.chains.entry(name.to_owned()).or_insert(Chain { hook: None, rules: Vec::new() }).rules
    }

    fn element(&mut self, map: &'static str, f: Frontend, comment: &str, verdict: &str) {
        self.out.maps.get_mut(map).expect("declared").insert(key(f), format!("comment \"{comment}\" : {verdict}"));
    }

    /// A chain that spreads new flows evenly over `endpoints`, keeping affinity clients where they were.
    fn balancing_chain(&mut self, chain: &str, sp: &ServicePort<'_>, endpoints: &[Endpoint]) {
        let targets: Vec<String> =
            endpoints.iter().map(|ep| naming::endpoint_chain(sp.name, sp.protocol, *ep)).collect();
        let mut rules = Vec::new();
        if sp.affinity().is_some() {
            for ep in endpoints {
                let set = naming::affinity_set(sp.name, sp.protocol, *ep);
                let target = naming::endpoint_chain(sp.name, sp.protocol, *ep);
                rules.push(format!("ip saddr @{set} goto {target}"));
            }
        }
        // Endpoint i of n is taken with probability 1/(n-i) among those left: uniform overall, as kube-proxy's
        // iptables rules do. Not one `numgen random mod n vmap { … }` per Service: each such rule is an
        // anonymous set, and the kernel's cost of adding them grows faster than linearly (measured: 10k
        // Services × 10 endpoints took over 4 minutes that way, 7 s this way).
        let n = targets.len();
        for (i, target) in targets.iter().enumerate() {
            if i + 1 < n {
                rules.push(format!("numgen random mod {} 0 goto {target}", n - i));
            } else {
                rules.push(format!("goto {target}"));
            }
        }
        self.chain(chain).extend(rules);
    }

    fn endpoint_chains(&mut self, sp: &ServicePort<'_>) {
        for ep in &sp.all_endpoints() {
            let chain = naming::endpoint_chain(sp.name, sp.protocol, *ep);
            let mut rules = vec![format!("ip saddr {} jump mark-for-masquerade", ep.addr)];
            if let Some(seconds) = sp.affinity() {
                let set = naming::affinity_set(sp.name, sp.protocol, *ep);
                rules.push(format!("update @{set} {{ ip saddr timeout {seconds}s }}"));
                self.out.sets.insert(set);
            }
            rules.push(format!("meta l4proto {} dnat to {}:{}", sp.protocol.lower(), ep.addr, ep.port));
            self.out.chains.insert(chain, Chain { hook: None, rules });
        }
    }

    /// The element that rejects (no endpoint anywhere) or drops (a Local policy left none).
    fn no_endpoint(&mut self, sp: &ServicePort<'_>, f: Frontend, set: &BackendSet) {
        let (why, verdict) = if set.reject_when_empty {
            ("has no endpoints", "goto reject-chain")
        } else {
            ("has no local endpoints", "drop")
        };
        self.element(NO_ENDPOINT_SERVICES, f, &format!("{} {why}", sp.name), verdict);
    }

    /// Records `f`'s address in [`CLUSTER_IPS`] (the first Service port to claim it names it).
    fn cluster_ip_known(&mut self, sp: &ServicePort<'_>, f: Frontend) {
        let element = format!("comment \"{} cluster IP\" : goto reject-chain", sp.name);
        self.out.maps.get_mut(CLUSTER_IPS).expect("declared").entry(f.addr.to_string()).or_insert(element);
    }

    fn cluster_ip(&mut self, sp: &ServicePort<'_>, f: Frontend, e: &FrontendEntry, chains: &PortChains) {
        self.cluster_ip_known(sp, f);
        if e.internal.endpoints.is_empty() {
            self.no_endpoint(sp, f, &e.internal);
            return;
        }
        // The internal set is the cluster set unless internalTrafficPolicy is Local.
        let target = if e.internal.endpoints == sp.cluster_set().endpoints { &chains.service } else { &chains.local };
        self.element(SERVICE_IPS, f, &format!("{} cluster IP", sp.name), &format!("goto {target}"));
        // As kube-proxy: in the chain ClusterIP traffic goes to (the local one under internalTrafficPolicy
        // Local), masquerade all of it with masqueradeAll, else what does not come from a pod (it may have
        // to leave the node again, and its replies must come back here).
        // (Without a cluster CIDR or pod interfaces nothing tells pod traffic apart: none is masqueraded.)
        let m = matches(f);
        let masq = if self.config.masquerade_all {
            Some(format!("{m} jump mark-for-masquerade"))
        } else if let Some((net, len)) = self.config.cluster_cidr {
            Some(format!("{m} ip saddr != {net}/{len} jump mark-for-masquerade"))
        } else {
            let not_pod = self.config.pod_interface_patterns().fold(String::new(), |mut out, p| {
                let _ = write!(out, "iifname != \"{p}\" ");
                out
            });
            (!not_pod.is_empty()).then(|| format!("{m} {not_pod}jump mark-for-masquerade"))
        };
        if let Some(masq) = masq {
            let target = target.clone();
            self.chain(&target).insert(0, masq);
        }
    }

    fn external(&mut self, sp: &ServicePort<'_>, f: Frontend, e: &FrontendEntry, chains: &PortChains) {
        if e.external.endpoints.is_empty() {
            self.no_endpoint(sp, f, &e.external);
        }
        let target = if e.source_ranges.is_empty() {
            &chains.external
        } else {
            let ranges: Vec<String> = e.source_ranges.iter().map(|(net, len)| format!("{net}/{len}")).collect();
            let rules = vec![format!("ip saddr {{ {} }} goto {}", ranges.join(", "), chains.external), "drop".into()];
            self.out.chains.insert(chains.firewall.clone(), Chain { hook: None, rules });
            &chains.firewall
        };
        let comment = format!("{} {}", sp.name, netfilter::kind_label(e.kind));
        self.element(SERVICE_IPS, f, &comment, &format!("goto {target}"));
    }

    /// Where external traffic enters: masquerade under policy Cluster; under Local, pod and node traffic
    /// still reach every endpoint and the rest only local ones.
    fn external_chain(&mut self, masquerade_external: bool, chains: &PortChains) {
        let PortChains { service, local, external, .. } = chains;
        let mut rules = Vec::new();
        if masquerade_external {
            rules.push("jump mark-for-masquerade".into());
            rules.push(format!("goto {service}"));
        } else {
            if let Some((net, len)) = self.config.cluster_cidr {
                rules.push(format!("ip saddr {net}/{len} goto {service}"));
            }
            // nftables spells "any suffix" with a trailing `*`, as the flag does.
            for pattern in self.config.pod_interface_patterns() {
                rules.push(format!("iifname \"{pattern}\" goto {service}"));
            }
            rules.push("fib saddr type local jump mark-for-masquerade".into());
            rules.push(format!("fib saddr type local goto {service}"));
            rules.push(format!("goto {local}"));
        }
        self.out.chains.insert(external.clone(), Chain { hook: None, rules });
    }

    fn service_port(&mut self, sp: &ServicePort<'_>) {
        let chains = PortChains {
            service: naming::service_chain(sp.name, sp.protocol),
            local: naming::local_chain(sp.name, sp.protocol),
            external: naming::external_chain(sp.name, sp.protocol),
            firewall: naming::firewall_chain(sp.name, sp.protocol),
        };
        let cluster = sp.cluster_set().endpoints.clone();
        self.chain(&chains.service);
        self.balancing_chain(&chains.service, sp, &cluster);
        if sp.uses_local() {
            self.chain(&chains.local);
            self.balancing_chain(&chains.local, sp, &sp.local_endpoints());
        }
        self.endpoint_chains(sp);
        for (f, e) in &sp.entries {
            if e.kind == FrontendKind::ClusterIp {
                self.cluster_ip(sp, *f, e, &chains);
            } else {
                self.external(sp, *f, e, &chains);
            }
        }
        if let Some(e) = sp.external_entry() {
            self.external_chain(e.masquerade_external, &chains);
        }
    }
}

/// kube-proxy's `cluster-ips-check`, after DNAT in the forward and output hooks: what is still addressed to
/// a ClusterIP used a port or protocol no Service defines (refused, by [`CLUSTER_IPS`]); an address of the
/// service CIDRs that no Service holds is dropped. Neither leaves by the default route.
fn cluster_ips_check(service_cidrs: &[(std::net::Ipv4Addr, u8)]) -> Chain {
    let mut rules = vec![format!("ip daddr vmap @{CLUSTER_IPS}")];
    if !service_cidrs.is_empty() {
        let cidrs: Vec<String> = service_cidrs.iter().map(|(net, len)| format!("{net}/{len}")).collect();
        rules.push(format!("ip daddr {{ {} }} drop", cidrs.join(", ")));
    }
    Chain { hook: None, rules }
}

/// Renders the table's ruleset.
#[must_use]
pub fn render(table: &crate::model::ServiceTable, config: &RuleConfig) -> Ruleset {
    let mut renderer = Renderer::new(config);
    for sp in &netfilter::service_ports(table) {
        renderer.service_port(sp);
    }
    renderer.out.chains.insert("cluster-ips-check".into(), cluster_ips_check(&table.service_cidrs));
    renderer.out
}
