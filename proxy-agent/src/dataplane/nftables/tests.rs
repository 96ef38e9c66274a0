use std::net::Ipv4Addr;

use super::{Installed, print::*, transaction};
use crate::dataplane::netfilter::{Family, dataplane::Previous};
use crate::{
    dataplane::netfilter::RuleConfig,
    model::{BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, Protocol, ServicePortName, ServiceTable},
    testing::Netns,
};

fn ep(last: u8, local: bool) -> Endpoint {
    Endpoint { addr: Ipv4Addr::new(10, 200, 1, last).into(), port: 8080, local }
}

fn set(endpoints: Vec<Endpoint>) -> BackendSet {
    BackendSet { reject_when_empty: endpoints.is_empty(), endpoints }
}

fn entry(name: &str, kind: FrontendKind, external: Vec<Endpoint>, internal: Vec<Endpoint>) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "default".into(), name: name.into(), port: "http".into() },
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

fn vip(last: u8) -> Frontend {
    Frontend { addr: Ipv4Addr::new(10, 32, 0, last).into(), port: 80, protocol: Protocol::Tcp }
}

#[test]
fn a_cluster_ip_is_one_map_element_and_its_endpoints_are_chosen_by_a_numgen_cascade() {
    let mut t = ServiceTable::default();
    let both = vec![ep(2, true), ep(3, false)];
    t.frontends.insert(vip(20), entry("web", FrontendKind::ClusterIp, both.clone(), both));
    let r = render(&t, &RuleConfig::default());
    let svc = super::naming::service_chain(&t.frontends[&vip(20)].service, Protocol::Tcp);
    assert_eq!(
        r.maps[SERVICE_IPS].get("10.32.0.20 . tcp . 80"),
        Some(&format!("comment \"default/web:http cluster IP\" : goto {svc}"))
    );
    let rules = &r.chains[&svc].rules;
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(rules[0].starts_with("numgen random mod 2 0 goto endpoint-"), "{rules:?}");
    assert!(rules[1].starts_with("goto endpoint-"), "the last endpoint takes the rest: {rules:?}");
    assert_eq!(r.chains.keys().filter(|c| c.starts_with("endpoint-")).count(), 2);
    let ep_rules = &r.chains.iter().find(|(c, _)| c.ends_with("__10.200.1.2/8080")).unwrap().1.rules;
    assert_eq!(ep_rules[0], "ip saddr 10.200.1.2 jump mark-for-masquerade", "hairpin");
    assert_eq!(ep_rules[1], "meta l4proto tcp dnat to 10.200.1.2:8080");
    assert!(r.maps[NO_ENDPOINT_SERVICES].is_empty());
}

#[test]
fn no_endpoints_reject_and_a_local_policy_without_local_endpoints_drops() {
    let mut t = ServiceTable::default();
    t.frontends.insert(vip(21), entry("empty", FrontendKind::ClusterIp, vec![], vec![]));
    let node_port = Frontend { addr: Ipv4Addr::new(10, 240, 0, 11).into(), port: 30080, protocol: Protocol::Udp };
    let mut local = entry("local", FrontendKind::NodePort, vec![], vec![ep(9, false)]);
    local.external.reject_when_empty = false;
    local.masquerade_external = false;
    t.frontends.insert(node_port, local);
    let r = render(
        &t,
        &RuleConfig {
            cluster_cidrs: crate::model::ClusterCidrs::new(&[(Ipv4Addr::new(10, 200, 0, 0).into(), 16)]).unwrap(),
            ..Default::default()
        },
    );
    let no_ep = &r.maps[NO_ENDPOINT_SERVICES];
    assert_eq!(no_ep["10.32.0.21 . tcp . 80"], "comment \"default/empty:http has no endpoints\" : goto reject-chain");
    assert_eq!(no_ep["10.240.0.11 . udp . 30080"], "comment \"default/local:http has no local endpoints\" : drop");
    // Pod traffic still reaches the remote endpoint through the external chain.
    let ext = &r.chains[&super::naming::external_chain(&t.frontends[&node_port].service, Protocol::Udp)].rules;
    assert!(ext[0].starts_with("ip saddr 10.200.0.0/16 goto service-"), "{ext:?}");
    assert!(ext.last().unwrap().starts_with("goto local-"), "{ext:?}");
}

#[test]
fn affinity_source_ranges_and_masquerade_all_render_as_sets_firewall_chains_and_marks() {
    let mut t = ServiceTable::default();
    let lb = Frontend { addr: Ipv4Addr::new(192, 0, 2, 10).into(), port: 443, protocol: Protocol::Tcp };
    let mut e = entry("lb", FrontendKind::LoadBalancer, vec![ep(2, true)], vec![ep(2, true)]);
    e.affinity_timeout = Some(600);
    e.source_ranges = vec![(Ipv4Addr::new(10, 240, 0, 0).into(), 24)];
    t.frontends.insert(lb, e);
    let mut cip = entry("lb", FrontendKind::ClusterIp, vec![ep(2, true)], vec![ep(2, true)]);
    cip.affinity_timeout = Some(600);
    t.frontends.insert(vip(22), cip);
    let r = render(&t, &RuleConfig { masquerade_all: true, ..Default::default() });
    assert_eq!(r.sets.len(), 1);
    let fw = r.chains.iter().find(|(n, _)| n.starts_with("firewall-")).expect("firewall chain").1;
    assert!(fw.rules[0].starts_with("ip saddr { 10.240.0.0/24 } goto external-"), "{fw:?}");
    assert_eq!(fw.rules[1], "drop");
    let svc = r.chains.iter().find(|(n, _)| n.starts_with("service-")).unwrap().1;
    assert_eq!(svc.rules[0], "ip daddr 10.32.0.22 meta l4proto tcp th dport 80 jump mark-for-masquerade");
    assert!(svc.rules[1].starts_with("ip saddr @affinity-"), "{svc:?}");
    let endpoint = r.chains.iter().find(|(n, _)| n.starts_with("endpoint-")).unwrap().1;
    assert!(endpoint.rules[1].ends_with("{ ip saddr timeout 600s }"), "{endpoint:?}");
}

#[test]
fn an_unchanged_ruleset_needs_no_writes_and_a_changed_endpoint_rewrites_only_its_chains() {
    let mut t = ServiceTable::default();
    t.frontends.insert(vip(20), entry("web", FrontendKind::ClusterIp, vec![ep(2, true)], vec![ep(2, true)]));
    t.frontends.insert(vip(21), entry("api", FrontendKind::ClusterIp, vec![ep(5, true)], vec![ep(5, true)]));
    let config = RuleConfig::default();
    let before = render(&t, &config);
    let (_, stats) = transaction(Family::V4, &Previous::Applied(&before), &before);
    assert_eq!((stats.writes, stats.deletes), (0, 0));

    t.frontends.insert(vip(20), entry("web", FrontendKind::ClusterIp, vec![ep(3, true)], vec![ep(3, true)]));
    let after = render(&t, &config);
    let (script, _) = transaction(Family::V4, &Previous::Applied(&before), &after);
    assert!(!script.contains("/api/"), "the other Service is untouched:\n{script}");
    let line = |prefix: &str| script.lines().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}"));
    assert!(line("add chain ip proxy-agent endpoint-") < line("flush chain ip proxy-agent service-"));
    assert!(line("flush chain ip proxy-agent service-") < line("delete chain ip proxy-agent endpoint-"));
}

#[test]
fn a_full_resync_deletes_what_the_kernel_holds_but_nobody_wants() {
    let installed = Installed {
        chains: ["services", "service-OLD-default/gone/tcp/http"].map(String::from).into(),
        maps: [SERVICE_IPS.to_owned(), "stale-map".to_owned()].into(),
        sets: ["affinity-OLD".to_owned()].into(),
    };
    let (script, _) = transaction(
        Family::V4,
        &Previous::Installed(&installed),
        &render(&ServiceTable::default(), &RuleConfig::default()),
    );
    for expected in [
        "flush map ip proxy-agent service-ips",
        "flush chain ip proxy-agent services",
        "delete chain ip proxy-agent service-OLD-default/gone/tcp/http",
        "delete map ip proxy-agent stale-map",
        "delete set ip proxy-agent affinity-OLD",
    ] {
        assert!(script.lines().any(|l| l == expected), "{expected} missing from:\n{script}");
    }
}

#[test]
fn installed_names_are_read_from_our_table_only() {
    let dump = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "handle": 1}},
        {"chain": {"family": "ip6", "table": "proxy-agent", "name": "elsewhere", "handle": 1}},
        {"chain": {"family": "ip", "table": "proxy-agent", "name": "services", "handle": 2}},
        {"chain": {"family": "ip", "table": "proxy-agent", "name": "nat-output", "handle": 3, "type": "nat"}}]}"#;
    let names = super::names_in_table(dump, Family::V4, "chain").unwrap();
    assert_eq!(names, ["nat-output", "services"].map(String::from).into());
}

/// Against the kernel: a long run of incremental transactions leaves exactly what one transaction from
/// nothing installs, for each intermediate table (in a network namespace of the test's own).
#[test]
fn incremental_transactions_converge_to_what_a_fresh_install_holds() {
    for family in Family::ALL {
        converge(family);
    }
}

fn converge(family: Family) {
    let live = Netns::new("nft-live");
    let pods_v6: std::net::IpAddr = "fd00:200::".parse().unwrap();
    let config = RuleConfig {
        cluster_cidrs: crate::model::ClusterCidrs::new(&[(Ipv4Addr::new(10, 200, 0, 0).into(), 16), (pods_v6, 64)])
            .unwrap(),
        pod_interfaces: vec!["veth*".into()],
        ..Default::default()
    };
    let table_of = |seed| {
        let t = generated_table(seed);
        if family.is_ipv6() { as_ipv6(&t) } else { t }
    };
    let mut previous: Option<Ruleset> = None;
    for seed in 0..24 {
        let wanted = print(&crate::dataplane::netfilter::plan::build(&table_of(seed), &config, family));
        let (script, _) = match &previous {
            Some(p) => transaction(family, &Previous::Applied(p), &wanted),
            None => transaction(family, &Previous::Installed(&Installed::default()), &wanted),
        };
        live.nft_f(&script).unwrap_or_else(|e| panic!("{family:?} step {seed}: {e:#}\n{script}"));
        let fresh = Netns::new("nft-fresh");
        fresh.nft_f(&transaction(family, &Previous::Installed(&Installed::default()), &wanted).0).unwrap();
        assert_eq!(live.normalized_table(family), fresh.normalized_table(family), "{family:?} step {seed} diverged");
        previous = Some(wanted);
    }
    // And a full resync over a table someone edited by hand repairs it.
    let wanted = previous.unwrap();
    let table = table(family);
    live.nft_f(&format!("add chain {table} intruder\nflush chain {table} services\n")).unwrap();
    let installed = live.installed(family);
    assert!(installed.chains.contains("intruder"));
    live.nft_f(&transaction(family, &Previous::Installed(&installed), &wanted).0).unwrap();
    let fresh = Netns::new("nft-fresh");
    fresh.nft_f(&transaction(family, &Previous::Installed(&Installed::default()), &wanted).0).unwrap();
    assert_eq!(live.normalized_table(family), fresh.normalized_table(family));
}

/// A varied table from a seed: Services appear, change endpoints and policies, gain and lose load-balancer
/// IPs and NodePorts, and go.
pub(crate) fn generated_table(seed: u32) -> ServiceTable {
    let mut t = ServiceTable::default();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let mut next = |n: u32| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x % n
    };
    for svc in 0..6u8 {
        if next(4) == 0 {
            continue;
        }
        let name = format!("svc{svc}");
        let endpoints: Vec<Endpoint> =
            (0..next(4)).map(|i| ep(10 * svc + u8::try_from(i).unwrap(), next(2) == 0)).collect();
        let local: Vec<Endpoint> = endpoints.iter().filter(|e| e.local).copied().collect();
        let affinity = (next(3) == 0).then_some(60 + next(100));
        let mut cip = entry(&name, FrontendKind::ClusterIp, endpoints.clone(), endpoints.clone());
        cip.affinity_timeout = affinity;
        t.frontends.insert(vip(svc), cip);
        if next(2) == 0 {
            let local_policy = next(2) == 0;
            let external = if local_policy { local.clone() } else { endpoints.clone() };
            let mut np = entry(&name, FrontendKind::LoadBalancer, external, endpoints.clone());
            np.external.reject_when_empty = endpoints.is_empty();
            np.masquerade_external = !local_policy;
            np.affinity_timeout = affinity;
            if next(2) == 0 {
                np.source_ranges =
                    vec![(Ipv4Addr::new(10, 240, 0, 0).into(), 24), (Ipv4Addr::new(192, 0, 2, 0).into(), 24)];
            }
            if next(2) == 0 {
                let mut node_port = np.clone();
                node_port.kind = FrontendKind::NodePort;
                // loadBalancerSourceRanges guard the load-balancer IPs only, as the model builds them.
                node_port.source_ranges.clear();
                let port = 30000 + u16::from(svc);
                t.frontends.insert(
                    Frontend { addr: Ipv4Addr::new(10, 240, 0, 11).into(), port, protocol: Protocol::Tcp },
                    node_port,
                );
            }
            t.frontends
                .insert(Frontend { addr: Ipv4Addr::new(192, 0, 2, svc).into(), port: 80, protocol: Protocol::Tcp }, np);
        }
    }
    t
}

/// `table` moved to IPv6: every address `a.b.c.d` becomes `fd00::a:b:c:d` and every prefix grows by 96,
/// so the same decisions are made over IPv6 addresses.
pub(crate) fn as_ipv6(table: &ServiceTable) -> ServiceTable {
    use std::net::{IpAddr, Ipv6Addr};
    let v6 = |a: IpAddr| match a {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets().map(u16::from);
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, a, b, c, d))
        }
        IpAddr::V6(_) => a,
    };
    let endpoints =
        |eps: &[Endpoint]| -> Vec<Endpoint> { eps.iter().map(|e| Endpoint { addr: v6(e.addr), ..*e }).collect() };
    let frontends = table
        .frontends
        .iter()
        .map(|(f, e)| {
            let mut e = e.clone();
            e.external.endpoints = endpoints(&e.external.endpoints);
            e.internal.endpoints = endpoints(&e.internal.endpoints);
            e.terminating = endpoints(&e.terminating);
            e.source_ranges = e.source_ranges.iter().map(|(a, len)| (v6(*a), len + 96)).collect();
            (Frontend { addr: v6(f.addr), ..*f }, e)
        })
        .collect();
    let service_cidrs = table.service_cidrs.iter().map(|(a, len)| (v6(*a), len + 96)).collect();
    ServiceTable { frontends, service_cidrs }
}

impl Netns {
    fn nft_f(&self, script: &str) -> anyhow::Result<()> {
        crate::dataplane::netfilter::run_with_input("ip", &["netns", "exec", self.name(), "nft", "-f", "-"], script)
    }

    fn nft(&self, args: &[&str]) -> String {
        self.exec(&[&["nft"], args].concat())
    }

    fn installed(&self, family: Family) -> Installed {
        let f = nft_family(family);
        let names = |what: &str, kind: &str| {
            super::names_in_table(&self.nft(&["-j", "--terse", "list", what, f]), family, kind).unwrap()
        };
        Installed { chains: names("chains", "chain"), maps: names("maps", "map"), sets: names("sets", "set") }
    }

    /// The table as sorted JSON objects without handles, map elements sorted: equal for equal content
    /// whatever order it was built in.
    fn normalized_table(&self, family: Family) -> Vec<String> {
        let f = nft_family(family);
        let json: serde_json::Value =
            serde_json::from_str(&self.nft(&["-j", "list", "table", f, "proxy-agent"])).unwrap();
        let mut objects: Vec<String> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let mut o = o.clone();
                strip(&mut o);
                o.to_string()
            })
            .collect();
        objects.sort();
        objects
    }
}

fn strip(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("handle");
            for value in map.values_mut() {
                strip(value);
            }
            if let Some(serde_json::Value::Array(elements)) = map.get_mut("elem") {
                elements.sort_by_key(ToString::to_string);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
        _ => {}
    }
}

/// As the iptables mode's `KUBE-FORWARD` (kubernetes/kubernetes#74839): INVALID forwarded packets are
/// dropped first thing in `filter-forward`, unless conntrack is told to be liberal.
#[test]
fn invalid_forwarded_packets_are_dropped_unless_conntrack_is_liberal() {
    let strict = render(&ServiceTable::default(), &RuleConfig::default());
    let checks = ["ct state new jump endpoints-check", "ct state new jump cluster-ips-check"];
    assert_eq!(strict.chains["filter-forward"].rules, [&["ct state invalid drop"][..], &checks].concat());
    let liberal = render(&ServiceTable::default(), &RuleConfig { tcp_be_liberal: true, ..Default::default() });
    assert_eq!(liberal.chains["filter-forward"].rules, checks);
}

/// kube-proxy's `cluster-ips-check`: every ClusterIP (with endpoints or not) is in `cluster-ips`, whose
/// elements refuse; the service CIDRs drop; both run after DNAT in the forward and output hooks.
#[test]
fn every_cluster_ip_is_refused_on_undefined_ports_and_the_service_cidr_drops_the_rest() {
    let mut t = ServiceTable::default();
    t.frontends.insert(vip(20), entry("web", FrontendKind::ClusterIp, vec![ep(2, true)], vec![ep(2, true)]));
    t.frontends.insert(vip(21), entry("empty", FrontendKind::ClusterIp, Vec::new(), Vec::new()));
    let external = Frontend { addr: Ipv4Addr::new(10, 250, 0, 1).into(), port: 80, protocol: Protocol::Tcp };
    t.frontends.insert(external, entry("web", FrontendKind::ExternalIp, vec![ep(2, true)], vec![ep(2, true)]));
    t.service_cidrs = vec![(Ipv4Addr::new(10, 32, 0, 0).into(), 16)];
    let r = render(&t, &RuleConfig::default());
    let keys: Vec<&String> = r.maps[CLUSTER_IPS].keys().collect();
    assert_eq!(keys, ["10.32.0.20", "10.32.0.21"], "ClusterIPs only, not external IPs");
    assert!(r.maps[CLUSTER_IPS].values().all(|v| v.ends_with(": goto reject-chain")));
    assert_eq!(r.chains["cluster-ips-check"].rules, ["ip daddr vmap @cluster-ips", "ip daddr { 10.32.0.0/16 } drop"]);
    for hook in ["filter-forward", "filter-output"] {
        assert_eq!(r.chains[hook].rules.last().unwrap(), "ct state new jump cluster-ips-check", "{hook}");
    }
    assert_eq!(map_type(Family::V4, CLUSTER_IPS), "type ipv4_addr : verdict;");
    t.service_cidrs.clear();
    let without = render(&t, &RuleConfig::default());
    assert_eq!(without.chains["cluster-ips-check"].rules, ["ip daddr vmap @cluster-ips"], "no CIDR, no drop");
}

/// kube-proxy's `masqueradeBit` moves the masquerade mark (bit 12: 0x1000).
#[test]
fn the_masquerade_bit_sets_the_mark() {
    let r = render(&ServiceTable::default(), &RuleConfig { masquerade_bit: 12, ..RuleConfig::default() });
    assert_eq!(r.chains["mark-for-masquerade"].rules, ["meta mark set meta mark | 0x1000"]);
    assert_eq!(r.chains["masquerading"].rules[0], "meta mark & 0x1000 == 0 return");
}

/// The ruleset of `table`: the plan, printed.
fn render(table: &ServiceTable, config: &RuleConfig) -> Ruleset {
    print(&crate::dataplane::netfilter::plan::build(table, config, Family::V4))
}
