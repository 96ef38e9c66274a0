//! Renders the desired table as kube-proxy's iptables rules: a pure function, tested without a kernel.
//!
//! Per Service port: `KUBE-SVC-` (every usable endpoint), `KUBE-SVL-` (local endpoints, for Local
//! policies), `KUBE-EXT-` (where external traffic enters: masquerade or not, then SVC or SVL), `KUBE-FW-`
//! (load-balancer source ranges), and one `KUBE-SEP-` per endpoint with its DNAT. The filter table rejects
//! traffic to Services without endpoints and drops what a Local policy leaves without one.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use super::naming;
use crate::{
    dataplane::netfilter::{self, RuleConfig, ServicePort},
    model::{BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, Protocol, ServicePortName, ServiceTable},
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

/// One rule in the form `iptables-save` prints back: addresses, interface and protocol (`head`), then the
/// comment, then the other matches (`tail`), then the target. Rendering that form makes the kernel's
/// chains compare equal to the wanted ones, so a restarted agent and the periodic resync rewrite nothing
/// that has not changed (`iptables_save_prints_back_exactly_what_was_rendered` checks it against the kernel).
fn rule(chain: &str, head: &str, comment: &str, tail: &str, target: &str) -> String {
    format!("-A {chain}{head} -m comment --comment \"{comment}\"{tail} -j {target}")
}

/// A frontend as a rule's `head` and `tail`: destination and protocol, then the port match.
fn frontend(f: Frontend) -> (String, String) {
    let p = f.protocol.lower();
    (format!(" -d {}/32 -p {p}", f.addr), format!(" -m {p} --dport {}", f.port))
}

/// A probability as the statistic match stores it (a 31-bit fraction) and `iptables-save` prints it.
fn probability(p: f64) -> String {
    const ONE: f64 = 2_147_483_648.0;
    format!("{:.11}", (p * ONE).round() / ONE)
}

fn endpoint_rules(
    nat: &mut Chains,
    chain: &str,
    spn: &ServicePortName,
    protocol: Protocol,
    endpoints: &[Endpoint],
    affinity: Option<u32>,
) {
    let rules = nat.entry(chain.to_owned()).or_default();
    if let Some(seconds) = affinity {
        for ep in endpoints {
            let sep = naming::endpoint_chain(spn, protocol, *ep);
            let recent =
                format!(" -m recent --rcheck --seconds {seconds} --reap --name {sep} --mask 255.255.255.255 --rsource");
            rules.push(rule(chain, "", &format!("{spn} -> {ep}"), &recent, &sep));
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let sep = naming::endpoint_chain(spn, protocol, *ep);
        let mut tail = String::new();
        if i + 1 < n {
            // Endpoint i of n is taken with probability 1/(n-i) among those left: uniform overall.
            #[expect(clippy::cast_precision_loss, reason = "endpoint counts are far below 2^52")]
            let p = 1.0 / (n - i) as f64;
            let _ = write!(tail, " -m statistic --mode random --probability {}", probability(p));
        }
        rules.push(rule(chain, "", &format!("{spn} -> {ep}"), &tail, &sep));
    }
}

/// The chain names of one Service port.
struct PortChains {
    svc: String,
    svl: String,
    ext: String,
    fw: String,
}

/// Marks for masquerade what did not arrive from a pod interface (kube-proxy's `InterfaceNamePrefix`
/// local-traffic detection, for every pattern of `--pod-interfaces`): the ClusterIP masquerade rule jumps
/// here when no cluster CIDR is given.
const MASQ_UNLESS_POD: &str = "KUBE-PROXY-MASQ-UNLESS-POD";

/// Accumulates the ruleset, one Service port at a time.
struct Renderer<'a> {
    config: &'a RuleConfig,
    /// Some rule jumps to [`MASQ_UNLESS_POD`].
    uses_pod_interface_check: bool,
    nat: Chains,
    filter: Chains,
    /// KUBE-SERVICES rules, appended before the node-port catch-all rules that must come last.
    services: Vec<String>,
    node_port_addrs: BTreeSet<Ipv4Addr>,
}

/// The rule that refuses or drops traffic a frontend has no endpoint for.
fn no_endpoint_rule(chain: &str, spn: &ServicePortName, f: Frontend, set: &BackendSet) -> String {
    let (why, verdict) = if set.reject_when_empty {
        ("has no endpoints", "REJECT --reject-with icmp-port-unreachable")
    } else {
        ("has no local endpoints", "DROP")
    };
    let (head, tail) = frontend(f);
    rule(chain, &head, &format!("{spn} {why}"), &tail, verdict)
}

impl<'a> Renderer<'a> {
    /// kube-proxy's fixed chains and their rules.
    fn new(config: &'a RuleConfig) -> Self {
        let mut nat: Chains = NAT_FIXED.iter().map(|c| ((*c).to_owned(), Vec::new())).collect();
        let mut filter: Chains = FILTER_FIXED.iter().map(|c| ((*c).to_owned(), Vec::new())).collect();
        let mark = config.masq_mark();
        // `--or-mark M` and `--xor-mark M` as iptables-save prints them.
        nat.get_mut("KUBE-MARK-MASQ")
            .unwrap()
            .push(format!("-A KUBE-MARK-MASQ -j MARK --set-xmark {mark:#x}/{mark:#x}"));
        nat.get_mut("KUBE-POSTROUTING").unwrap().extend([
            format!("-A KUBE-POSTROUTING -m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"),
            format!("-A KUBE-POSTROUTING -j MARK --set-xmark {mark:#x}/0x0"),
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_owned(),
        ]);
        let forward = filter.get_mut("KUBE-FORWARD").unwrap();
        if !config.tcp_be_liberal {
            // kubernetes/kubernetes#74839: an out-of-window segment would skip NAT and reset the connection.
            forward.push("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_owned());
        }
        forward.extend([
            format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark:#x}/{mark:#x} -j ACCEPT"),
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
        ]);
        Self {
            config,
            uses_pod_interface_check: false,
            nat,
            filter,
            services: Vec::new(),
            node_port_addrs: BTreeSet::new(),
        }
    }

    /// The service, local and endpoint chains of a port.
    fn backend_chains(&mut self, spn: &ServicePortName, protocol: Protocol, sp: &ServicePort<'_>, chains: &PortChains) {
        let p = protocol.lower();
        let cluster = sp.cluster_set();
        let local = sp.local_endpoints();
        let affinity = sp.affinity();
        endpoint_rules(&mut self.nat, &chains.svc, spn, protocol, &cluster.endpoints, affinity);
        // The local chain, for internalTrafficPolicy Local on the ClusterIP or externalTrafficPolicy Local.
        if sp.uses_local() {
            endpoint_rules(&mut self.nat, &chains.svl, spn, protocol, &local, affinity);
        }
        for ep in &sp.all_endpoints() {
            let sep = naming::endpoint_chain(spn, protocol, *ep);
            let recent = if affinity.is_some() {
                format!(" -m recent --set --name {sep} --mask 255.255.255.255 --rsource")
            } else {
                String::new()
            };
            let comment = spn.to_string();
            let rules = vec![
                rule(&sep, &format!(" -s {}/32", ep.addr), &comment, "", "KUBE-MARK-MASQ"),
                rule(
                    &sep,
                    &format!(" -p {p}"),
                    &comment,
                    &format!(" -m {p}{recent}"),
                    &format!("DNAT --to-destination {ep}"),
                ),
            ];
            self.nat.insert(sep, rules);
        }
    }

    fn cluster_ip(
        &mut self,
        spn: &ServicePortName,
        f: Frontend,
        e: &FrontendEntry,
        cluster: &BackendSet,
        chains: &PortChains,
    ) {
        if e.internal.endpoints.is_empty() {
            let rule = no_endpoint_rule("KUBE-SERVICES", spn, f, &e.internal);
            self.filter.get_mut("KUBE-SERVICES").unwrap().push(rule);
            return;
        }
        // The internal set is the cluster set unless internalTrafficPolicy is Local.
        let target = if e.internal.endpoints == cluster.endpoints { &chains.svc } else { &chains.svl };
        let (head, tail) = frontend(f);
        let comment = format!("{spn} cluster IP");
        self.services.push(rule("KUBE-SERVICES", &head, &comment, &tail, target));
        // As kube-proxy: in the chain ClusterIP traffic goes to (the local one under internalTrafficPolicy
        // Local), masquerade all of it with masqueradeAll, else what does not come from a pod (it may have
        // to leave the node again, and its replies must come back here).
        // (Without a cluster CIDR or pod interfaces nothing tells pod traffic apart: none is masqueraded.)
        let masq = if self.config.masquerade_all {
            Some(rule(target, &head, &comment, &tail, "KUBE-MARK-MASQ"))
        } else if let Some((net, len)) = self.config.cluster_cidr {
            Some(rule(target, &format!(" ! -s {net}/{len}{head}"), &comment, &tail, "KUBE-MARK-MASQ"))
        } else if self.config.pod_interface_patterns().next().is_some() {
            self.uses_pod_interface_check = true;
            Some(rule(target, &head, &comment, &tail, MASQ_UNLESS_POD))
        } else {
            None
        };
        if let Some(masq) = masq {
            self.nat.get_mut(target.as_str()).expect("the port's chains exist").insert(0, masq);
        }
    }

    fn external(&mut self, spn: &ServicePortName, f: Frontend, e: &FrontendEntry, chains: &PortChains) {
        let label = netfilter::kind_label(e.kind);
        if e.external.endpoints.is_empty() {
            let rule = no_endpoint_rule("KUBE-EXTERNAL-SERVICES", spn, f, &e.external);
            self.filter.get_mut("KUBE-EXTERNAL-SERVICES").unwrap().push(rule);
        }
        let (ext, fw) = (&chains.ext, &chains.fw);
        let jump = if e.source_ranges.is_empty() {
            ext
        } else {
            let fw_rules = self.nat.entry(fw.clone()).or_default();
            let comment = format!("{spn} {label}");
            for (net, len) in &e.source_ranges {
                fw_rules.push(rule(fw, &format!(" -s {net}/{len}"), &comment, "", ext));
            }
            fw_rules.push(rule(fw, "", &comment, "", "KUBE-MARK-DROP"));
            fw
        };
        let (head, tail) = frontend(f);
        if e.kind == FrontendKind::NodePort {
            self.node_port_addrs.insert(f.addr);
            let rule = rule("KUBE-NODEPORTS", &head, &spn.to_string(), &tail, jump);
            self.nat.get_mut("KUBE-NODEPORTS").unwrap().push(rule);
        } else {
            self.services.push(rule("KUBE-SERVICES", &head, &format!("{spn} {label}"), &tail, jump));
        }
    }

    /// Where external traffic enters: masquerade under policy Cluster; under Local, pod and node traffic
    /// still reach every endpoint and the rest only local ones.
    fn external_chain(&mut self, spn: &ServicePortName, masquerade_external: bool, chains: &PortChains) {
        let PortChains { svc, svl, ext, .. } = chains;
        let mut rules = Vec::new();
        if masquerade_external {
            let comment = format!("masquerade traffic for {spn} external destinations");
            rules.push(rule(ext, "", &comment, "", "KUBE-MARK-MASQ"));
            rules.push(format!("-A {ext} -j {svc}"));
        } else {
            let pods = format!("pod traffic for {spn} external destinations");
            if let Some((net, len)) = self.config.cluster_cidr {
                rules.push(rule(ext, &format!(" -s {net}/{len}"), &pods, "", svc));
            }
            for pattern in self.config.pod_interface_patterns() {
                rules.push(rule(ext, &format!(" -i {}", iptables_interface(pattern)), &pods, "", svc));
            }
            let local = " -m addrtype --src-type LOCAL";
            let (masq, route) = (
                format!("masquerade LOCAL traffic for {spn} external destinations"),
                format!("route LOCAL traffic for {spn} external destinations"),
            );
            rules.push(rule(ext, "", &masq, local, "KUBE-MARK-MASQ"));
            rules.push(rule(ext, "", &route, local, svc));
            rules.push(format!("-A {ext} -j {svl}"));
        }
        self.nat.insert(ext.clone(), rules);
    }

    fn service_port(&mut self, sp: &ServicePort<'_>) {
        let (spn, protocol) = (sp.name, sp.protocol);
        let chains = PortChains {
            svc: naming::service_chain(spn, protocol),
            svl: naming::local_chain(spn, protocol),
            ext: naming::external_chain(spn, protocol),
            fw: naming::firewall_chain(spn, protocol),
        };
        self.backend_chains(spn, protocol, sp, &chains);
        let cluster = sp.cluster_set().clone();
        for (f, e) in &sp.entries {
            if e.kind == FrontendKind::ClusterIp {
                self.cluster_ip(spn, *f, e, &cluster, &chains);
            } else {
                self.external(spn, *f, e, &chains);
            }
        }
        if let Some(e) = sp.external_entry() {
            self.external_chain(spn, e.masquerade_external, &chains);
        }
    }

    /// The rules of [`CLUSTER_IPS_CHECK`] and [`CLUSTER_IPS`].
    fn cluster_ips_check(&mut self, table: &ServiceTable) {
        let cidrs = &table.service_cidrs;
        let check = self.filter.get_mut(CLUSTER_IPS_CHECK).expect("fixed chain");
        if cidrs.is_empty() {
            check.push(format!("-A {CLUSTER_IPS_CHECK} -j {CLUSTER_IPS}"));
        }
        for (net, len) in cidrs {
            check.push(format!("-A {CLUSTER_IPS_CHECK} -d {net}/{len} -j {CLUSTER_IPS}"));
        }
        let cluster_ips: BTreeSet<Ipv4Addr> =
            table.frontends.iter().filter(|(_, e)| e.kind == FrontendKind::ClusterIp).map(|(f, _)| f.addr).collect();
        let rules = self.filter.get_mut(CLUSTER_IPS).expect("fixed chain");
        for addr in cluster_ips {
            rules.push(rule(
                CLUSTER_IPS,
                &format!(" -d {addr}/32"),
                "Reject traffic to invalid ports of ClusterIPs",
                "",
                "REJECT --reject-with icmp-port-unreachable",
            ));
        }
        if !cidrs.is_empty() {
            rules.push(rule(CLUSTER_IPS, "", "Drop traffic to unallocated ClusterIPs", "", "DROP"));
        }
    }

    fn finish(mut self) -> Ruleset {
        if self.uses_pod_interface_check {
            let mut rules: Vec<String> = self
                .config
                .pod_interface_patterns()
                .map(|p| format!("-A {MASQ_UNLESS_POD} -i {} -j RETURN", iptables_interface(p)))
                .collect();
            rules.push(format!("-A {MASQ_UNLESS_POD} -j KUBE-MARK-MASQ"));
            self.nat.insert(MASQ_UNLESS_POD.to_owned(), rules);
        }
        // Load-balancer traffic from outside the source ranges is marked in nat and dropped in filter.
        if self.nat.keys().any(|k| k.starts_with("KUBE-FW-")) {
            self.nat
                .insert("KUBE-MARK-DROP".into(), vec!["-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000".into()]);
            self.filter.get_mut("KUBE-PROXY-FIREWALL").unwrap().push(rule(
                "KUBE-PROXY-FIREWALL",
                "",
                "load balancer source ranges",
                " -m mark --mark 0x8000/0x8000",
                "DROP",
            ));
        }
        let services = self.nat.get_mut("KUBE-SERVICES").unwrap();
        services.append(&mut self.services);
        for addr in &self.node_port_addrs {
            let comment = "kubernetes service nodeports; NOTE: this must be the last rule in this chain";
            services.push(rule("KUBE-SERVICES", &format!(" -d {addr}/32"), comment, "", "KUBE-NODEPORTS"));
        }
        Ruleset { nat: self.nat, filter: self.filter }
    }
}

/// An interface pattern as iptables spells it: "any suffix" is `+`.
fn iptables_interface(pattern: &str) -> String {
    pattern.strip_suffix('*').map_or_else(|| pattern.to_owned(), |prefix| format!("{prefix}+"))
}

/// Renders the ruleset for `table`.
#[must_use]
pub fn render(table: &ServiceTable, config: &RuleConfig) -> Ruleset {
    let mut renderer = Renderer::new(config);
    for sp in &netfilter::service_ports(table) {
        renderer.service_port(sp);
    }
    renderer.cluster_ips_check(table);
    renderer.finish()
}
