//! Prints a [`Plan`] as kube-proxy's iptables rules: a pure function, tested without a kernel.
//!
//! The plan's chains become `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-`, `KUBE-FW-` and `KUBE-SEP-` chains in the
//! nat table; its dispatch becomes `KUBE-SERVICES` and `KUBE-NODEPORTS` rules; frontends without an
//! endpoint and the cluster-IPs check become filter-table rules. What iptables cannot say in one rule is
//! spelt its way: a drop in the nat table is a mark the filter table drops, and "from none of the pod
//! interfaces" is a chain that returns for each of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use super::naming;
use crate::{
    dataplane::netfilter::{
        Family,
        plan::{self, Match, Plan, PortChain, PortPlan, Rule, Verdict},
    },
    model::{Frontend, FrontendKind},
};

/// One table's chains and their rules, in order.
pub type Chains = BTreeMap<String, Vec<String>>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub nat: Chains,
    pub filter: Chains,
}

/// The chains kube-proxy owns that base chains jump to: kept even when empty.
pub const NAT_FIXED: [&str; 4] = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"];
pub const FILTER_FIXED: [&str; 6] =
    ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL", CLUSTER_IPS_CHECK, CLUSTER_IPS];

/// kube-proxy's nftables `cluster-ips-check`, which its iptables mode lacks: a new packet still addressed
/// to a ClusterIP after DNAT (a port or protocol no Service defines) is refused, and one to an address of
/// the service CIDRs that no Service holds is dropped, instead of leaving by the default route. With
/// service CIDRs the walk of [`CLUSTER_IPS`] (one rule per ClusterIP) is paid only inside them.
const CLUSTER_IPS_CHECK: &str = "KUBE-CLUSTER-IPS-CHECK";
const CLUSTER_IPS: &str = "KUBE-CLUSTER-IPS";

/// Marks for masquerade what did not arrive from a pod interface (kube-proxy's `InterfaceNamePrefix`
/// local-traffic detection, for every pattern of `--pod-interfaces`): one iptables rule matches one `-i`.
const MASQ_UNLESS_POD: &str = "KUBE-PROXY-MASQ-UNLESS-POD";

/// The mark a nat-table drop sets, for the filter table's `KUBE-PROXY-FIREWALL` to drop (kube-proxy's).
const DROP_MARK: &str = "0x8000/0x8000";

/// Prefixes of the per-Service-port chains (and kube-proxy's older `KUBE-XLB-`).
const PORT_CHAIN_PREFIXES: [&str; 6] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-"];

/// Whether chain `name` is one this mode (or kube-proxy's iptables mode) owns, and so may rewrite or
/// delete. Other `KUBE-` chains are someone else's: kubelet's `KUBE-KUBELET-CANARY` and `KUBE-FIREWALL`
/// (which `INPUT` jumps to, so deleting it would fail the whole restore), as kube-proxy leaves them.
#[must_use]
pub fn is_owned(name: &str) -> bool {
    NAT_FIXED.contains(&name)
        || FILTER_FIXED.contains(&name)
        || [MASQ_UNLESS_POD, "KUBE-MARK-DROP", "KUBE-PROXY-CANARY"].contains(&name)
        || PORT_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// One rule in the form `iptables-save` prints back: addresses, interface and protocol (`head`), then the
/// comment, then the other matches (`tail`), then the target. Printing that form makes the kernel's chains
/// compare equal to the wanted ones, so a restarted agent and the periodic resync rewrite nothing that has
/// not changed (`iptables_save_prints_back_exactly_what_was_rendered` checks it against the kernel).
fn line(chain: &str, head: &str, comment: Option<&str>, tail: &str, target: &str) -> String {
    let comment = comment.map(|c| format!(" -m comment --comment \"{c}\"")).unwrap_or_default();
    format!("-A {chain}{head}{comment}{tail} -j {target}")
}

/// A frontend as a rule's `head` and `tail`: destination and protocol, then the port match.
fn frontend(f: Frontend) -> (String, String) {
    let p = f.protocol.lower();
    (format!(" -d {} -p {p}", host(f.addr)), format!(" -m {p} --dport {}", f.port))
}

/// One address as iptables-save prints it: `/32`, or `/128` for IPv6.
fn host(addr: IpAddr) -> String {
    format!("{addr}/{}", if addr.is_ipv6() { 128 } else { 32 })
}

/// The family's REJECT that tells the client the port is closed.
fn reject(family: Family) -> &'static str {
    if family.is_ipv6() {
        "REJECT --reject-with icmp6-port-unreachable"
    } else {
        "REJECT --reject-with icmp-port-unreachable"
    }
}

/// A probability as the statistic match stores it (a 31-bit fraction) and `iptables-save` prints it.
fn probability(p: f64) -> String {
    const ONE: f64 = 2_147_483_648.0;
    format!("{:.11}", (p * ONE).round() / ONE)
}

/// An interface pattern as iptables spells it: "any suffix" is `+`.
fn iptables_interface(pattern: &str) -> String {
    pattern.strip_suffix('*').map_or_else(|| pattern.to_owned(), |prefix| format!("{prefix}+"))
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

/// The `recent` list session affinity keeps for an endpoint: named after its chain, as kube-proxy does,
/// keyed by the whole client address.
fn recent(port: &PortPlan, what: &str, endpoint: crate::model::Endpoint) -> String {
    let name = chain_name(port, PortChain::Endpoint(endpoint));
    let mask = if endpoint.addr.is_ipv6() { "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" } else { "255.255.255.255" };
    format!(" -m recent {what} --name {name} --mask {mask} --rsource")
}

/// One of kube-proxy's fixed chains.
fn fixed<'c>(chains: &'c mut Chains, chain: &str) -> &'c mut Vec<String> {
    chains.get_mut(chain).expect("a fixed chain")
}

struct Printer<'a> {
    plan: &'a Plan,
    nat: Chains,
    filter: Chains,
    /// Some rule jumps to [`MASQ_UNLESS_POD`].
    uses_pod_interface_check: bool,
}

impl Printer<'_> {
    /// The lines of one plan rule (a match on several source networks is one line per network).
    fn rule(&mut self, chain: &str, port: &PortPlan, rule: &Rule) -> Vec<String> {
        // iptables-save's order of the head: source, destination, in-interface, protocol.
        let mut head: Vec<(u8, String)> = Vec::new();
        let mut tail = String::new();
        let mut sources: Option<&[plan::Cidr]> = None;
        let mut unless_pod = false;
        for m in &rule.matches {
            match m {
                Match::Frontend(f) => {
                    let p = f.protocol.lower();
                    head.push((1, format!(" -d {}", host(f.addr))));
                    head.push((3, format!(" -p {p}")));
                    let _ = write!(tail, " -m {p} --dport {}", f.port);
                }
                Match::Protocol(p) => {
                    head.push((3, format!(" -p {}", p.lower())));
                    let _ = write!(tail, " -m {}", p.lower());
                }
                Match::Source((net, len)) => head.push((0, format!(" -s {net}/{len}"))),
                Match::NotSource((net, len)) => head.push((0, format!(" ! -s {net}/{len}"))),
                Match::SourceIn(cidrs) => sources = Some(cidrs),
                Match::InInterface(pattern) => head.push((2, format!(" -i {}", iptables_interface(pattern)))),
                Match::NotFromPodInterface => unless_pod = true,
                Match::SourceLocal => tail.push_str(" -m addrtype --src-type LOCAL"),
                Match::OneIn(n) => {
                    #[expect(clippy::cast_precision_loss, reason = "endpoint counts are far below 2^52")]
                    let p = 1.0 / *n as f64;
                    let _ = write!(tail, " -m statistic --mode random --probability {}", probability(p));
                }
                Match::AffinityHit { endpoint, seconds } => {
                    tail.push_str(&recent(port, &format!("--rcheck --seconds {seconds} --reap"), *endpoint));
                }
            }
        }
        let target = match rule.verdict {
            Verdict::Goto(c) => chain_name(port, c),
            Verdict::MarkMasquerade if unless_pod => {
                self.uses_pod_interface_check = true;
                MASQ_UNLESS_POD.to_owned()
            }
            Verdict::MarkMasquerade => "KUBE-MARK-MASQ".to_owned(),
            // Port chains are nat chains, which cannot drop: mark, and the filter table drops.
            Verdict::Drop => "KUBE-MARK-DROP".to_owned(),
            Verdict::Dnat { endpoint, affinity } => {
                if affinity.is_some() {
                    tail.push_str(&recent(port, "--set", endpoint));
                }
                format!("DNAT --to-destination {endpoint}")
            }
        };
        debug_assert!(!unless_pod || rule.verdict == Verdict::MarkMasquerade, "only masquerade is conditional on pods");
        head.sort_by_key(|(rank, _)| *rank);
        let head: String = head.into_iter().map(|(_, h)| h).collect();
        let comment = rule.comment.as_deref();
        match sources {
            Some(cidrs) => cidrs
                .iter()
                .map(|(net, len)| line(chain, &format!(" -s {net}/{len}{head}"), comment, &tail, &target))
                .collect(),
            None => vec![line(chain, &head, comment, &tail, &target)],
        }
    }

    fn port_chains(&mut self, port: &PortPlan) {
        for (chain, rules) in &port.chains {
            let name = chain_name(port, *chain);
            let lines = rules.iter().flat_map(|r| self.rule(&name, port, r)).collect();
            self.nat.insert(name, lines);
        }
    }

    /// kube-proxy's fixed chains and their rules.
    fn skeleton(&mut self) {
        let mark = self.plan.masquerade_mark;
        // `--or-mark M` and `--xor-mark M` as iptables-save prints them.
        fixed(&mut self.nat, "KUBE-MARK-MASQ")
            .push(format!("-A KUBE-MARK-MASQ -j MARK --set-xmark {mark:#x}/{mark:#x}"));
        fixed(&mut self.nat, "KUBE-POSTROUTING").extend([
            format!("-A KUBE-POSTROUTING -m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"),
            format!("-A KUBE-POSTROUTING -j MARK --set-xmark {mark:#x}/0x0"),
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_owned(),
        ]);
        let drop_invalid = self.plan.drop_invalid;
        let forward = fixed(&mut self.filter, "KUBE-FORWARD");
        if drop_invalid {
            // kubernetes/kubernetes#74839: an out-of-window segment would skip NAT and reset the connection.
            forward.push("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_owned());
        }
        forward.extend([
            format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark:#x}/{mark:#x} -j ACCEPT"),
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
        ]);
    }

    /// `KUBE-SERVICES` and `KUBE-NODEPORTS`: where each frontend's new packets go first; node ports last.
    fn dispatch(&mut self) {
        let mut services = Vec::new();
        let mut node_port_addrs = BTreeSet::<IpAddr>::new();
        for d in &self.plan.dispatch {
            let port = &self.plan.ports[d.port];
            let (head, tail) = frontend(d.frontend);
            let target = chain_name(port, d.target);
            if d.kind == FrontendKind::NodePort {
                node_port_addrs.insert(d.frontend.addr);
                let rule = line("KUBE-NODEPORTS", &head, Some(&port.name.to_string()), &tail, &target);
                fixed(&mut self.nat, "KUBE-NODEPORTS").push(rule);
            } else {
                let comment = format!("{} {}", port.name, plan::kind_label(d.kind));
                services.push(line("KUBE-SERVICES", &head, Some(&comment), &tail, &target));
            }
        }
        let comment = "kubernetes service nodeports; NOTE: this must be the last rule in this chain";
        for addr in node_port_addrs {
            services.push(line("KUBE-SERVICES", &format!(" -d {}", host(addr)), Some(comment), "", "KUBE-NODEPORTS"));
        }
        fixed(&mut self.nat, "KUBE-SERVICES").extend(services);
    }

    /// The filter rules that refuse or drop traffic a frontend has no endpoint for.
    fn no_endpoints(&mut self) {
        for n in &self.plan.no_endpoints {
            let port = &self.plan.ports[n.port];
            let (why, verdict) = if n.reject {
                ("has no endpoints", reject(self.plan.family))
            } else {
                ("has no local endpoints", "DROP")
            };
            let chain = if n.kind == FrontendKind::ClusterIp { "KUBE-SERVICES" } else { "KUBE-EXTERNAL-SERVICES" };
            let (head, tail) = frontend(n.frontend);
            let rule = line(chain, &head, Some(&format!("{} {why}", port.name)), &tail, verdict);
            fixed(&mut self.filter, chain).push(rule);
        }
    }

    /// The rules of [`CLUSTER_IPS_CHECK`] and [`CLUSTER_IPS`].
    fn cluster_ips_check(&mut self) {
        let cidrs = &self.plan.service_cidrs;
        let mut check = Vec::new();
        if cidrs.is_empty() {
            check.push(format!("-A {CLUSTER_IPS_CHECK} -j {CLUSTER_IPS}"));
        }
        for (net, len) in cidrs {
            check.push(format!("-A {CLUSTER_IPS_CHECK} -d {net}/{len} -j {CLUSTER_IPS}"));
        }
        let mut rules: Vec<String> = self
            .plan
            .cluster_ips
            .keys()
            .map(|addr| {
                let comment = Some("Reject traffic to invalid ports of ClusterIPs");
                line(CLUSTER_IPS, &format!(" -d {}", host(*addr)), comment, "", reject(self.plan.family))
            })
            .collect();
        if !cidrs.is_empty() {
            rules.push(line(CLUSTER_IPS, "", Some("Drop traffic to unallocated ClusterIPs"), "", "DROP"));
        }
        fixed(&mut self.filter, CLUSTER_IPS_CHECK).extend(check);
        fixed(&mut self.filter, CLUSTER_IPS).extend(rules);
    }

    fn finish(mut self) -> Ruleset {
        if self.uses_pod_interface_check {
            let mut rules: Vec<String> = self
                .plan
                .pod_interfaces
                .iter()
                .map(|p| format!("-A {MASQ_UNLESS_POD} -i {} -j RETURN", iptables_interface(p)))
                .collect();
            rules.push(format!("-A {MASQ_UNLESS_POD} -j KUBE-MARK-MASQ"));
            self.nat.insert(MASQ_UNLESS_POD.to_owned(), rules);
        }
        // Load-balancer traffic from outside the source ranges is marked in nat and dropped in filter.
        if self.plan.has_firewall() {
            self.nat
                .insert("KUBE-MARK-DROP".into(), vec![format!("-A KUBE-MARK-DROP -j MARK --set-xmark {DROP_MARK}")]);
            let rule = line(
                "KUBE-PROXY-FIREWALL",
                "",
                Some("load balancer source ranges"),
                &format!(" -m mark --mark {DROP_MARK}"),
                "DROP",
            );
            fixed(&mut self.filter, "KUBE-PROXY-FIREWALL").push(rule);
        }
        Ruleset { nat: self.nat, filter: self.filter }
    }
}

/// Prints the ruleset of `plan`.
#[must_use]
pub fn print(plan: &Plan) -> Ruleset {
    let mut printer = Printer {
        plan,
        nat: NAT_FIXED.iter().map(|c| ((*c).to_owned(), Vec::new())).collect(),
        filter: FILTER_FIXED.iter().map(|c| ((*c).to_owned(), Vec::new())).collect(),
        uses_pod_interface_check: false,
    };
    printer.skeleton();
    for port in &plan.ports {
        printer.port_chains(port);
    }
    printer.dispatch();
    printer.no_endpoints();
    printer.cluster_ips_check();
    printer.finish()
}
