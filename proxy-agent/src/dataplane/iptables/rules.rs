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
use crate::model::{
    BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, Protocol, ServicePortName, ServiceTable,
};

/// kube-proxy's masquerade mark.
pub const MASQ_MARK: &str = "0x4000";

/// Node-wide settings that shape the rules.
#[derive(Clone, Debug, Default)]
pub struct RuleConfig {
    pub masquerade_all: bool,
    pub cluster_cidr: Option<(Ipv4Addr, u8)>,
    /// Pod-facing interface patterns (`veth*`): kube-proxy's `InterfaceNamePrefix` local-traffic detection,
    /// so pod traffic to a Local-policy Service's external addresses reaches every endpoint.
    pub pod_interfaces: Vec<String>,
}

/// One table's chains and their rules, in order.
pub type Chains = BTreeMap<String, Vec<String>>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub nat: Chains,
    pub filter: Chains,
}

/// The chains kube-proxy owns that base chains jump to: kept even when empty.
pub const NAT_FIXED: [&str; 4] = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"];
pub const FILTER_FIXED: [&str; 4] = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL"];

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn matches(f: Frontend) -> String {
    let p = proto(f.protocol);
    format!("-m {p} -p {p} -d {}/32 --dport {}", f.addr, f.port)
}

/// All frontends of one Service port, gathered: kube-proxy's unit of rules.
#[derive(Default)]
struct ServicePort<'a> {
    entries: Vec<(Frontend, &'a FrontendEntry)>,
}

impl ServicePort<'_> {
    /// Every endpoint usable cluster-wide: the largest set any frontend of the port uses.
    fn cluster_set(&self) -> &BackendSet {
        let internal_of_external_kinds =
            self.entries.iter().find(|(_, e)| e.kind != FrontendKind::ClusterIp).map(|(_, e)| &e.internal);
        let external_of_cluster_ip =
            self.entries.iter().find(|(_, e)| e.kind == FrontendKind::ClusterIp).map(|(_, e)| &e.external);
        external_of_cluster_ip.or(internal_of_external_kinds).expect("a service port has a frontend")
    }

    fn local_endpoints(&self) -> Vec<Endpoint> {
        self.cluster_set().endpoints.iter().filter(|e| e.local).copied().collect()
    }
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
            rules.push(format!(
                "-A {chain} -m comment --comment \"{spn} -> {ep}\" -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}"
            ));
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let sep = naming::endpoint_chain(spn, protocol, *ep);
        let mut rule = format!("-A {chain} -m comment --comment \"{spn} -> {ep}\"");
        if i + 1 < n {
            // Endpoint i of n is taken with probability 1/(n-i) among those left: uniform overall.
            #[expect(clippy::cast_precision_loss, reason = "endpoint counts are far below 2^52")]
            let p = 1.0 / (n - i) as f64;
            let _ = write!(rule, " -m statistic --mode random --probability {p:.10}");
        }
        let _ = write!(rule, " -j {sep}");
        rules.push(rule);
    }
}

/// Renders the ruleset for `table`.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "kube-proxy's per-port chain layout in one pass; to be split per chain kind as the iptables mode grows"
)]
pub fn render(table: &ServiceTable, config: &RuleConfig) -> Ruleset {
    let mut nat: Chains = NAT_FIXED.iter().map(|c| ((*c).to_owned(), Vec::new())).collect();
    let mut filter: Chains = FILTER_FIXED.iter().map(|c| ((*c).to_owned(), Vec::new())).collect();
    nat.get_mut("KUBE-MARK-MASQ").unwrap().push(format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"));
    nat.get_mut("KUBE-POSTROUTING").unwrap().extend([
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_owned(),
    ]);
    filter.get_mut("KUBE-FORWARD").unwrap().extend([
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_owned(),
        format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
    ]);

    let mut ports: BTreeMap<(ServicePortName, Protocol), ServicePort<'_>> = BTreeMap::new();
    for (f, e) in &table.frontends {
        ports.entry((e.service.clone(), f.protocol)).or_default().entries.push((*f, e));
    }
    let mut node_port_addrs: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut services_rules = Vec::new();
    for ((spn, protocol), sp) in &ports {
        let p = proto(*protocol);
        let svc = naming::service_chain(spn, *protocol);
        let svl = naming::local_chain(spn, *protocol);
        let ext = naming::external_chain(spn, *protocol);
        let fw = naming::firewall_chain(spn, *protocol);
        let cluster = sp.cluster_set();
        let local = sp.local_endpoints();
        let affinity = sp.entries[0].1.affinity_timeout;
        // The external policy is read from a frontend external traffic uses (a ClusterIP's says Cluster).
        let masquerade_external = sp
            .entries
            .iter()
            .find(|(_, e)| e.kind != FrontendKind::ClusterIp)
            .is_some_and(|(_, e)| e.masquerade_external);

        // The service chain, the local chain, and the endpoint chains.
        endpoint_rules(&mut nat, &svc, spn, *protocol, &cluster.endpoints, affinity);
        // The local chain, for internalTrafficPolicy Local on the ClusterIP or externalTrafficPolicy Local.
        let uses_local = sp.entries.iter().any(|(_, e)| {
            if e.kind == FrontendKind::ClusterIp {
                e.internal.endpoints != cluster.endpoints
            } else {
                !e.masquerade_external
            }
        });
        if uses_local {
            endpoint_rules(&mut nat, &svl, spn, *protocol, &local, affinity);
        }
        let mut seps: BTreeSet<Endpoint> = cluster.endpoints.iter().copied().collect();
        seps.extend(local.iter().copied());
        for ep in &seps {
            let sep = naming::endpoint_chain(spn, *protocol, *ep);
            let mut rules = vec![format!("-A {sep} -m comment --comment {spn} -s {}/32 -j KUBE-MARK-MASQ", ep.addr)];
            let recent = if affinity.is_some() { format!(" -m recent --name {sep} --set") } else { String::new() };
            rules.push(format!(
                "-A {sep} -m comment --comment {spn} -m {p} -p {p}{recent} -j DNAT --to-destination {ep}"
            ));
            nat.insert(sep, rules);
        }

        let mut has_external = false;
        for (f, e) in &sp.entries {
            let m = matches(*f);
            match e.kind {
                FrontendKind::ClusterIp => {
                    // The internal set is the cluster set unless internalTrafficPolicy is Local.
                    let target = if e.internal.endpoints == cluster.endpoints { &svc } else { &svl };
                    if e.internal.endpoints.is_empty() {
                        let why = if e.internal.reject_when_empty {
                            ("has no endpoints", "REJECT")
                        } else {
                            ("has no local endpoints", "DROP")
                        };
                        filter.get_mut("KUBE-SERVICES").unwrap().push(format!(
                            "-A KUBE-SERVICES -m comment --comment \"{spn} {}\" {m} -j {}",
                            why.0, why.1
                        ));
                    } else {
                        services_rules.push(format!(
                            "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" {m} -j {target}"
                        ));
                        let svc_rules = nat.get_mut(&svc).unwrap();
                        if config.masquerade_all {
                            svc_rules.insert(
                                0,
                                format!("-A {svc} -m comment --comment \"{spn} cluster IP\" {m} -j KUBE-MARK-MASQ"),
                            );
                        } else if let Some((net, len)) = config.cluster_cidr {
                            svc_rules.insert(0, format!("-A {svc} -m comment --comment \"{spn} cluster IP\" {m} ! -s {net}/{len} -j KUBE-MARK-MASQ"));
                        }
                    }
                }
                FrontendKind::NodePort | FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
                    has_external = true;
                    let label = match e.kind {
                        FrontendKind::NodePort => "nodePort",
                        FrontendKind::ExternalIp => "external IP",
                        _ => "loadbalancer IP",
                    };
                    if e.kind == FrontendKind::NodePort {
                        node_port_addrs.insert(f.addr);
                    }
                    if e.external.endpoints.is_empty() {
                        let why = if e.external.reject_when_empty {
                            ("has no endpoints", "REJECT")
                        } else {
                            ("has no local endpoints", "DROP")
                        };
                        filter.get_mut("KUBE-EXTERNAL-SERVICES").unwrap().push(format!(
                            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} {}\" {m} -j {}",
                            why.0, why.1
                        ));
                    }
                    let jump = if e.source_ranges.is_empty() {
                        &ext
                    } else {
                        let fw_rules = nat.entry(fw.clone()).or_default();
                        for (net, len) in &e.source_ranges {
                            fw_rules.push(format!(
                                "-A {fw} -m comment --comment \"{spn} {label}\" -s {net}/{len} -j {ext}"
                            ));
                        }
                        fw_rules.push(format!("-A {fw} -m comment --comment \"{spn} {label}\" -j KUBE-MARK-DROP"));
                        &fw
                    };
                    if e.kind == FrontendKind::NodePort {
                        nat.get_mut("KUBE-NODEPORTS").unwrap().push(format!(
                            "-A KUBE-NODEPORTS -m comment --comment {spn} -m {p} -p {p} -d {}/32 --dport {} -j {jump}",
                            f.addr, f.port
                        ));
                    } else {
                        services_rules
                            .push(format!("-A KUBE-SERVICES -m comment --comment \"{spn} {label}\" {m} -j {jump}"));
                    }
                }
            }
        }
        if has_external {
            let mut rules = Vec::new();
            if masquerade_external {
                rules.push(format!("-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ"));
                rules.push(format!("-A {ext} -j {svc}"));
            } else {
                if let Some((net, len)) = config.cluster_cidr {
                    rules.push(format!("-A {ext} -m comment --comment \"pod traffic for {spn} external destinations\" -s {net}/{len} -j {svc}"));
                }
                // iptables spells "any suffix" as `+`; only prefix patterns translate.
                for prefix in
                    config.pod_interfaces.iter().filter_map(|p| p.strip_suffix('*')).filter(|p| !p.contains('*'))
                {
                    rules.push(format!("-A {ext} -m comment --comment \"pod traffic for {spn} external destinations\" -i {prefix}+ -j {svc}"));
                }
                rules.push(format!("-A {ext} -m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"));
                rules.push(format!("-A {ext} -m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {svc}"));
                rules.push(format!("-A {ext} -j {svl}"));
            }
            nat.insert(ext.clone(), rules);
        }
    }
    // Load-balancer traffic from outside the source ranges is marked in nat and dropped in filter.
    if nat.keys().any(|k| k.starts_with("KUBE-FW-")) {
        nat.insert("KUBE-MARK-DROP".into(), vec!["-A KUBE-MARK-DROP -j MARK --or-mark 0x8000".into()]);
        filter
            .get_mut("KUBE-PROXY-FIREWALL")
            .unwrap()
            .push("-A KUBE-PROXY-FIREWALL -m comment --comment \"load balancer source ranges\" -m mark --mark 0x8000/0x8000 -j DROP".into());
    }
    let services = nat.get_mut("KUBE-SERVICES").unwrap();
    services.extend(services_rules);
    for addr in &node_port_addrs {
        services.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d {addr}/32 -j KUBE-NODEPORTS"
        ));
    }
    Ruleset { nat, filter }
}
