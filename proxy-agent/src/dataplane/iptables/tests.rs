use std::net::Ipv4Addr;

use super::{print::*, restore_input};
use crate::dataplane::netfilter::RuleConfig;
use crate::model::{
    BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, Protocol, ServicePortName, ServiceTable,
};

fn ep(last: u8, local: bool) -> Endpoint {
    Endpoint { addr: Ipv4Addr::new(10, 200, 1, last).into(), port: 8080, local }
}

fn entry(kind: FrontendKind, external: Vec<Endpoint>, internal: Vec<Endpoint>) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "default".into(), name: "web".into(), port: "http".into() },
        kind,
        external: BackendSet { reject_when_empty: external.is_empty(), endpoints: external },
        internal: BackendSet { reject_when_empty: internal.is_empty(), endpoints: internal },
        terminating: Vec::new(),
        masquerade_external: kind == FrontendKind::ClusterIp,
        affinity_timeout: None,
        lb_algorithm: None,
        source_ranges: Vec::new(),
    }
}

fn all_rules(r: &Ruleset) -> String {
    r.nat.values().chain(r.filter.values()).flatten().cloned().collect::<Vec<_>>().join("\n")
}

#[test]
fn a_cluster_ip_with_two_endpoints_renders_kube_proxys_chains() {
    let mut t = ServiceTable::default();
    let f = Frontend { addr: Ipv4Addr::new(10, 32, 0, 20).into(), port: 80, protocol: Protocol::Tcp };
    t.frontends
        .insert(f, entry(FrontendKind::ClusterIp, vec![ep(2, true), ep(3, false)], vec![ep(2, true), ep(3, false)]));
    let r = render(&t, &RuleConfig::default());
    let svc = "KUBE-SVC-".to_owned() + &super::naming::service_chain(&t.frontends[&f].service, Protocol::Tcp)[9..];
    let services = &r.nat["KUBE-SERVICES"];
    assert_eq!(
        services,
        &vec![format!(
            "-A KUBE-SERVICES -d 10.32.0.20/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j {svc}"
        )]
    );
    let chain = &r.nat[&svc];
    assert_eq!(chain.len(), 2);
    assert!(chain[0].contains("--probability 0.50000000000"), "{chain:?}");
    assert!(!chain[1].contains("statistic"), "the last endpoint takes the rest: {chain:?}");
    let seps: Vec<&String> = r.nat.keys().filter(|k| k.starts_with("KUBE-SEP-")).collect();
    assert_eq!(seps.len(), 2);
    assert!(all_rules(&r).contains("-j DNAT --to-destination 10.200.1.2:8080"));
    assert!(
        all_rules(&r).contains("-s 10.200.1.2/32 -m comment --comment \"default/web:http\" -j KUBE-MARK-MASQ"),
        "hairpin masquerade"
    );
}

#[test]
fn no_endpoints_reject_and_local_policy_without_local_endpoints_drops() {
    let mut t = ServiceTable::default();
    let vip = Frontend { addr: Ipv4Addr::new(10, 32, 0, 21).into(), port: 80, protocol: Protocol::Tcp };
    t.frontends.insert(vip, entry(FrontendKind::ClusterIp, vec![], vec![]));
    let r = render(&t, &RuleConfig::default());
    assert!(all_rules(&r).contains(
        "-d 10.32.0.21/32 -p tcp -m comment --comment \"default/web:http has no endpoints\" -m tcp --dport 80 -j REJECT"
    ));

    let mut t = ServiceTable::default();
    let np = Frontend { addr: Ipv4Addr::new(10, 240, 0, 11).into(), port: 30080, protocol: Protocol::Tcp };
    let mut e = entry(FrontendKind::NodePort, vec![], vec![ep(3, false)]);
    e.external.reject_when_empty = false;
    e.masquerade_external = false;
    t.frontends.insert(np, e);
    let r = render(&t, &RuleConfig::default());
    let text = all_rules(&r);
    assert!(text.contains("has no local endpoints\" -m tcp --dport 30080 -j DROP"), "{text}");
    assert!(text.contains("-A KUBE-SERVICES -d 10.240.0.11/32 -m comment"), "{text}");
    assert!(text.contains("must be the last rule in this chain\" -j KUBE-NODEPORTS"), "{text}");
    assert!(r.nat.keys().any(|k| k.starts_with("KUBE-SVL-")), "a Local policy uses the local chain");
}

#[test]
fn restore_input_rewrites_only_changed_chains_and_deletes_gone_ones() {
    let old: Chains = [
        ("A".to_owned(), vec!["-A A -j X".to_owned()]),
        ("B".to_owned(), vec!["-A B -j Y".to_owned()]),
        ("C".to_owned(), vec![]),
    ]
    .into_iter()
    .collect();
    let new: Chains = [
        ("A".to_owned(), vec!["-A A -j X".to_owned()]),
        ("B".to_owned(), vec!["-A B -j Z".to_owned()]),
        ("D".to_owned(), vec!["-A D -j W".to_owned()]),
    ]
    .into_iter()
    .collect();
    let mut out = String::new();
    let (written, deleted) = restore_input("nat", Some(&old), &new, &mut out);
    assert_eq!(out, "*nat\n:B - [0:0]\n:D - [0:0]\n:C - [0:0]\n-A B -j Z\n-A D -j W\n-X C\nCOMMIT\n");
    assert_eq!((written, deleted), (2, 1));
    let mut none = String::new();
    assert_eq!(restore_input("nat", Some(&new), &new, &mut none), (0, 0));
    assert!(none.is_empty(), "nothing changed, nothing to restore");
}

#[test]
fn iptables_save_dumps_are_read_back() {
    // kubelet's chains are not ours to rewrite or delete: INPUT jumps to KUBE-FIREWALL.
    let dump = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n:KUBE-FIREWALL - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.32.0.1/32 -j KUBE-SVC-X\n-A KUBE-FIREWALL -j DROP\nCOMMIT\n";
    let chains = super::parse_save(dump);
    assert_eq!(chains.keys().collect::<Vec<_>>(), ["KUBE-SERVICES", "KUBE-SVC-X"]);
    assert_eq!(chains["KUBE-SERVICES"], vec!["-A KUBE-SERVICES -d 10.32.0.1/32 -j KUBE-SVC-X".to_owned()]);
}

/// kubernetes/kubernetes#74839: INVALID forwarded packets are dropped, unless conntrack is told to be
/// liberal (then nothing is marked INVALID for being out of window, and kube-proxy leaves the rule out).
#[test]
fn invalid_forwarded_packets_are_dropped_unless_conntrack_is_liberal() {
    let drop = "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP";
    let strict = render(&ServiceTable::default(), &RuleConfig::default());
    assert_eq!(strict.filter["KUBE-FORWARD"][0], drop);
    let liberal = render(&ServiceTable::default(), &RuleConfig { tcp_be_liberal: true, ..Default::default() });
    assert!(!liberal.filter["KUBE-FORWARD"].iter().any(|r| r == drop));
    assert_eq!(liberal.filter["KUBE-FORWARD"].len(), strict.filter["KUBE-FORWARD"].len() - 1);
}

/// Against the kernel: what `iptables-save` prints back is exactly what was rendered, so comparing the
/// kernel's chains with the wanted ones finds no difference where there is none (a restarted agent and the
/// periodic resync then rewrite nothing), for a run of varied tables and both local-traffic settings.
#[test]
fn iptables_save_prints_back_exactly_what_was_rendered() {
    use crate::dataplane::netfilter::Family;
    let ns = crate::testing::Netns::new("ipt-canon");
    let pods_v6: std::net::IpAddr = "fd00:200::".parse().unwrap();
    let configs = [
        RuleConfig { pod_interfaces: vec!["veth*".into()], ..Default::default() },
        RuleConfig {
            cluster_cidrs: crate::model::ClusterCidrs::new(&[(Ipv4Addr::new(10, 200, 0, 0).into(), 16), (pods_v6, 64)])
                .unwrap(),
            masquerade_all: true,
            ..Default::default()
        },
    ];
    let mut differences = Vec::new();
    for family in Family::ALL {
        let (restore, save, iptables) = if family.is_ipv6() {
            ("ip6tables-restore", "ip6tables-save", "ip6tables")
        } else {
            ("iptables-restore", "iptables-save", "iptables")
        };
        for (c, config) in configs.iter().enumerate() {
            for seed in 0..12 {
                let mut table = crate::dataplane::nftables::tests::generated_table(seed);
                if family.is_ipv6() {
                    table = crate::dataplane::nftables::tests::as_ipv6(&table);
                }
                let wanted = print(&crate::dataplane::netfilter::plan::build(&table, config, family));
                let mut input = String::new();
                restore_input("nat", None, &wanted.nat, &mut input);
                restore_input("filter", None, &wanted.filter, &mut input);
                crate::dataplane::netfilter::run_with_input(
                    "ip",
                    &["netns", "exec", ns.name(), restore, "-w", "--noflush"],
                    &input,
                )
                .unwrap_or_else(|e| panic!("{family:?} config {c} seed {seed}: {e:#}"));
                for (table, chains) in [("nat", &wanted.nat), ("filter", &wanted.filter)] {
                    let saved = super::parse_save(&ns.exec(&[save, "-t", table]));
                    for (name, rules) in chains {
                        let back = saved.get(name).cloned().unwrap_or_default();
                        for (want, got) in rules.iter().zip(&back) {
                            if want != got {
                                differences.push(format!(
                                    "{family:?} config {c} seed {seed}\n  rendered {want}\n  saved    {got}"
                                ));
                            }
                        }
                        if rules.len() != back.len() {
                            differences.push(format!(
                                "{family:?} config {c} seed {seed} {name}: {} rules, {} back",
                                rules.len(),
                                back.len()
                            ));
                        }
                    }
                }
                // Empty the namespace's chains for the next table.
                for table in ["nat", "filter"] {
                    let _ = ns.exec(&[iptables, "-t", table, "-F"]);
                    let _ = ns.exec(&[iptables, "-t", table, "-X"]);
                }
            }
        }
    }
    differences.sort();
    differences.dedup();
    assert!(differences.is_empty(), "{} differences:\n{}", differences.len(), differences.join("\n"));
}

/// kube-proxy's nftables `cluster-ips-check`, which its iptables mode lacks: new forwarded or local packets
/// still addressed to a ClusterIP are refused, the rest of the service CIDR dropped, and only packets into
/// the CIDR walk the per-ClusterIP rules.
#[test]
fn cluster_ips_are_refused_on_undefined_ports_and_the_service_cidr_drops_the_rest() {
    let mut t = ServiceTable::default();
    let f = Frontend { addr: Ipv4Addr::new(10, 32, 0, 20).into(), port: 80, protocol: Protocol::Tcp };
    t.frontends.insert(f, entry(FrontendKind::ClusterIp, vec![ep(2, true)], vec![ep(2, true)]));
    t.service_cidrs = vec![(Ipv4Addr::new(10, 32, 0, 0).into(), 16)];
    let r = render(&t, &RuleConfig::default());
    assert_eq!(r.filter["KUBE-CLUSTER-IPS-CHECK"], ["-A KUBE-CLUSTER-IPS-CHECK -d 10.32.0.0/16 -j KUBE-CLUSTER-IPS"]);
    assert_eq!(
        r.filter["KUBE-CLUSTER-IPS"],
        [
            "-A KUBE-CLUSTER-IPS -d 10.32.0.20/32 -m comment --comment \"Reject traffic to invalid ports of ClusterIPs\" -j REJECT --reject-with icmp-port-unreachable",
            "-A KUBE-CLUSTER-IPS -m comment --comment \"Drop traffic to unallocated ClusterIPs\" -j DROP",
        ]
    );
    t.service_cidrs.clear();
    let without = render(&t, &RuleConfig::default());
    assert_eq!(without.filter["KUBE-CLUSTER-IPS-CHECK"], ["-A KUBE-CLUSTER-IPS-CHECK -j KUBE-CLUSTER-IPS"]);
    assert_eq!(without.filter["KUBE-CLUSTER-IPS"].len(), 1, "no CIDR, no drop");
}

/// kube-proxy puts the ClusterIP masquerade rule in the chain ClusterIP traffic goes to: the local one
/// under internalTrafficPolicy Local. Without a cluster CIDR, "not local" is "not from a pod interface".
#[test]
fn the_cluster_ip_masquerade_rule_is_in_the_chain_the_cluster_ip_uses() {
    let mut t = ServiceTable::default();
    let f = Frontend { addr: Ipv4Addr::new(10, 32, 0, 20).into(), port: 80, protocol: Protocol::Tcp };
    let node_port = Frontend { addr: Ipv4Addr::new(10, 240, 0, 11).into(), port: 30080, protocol: Protocol::Tcp };
    let all = vec![ep(2, true), ep(3, false)];
    t.frontends.insert(f, entry(FrontendKind::ClusterIp, vec![ep(2, true)], vec![ep(2, true)]));
    t.frontends.insert(node_port, entry(FrontendKind::NodePort, all.clone(), all));
    let config = RuleConfig { pod_interfaces: vec!["veth*".into(), "cali*".into()], ..RuleConfig::default() };
    let r = render(&t, &config);
    let svl = super::naming::local_chain(&t.frontends[&f].service, Protocol::Tcp);
    assert!(r.nat[&svl][0].ends_with("-j KUBE-PROXY-MASQ-UNLESS-POD"), "{:?}", r.nat[&svl]);
    assert_eq!(
        r.nat["KUBE-PROXY-MASQ-UNLESS-POD"],
        [
            "-A KUBE-PROXY-MASQ-UNLESS-POD -i veth+ -j RETURN",
            "-A KUBE-PROXY-MASQ-UNLESS-POD -i cali+ -j RETURN",
            "-A KUBE-PROXY-MASQ-UNLESS-POD -j KUBE-MARK-MASQ",
        ]
    );
}

/// kube-proxy's `masqueradeBit` moves the masquerade mark (bit 12: 0x1000) in every rule that uses it.
#[test]
fn the_masquerade_bit_sets_the_mark() {
    let r = render(&ServiceTable::default(), &RuleConfig { masquerade_bit: 12, ..RuleConfig::default() });
    let text = all_rules(&r);
    assert!(text.contains("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x1000/0x1000"), "{text}");
    assert!(text.contains("-m mark ! --mark 0x1000/0x1000 -j RETURN"), "{text}");
    assert!(!text.contains("0x4000"), "{text}");
}

/// The ruleset of `table`: the plan, printed.
fn render(table: &ServiceTable, config: &RuleConfig) -> Ruleset {
    print(&crate::dataplane::netfilter::plan::build(table, config, crate::dataplane::netfilter::Family::V4))
}
