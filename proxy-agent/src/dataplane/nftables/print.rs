//! Prints a [`Plan`] as one nftables table of its own: a pure function, tested without a kernel.
//!
//! Every frontend of the plan's dispatch is one element of a verdict map keyed by
//! `address . protocol . port`, so finding a Service costs one lookup however many there are (iptables
//! walks a list). The element jumps to the Service port's chains: `service-` (endpoints chosen by a cascade
//! of `numgen random` rules), `local-`, `external-`, `firewall-` and one `endpoint-` chain per endpoint
//! with its DNAT. Frontends without an endpoint are elements of a second map, checked in the filter hooks,
//! that rejects or drops. Session affinity is a dynamic set of clients per endpoint.

use std::collections::{BTreeMap, BTreeSet};

use super::naming;
use crate::{
    dataplane::netfilter::{
        Family,
        plan::{self, Match, Plan, PortChain, PortPlan, Rule, Verdict},
    },
    model::{Frontend, FrontendKind},
};

/// The table's name, in the family's nftables family (`ip`, `ip6`).
pub const TABLE_NAME: &str = "proxy-agent";

/// nftables' family of an IP family: `ip` or `ip6`. Also the prefix of address matches (`ip6 daddr`).
#[must_use]
pub fn nft_family(family: Family) -> &'static str {
    if family.is_ipv6() { "ip6" } else { "ip" }
}

/// The table as nft commands take it: `ip proxy-agent`, `ip6 proxy-agent`.
#[must_use]
pub fn table(family: Family) -> String {
    format!("{} {TABLE_NAME}", nft_family(family))
}

fn addr_type(family: Family) -> &'static str {
    if family.is_ipv6() { "ipv6_addr" } else { "ipv4_addr" }
}

/// Frontends with somewhere to go.
pub const SERVICE_IPS: &str = "service-ips";
/// Frontends without an endpoint: reject or drop.
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
/// Every ClusterIP, whatever its ports: kube-proxy's `cluster-ips` set, as a verdict map here so it shares
/// the maps' element bookkeeping. A new packet still addressed to one after DNAT is refused.
pub const CLUSTER_IPS: &str = "cluster-ips";
/// The declaration of map `name`: frontends (`address . protocol . port`) to verdicts, or ClusterIPs to
/// verdicts.
#[must_use]
pub fn map_type(family: Family, name: &str) -> String {
    let addr = addr_type(family);
    if name == CLUSTER_IPS {
        format!("type {addr} : verdict;")
    } else {
        format!("type {addr} . inet_proto . inet_service : verdict;")
    }
}

/// An affinity set's declaration: client addresses, each forgotten after its own timeout.
#[must_use]
pub fn affinity_set_type(family: Family) -> String {
    format!("type {}; flags dynamic,timeout;", addr_type(family))
}

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
        &[DROP_INVALID, "ct state new jump endpoints-check", "ct state new jump cluster-ips-check"],
    ),
    (
        "filter-output",
        "type filter hook output priority filter; policy accept;",
        &["ct state new jump endpoints-check", "ct state new jump cluster-ips-check"],
    ),
];

/// A frontend as a map key.
fn key(f: Frontend) -> String {
    // `fd00::1 . tcp . 80`: nft reads an IPv6 address in a concatenation as it is.
    format!("{} . {} . {}", f.addr, f.protocol.lower(), f.port)
}

/// The name of one chain of a Service port.
fn chain_name(port: &PortPlan, chain: PortChain) -> String {
    let (spn, protocol) = (&port.name, port.protocol);
    match chain {
        PortChain::Service => naming::service_chain(spn, protocol),
        PortChain::Local => naming::local_chain(spn, protocol),
        PortChain::External => naming::external_chain(spn, protocol),
        PortChain::Firewall => naming::firewall_chain(spn, protocol),
        PortChain::Endpoint(ep) => naming::endpoint_chain(spn, protocol, ep),
    }
}

fn cidr((net, len): plan::Cidr) -> String {
    format!("{net}/{len}")
}

struct Printer<'a> {
    plan: &'a Plan,
    out: Ruleset,
}

impl Printer<'_> {
    /// The address-match prefix: `ip` or `ip6`.
    fn ip(&self) -> &'static str {
        nft_family(self.plan.family)
    }

    /// The rules of one plan rule: one, or two when a DNAT also records an affinity client.
    fn rule(&mut self, port: &PortPlan, rule: &Rule) -> Vec<String> {
        let mut words: Vec<String> = rule.matches.iter().map(|m| self.matches(port, m)).collect();
        let mut before = Vec::new();
        words.push(match rule.verdict {
            Verdict::Goto(c) => format!("goto {}", chain_name(port, c)),
            Verdict::MarkMasquerade => "jump mark-for-masquerade".to_owned(),
            Verdict::Drop => "drop".to_owned(),
            Verdict::Dnat { endpoint, affinity } => {
                if let Some(seconds) = affinity {
                    let set = naming::affinity_set(&port.name, port.protocol, endpoint);
                    before.push(format!("update @{set} {{ {} saddr timeout {seconds}s }}", self.ip()));
                    self.out.sets.insert(set);
                }
                format!("dnat to {}", std::net::SocketAddr::new(endpoint.addr, endpoint.port))
            }
        });
        before.push(words.join(" "));
        before
    }

    fn matches(&self, port: &PortPlan, m: &Match) -> String {
        let ip = self.ip();
        match m {
            Match::Frontend(f) => {
                format!("{ip} daddr {} meta l4proto {} th dport {}", f.addr, f.protocol.lower(), f.port)
            }
            Match::Protocol(p) => format!("meta l4proto {}", p.lower()),
            Match::Source((addr, len)) if *len == self.plan.family.host_len() => format!("{ip} saddr {addr}"),
            Match::Source(c) => format!("{ip} saddr {}", cidr(*c)),
            Match::NotSource(c) => format!("{ip} saddr != {}", cidr(*c)),
            Match::SourceIn(cidrs) => {
                format!("{ip} saddr {{ {} }}", cidrs.iter().map(|c| cidr(*c)).collect::<Vec<_>>().join(", "))
            }
            // nftables spells "any suffix" with a trailing `*`, as the flag does.
            Match::InInterface(pattern) => format!("iifname \"{pattern}\""),
            Match::NotFromPodInterface => {
                self.plan.pod_interfaces.iter().map(|p| format!("iifname != \"{p}\"")).collect::<Vec<_>>().join(" ")
            }
            Match::SourceLocal => "fib saddr type local".to_owned(),
            Match::OneIn(n) => format!("numgen random mod {n} 0"),
            Match::AffinityHit { endpoint, .. } => {
                format!("{} saddr @{}", self.ip(), naming::affinity_set(&port.name, port.protocol, *endpoint))
            }
        }
    }

    fn port_chains(&mut self, port: &PortPlan) {
        for (chain, rules) in &port.chains {
            let rules = rules.iter().flat_map(|r| self.rule(port, r)).collect();
            self.out.chains.insert(chain_name(port, *chain), Chain { hook: None, rules });
        }
    }

    fn element(&mut self, map: &'static str, key: String, comment: &str, verdict: &str) {
        self.out.maps.get_mut(map).expect("declared").insert(key, format!("comment \"{comment}\" : {verdict}"));
    }

    fn skeleton(&mut self) {
        let drop_invalid = self.plan.drop_invalid;
        for (name, hook, rules) in BASE_CHAINS {
            let rules = rules.iter().filter(|r| drop_invalid || **r != DROP_INVALID).map(|r| (*r).to_owned()).collect();
            self.out.chains.insert(name.into(), Chain { hook: Some(hook), rules });
        }
        let mark = self.plan.masquerade_mark;
        let ip = self.ip();
        let fixed: [(&str, Vec<String>); 5] = [
            ("services", vec![format!("{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}")]),
            ("endpoints-check", vec![format!("{ip} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}")]),
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
            self.out.chains.insert(name.into(), Chain { hook: None, rules });
        }
        for map in [SERVICE_IPS, NO_ENDPOINT_SERVICES, CLUSTER_IPS] {
            self.out.maps.insert(map, Elements::new());
        }
    }

    fn dispatch(&mut self) {
        let plan = self.plan;
        for d in &plan.dispatch {
            let port = &plan.ports[d.port];
            let comment = format!("{} {}", port.name, plan::kind_label(d.kind));
            self.element(SERVICE_IPS, key(d.frontend), &comment, &format!("goto {}", chain_name(port, d.target)));
        }
        for n in &plan.no_endpoints {
            let (why, verdict) =
                if n.reject { ("has no endpoints", "goto reject-chain") } else { ("has no local endpoints", "drop") };
            let comment = format!("{} {why}", plan.ports[n.port].name);
            self.element(NO_ENDPOINT_SERVICES, key(n.frontend), &comment, verdict);
        }
        for (addr, port) in &plan.cluster_ips {
            let comment = format!("{} {}", plan.ports[*port].name, plan::kind_label(FrontendKind::ClusterIp));
            self.element(CLUSTER_IPS, addr.to_string(), &comment, "goto reject-chain");
        }
    }

    /// kube-proxy's `cluster-ips-check`, after DNAT in the forward and output hooks: what is still addressed
    /// to a ClusterIP used a port or protocol no Service defines (refused, by [`CLUSTER_IPS`]); an address of
    /// the service CIDRs that no Service holds is dropped. Neither leaves by the default route.
    fn cluster_ips_check(&mut self) {
        let ip = self.ip();
        let mut rules = vec![format!("{ip} daddr vmap @{CLUSTER_IPS}")];
        if !self.plan.service_cidrs.is_empty() {
            let cidrs: Vec<String> = self.plan.service_cidrs.iter().map(|c| cidr(*c)).collect();
            rules.push(format!("{ip} daddr {{ {} }} drop", cidrs.join(", ")));
        }
        self.out.chains.insert("cluster-ips-check".into(), Chain { hook: None, rules });
    }
}

/// Prints the table's ruleset for `plan`.
#[must_use]
pub fn print(plan: &Plan) -> Ruleset {
    let mut printer = Printer { plan, out: Ruleset::default() };
    printer.skeleton();
    for port in &plan.ports {
        printer.port_chains(port);
    }
    printer.dispatch();
    printer.cluster_ips_check();
    printer.out
}
