//! The eBPF dataplane's connection tables, with real traffic: their sweep, their capacity and their
//! metrics, for each family's table (`CONNTRACK` and `SNAT`, `CONNTRACK6` and `SNAT6`; the Services are
//! dual-stack). (Lifetimes in every mode: `flow_lifetimes.rs`.)

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use proxy_common::{
    conntrack::{CtKey, CtKey6, CtValue, CtValue6, SnatValue, SnatValue6},
    maps::{CONNTRACK, CONNTRACK6, SNAT, SNAT6},
};
use proxy_lab::{
    Lab, LabSpec,
    echo::{Proto, TcpSession, http_get_path, udp_ask_from_ports},
    lab::node_name,
    manifests::{Endpoint, Port, Svc},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn metrics(lab: &Lab) -> String {
    http_get_path(&lab.node_ns(1), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249), "/metrics", TIMEOUT).unwrap().1
}

/// The node's possible CPUs, as the agent counts them for its tables' headroom.
fn cpus() -> u32 {
    aya::util::nr_cpus().unwrap().get()
}

fn spec_with(args: &[&str]) -> LabSpec {
    let mut spec = LabSpec::default();
    spec.agent_args.extend(args.iter().map(|a| (*a).to_owned()));
    spec
}

/// How many entries node 1's pinned map `name` holds (key `K`, value `V`).
fn entries<K: aya::Pod, V: aya::Pod>(lab: &Lab, name: &str) -> usize {
    let map = lab.pinned_map(1, name).unwrap();
    aya::maps::HashMap::<_, K, V>::try_from(map).unwrap().keys().count()
}

/// Closed TCP flows and idle UDP flows leave the eBPF tables by the background sweep, without any packet
/// of theirs: `CONNTRACK` and `SNAT` (for flows from outside to a NodePort, SNATed to the remote backend)
/// empty, and the metrics count the flows.
#[test]
fn the_sweep_removes_ended_flows_and_the_metrics_count_them() {
    let mut lab = Lab::start(spec_with(&[
        "--conntrack-udp-timeout",
        "1s",
        "--conntrack-udp-timeout-stream",
        "1s",
        "--conntrack-tcp-timeout-time-wait",
        "1s",
    ]))
    .expect("lab");
    let backend = lab.pod(2, 1).clone();
    lab.serve(&backend, &[8080], &[5353]).unwrap();
    lab.serve6(&backend, &[8080, 5353]).unwrap();
    let ports = vec![
        Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
        Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
    ];
    let vip = Ipv4Addr::new(10, 32, 0, 61);
    let vip6 = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x61);
    let mut svc = Svc::new("mixed", vip, ports);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30161, 30162];
    svc.cluster_ip6 = Some(vip6);
    let v6 = [Endpoint::ready(backend.ip6.unwrap(), node_name(2))];
    lab.write_manifest(
        "svc.yaml",
        &svc.with_endpoints_of_both_families(&[Endpoint::ready(backend.ip, node_name(2))], &v6),
    )
    .unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let replies = proxy_lab::echo::requests(&client, Proto::Tcp, SocketAddrV4::new(vip, 80), 20, TIMEOUT).unwrap();
    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    let udp = udp_ask_from_ports(&client, SocketAddrV4::new(vip, 53), (48_100..48_120).collect());
    assert!(udp.iter().all(Result::is_ok), "{udp:?}");
    let node_port = SocketAddrV4::new(proxy_lab::lab::node_ip(1), 30161);
    let external = proxy_lab::echo::requests(&lab.external_ns(), Proto::Tcp, node_port, 10, TIMEOUT).unwrap();
    assert!(external.iter().all(Result::is_ok), "{external:?}");
    // The same flows over IPv6.
    let replies =
        proxy_lab::echo6::requests(&client, Proto::Tcp, SocketAddrV6::new(vip6, 80, 0, 0), 20, TIMEOUT).unwrap();
    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    let udp = udp_ask_from_ports(&client, SocketAddrV6::new(vip6, 53, 0, 0), (48_100..48_120).collect());
    assert!(udp.iter().all(Result::is_ok), "{udp:?}");
    let node_port6 = SocketAddrV6::new(proxy_lab::lab::node_ip6(1), 30161, 0, 0);
    let external = proxy_lab::echo6::requests(&lab.external_ns(), Proto::Tcp, node_port6, 10, TIMEOUT).unwrap();
    assert!(external.iter().all(Result::is_ok), "{external:?}");
    let counts = || {
        (
            entries::<CtKey, CtValue>(&lab, CONNTRACK),
            entries::<CtKey, SnatValue>(&lab, SNAT),
            entries::<CtKey6, CtValue6>(&lab, CONNTRACK6),
            entries::<CtKey6, SnatValue6>(&lab, SNAT6),
        )
    };
    // The situation: in each family 50 flows with two entries each, and 10 SNATed flows with two SNAT
    // entries each.
    let (ct, snat, ct6, snat6) = counts();
    assert!(ct >= 100 && ct6 >= 100, "expected the flows' entries in the tables, found {ct} and {ct6}");
    assert!(snat >= 20 && snat6 >= 20, "expected the SNATed flows' entries, found {snat} and {snat6}");

    // Lifetimes of 1 s, a sweep pass every half second: gone well within 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counts() != (0, 0, 0, 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(counts(), (0, 0, 0, 0), "ended flows left in the tables (CONNTRACK, SNAT, CONNTRACK6, SNAT6)");
    let text = metrics(&lab);
    let expired = metric(&text, "proxy_agent_conntrack_expired_total").unwrap_or(0.0);
    assert!(expired >= 100.0, "expired flows of both families counted: {expired}\n{text}");
    for map in [CONNTRACK, SNAT, CONNTRACK6, SNAT6] {
        let name = format!("proxy_agent_bpf_map_entries{{map=\"{map}\"}}");
        assert_eq!(metric(&text, &name), Some(0.0), "{map}: {text}");
    }
    assert_eq!(metric(&text, "proxy_agent_conntrack_evictions_total"), Some(0.0), "{text}");
}

/// A table sized small (`--conntrack-min 1024 --conntrack-max-per-core 0`: 2048 entries and the per-CPU
/// headroom) flooded with
/// 3000 UDP flows: the capacity is what was asked, evictions are counted, the agent warns once, and a TCP
/// connection kept busy through the flood keeps its backend and its replies' translation.
#[test]
fn a_full_table_evicts_idle_flows_reports_it_and_keeps_busy_ones() {
    let mut lab = Lab::start(spec_with(&["--conntrack-min", "1024", "--conntrack-max-per-core", "0"])).expect("lab");
    let backend = lab.pod(2, 1).clone();
    lab.serve(&backend, &[8080], &[5353]).unwrap();
    let ports = vec![
        Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
        Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
    ];
    lab.serve6(&backend, &[8080, 5353]).unwrap();
    let vip = Ipv4Addr::new(10, 32, 0, 62);
    let vip6 = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x62);
    let mut svc = Svc::new("busy", vip, ports);
    svc.cluster_ip6 = Some(vip6);
    let (v4, v6) = ([Endpoint::ready(backend.ip, node_name(2))], [Endpoint::ready(backend.ip6.unwrap(), node_name(2))]);
    lab.write_manifest("svc.yaml", &svc.with_endpoints_of_both_families(&v4, &v6)).unwrap();
    lab.start_agents().unwrap();
    let text = metrics(&lab);
    let capacity = proxy_common::capacity::lru_entries(1024, 2, cpus());
    for map in ["CONNTRACK", "CONNTRACK6"] {
        let name = format!("proxy_agent_bpf_map_capacity{{map=\"{map}\"}}");
        assert_eq!(metric(&text, &name), Some(f64::from(capacity)), "{map}: {text}");
    }

    let client = lab.pod(1, 1).ns.clone();
    let session = TcpSession::open(&client, SocketAddrV4::new(vip, 80), TIMEOUT).unwrap();
    let before = session.ask().unwrap();
    let target = SocketAddrV4::new(vip, 53);
    for chunk in 0..30u16 {
        let ports: Vec<u16> = (0..100).map(|i| 40_000 + chunk * 100 + i).collect();
        let answered = udp_ask_from_ports(&client, target, ports);
        assert!(answered.iter().all(Result::is_ok), "flood chunk {chunk}: {answered:?}");
        let during = session.ask().unwrap_or_else(|e| panic!("the busy connection failed after chunk {chunk}: {e:#}"));
        assert_eq!(during.backend, before.backend);
    }
    // The sweep's pass sees the full table; the warning is logged once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let warning = "over 90% full";
    while lab.agent(1).count_in_log(warning) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(lab.agent(1).count_in_log(warning), 1, "{}", lab.agent(1).log());
    let text = metrics(&lab);
    let entries = metric(&text, "proxy_agent_bpf_map_entries{map=\"CONNTRACK\"}").unwrap();
    assert!((1800.0..=f64::from(capacity)).contains(&entries), "entries {entries}\n{text}");
    let evictions = metric(&text, "proxy_agent_conntrack_evictions_total").unwrap();
    assert!(evictions >= 500.0, "3000 flows through a 1024-flow table: {evictions} evictions\n{text}");

    // The IPv6 table the same way, with its own busy connection, and its own warning naming it.
    let session = TcpSession::open6(&client, SocketAddrV6::new(vip6, 80, 0, 0), TIMEOUT).unwrap();
    let before = session.ask().unwrap();
    let target = SocketAddrV6::new(vip6, 53, 0, 0);
    for chunk in 0..30u16 {
        let ports: Vec<u16> = (0..100).map(|i| 40_000 + chunk * 100 + i).collect();
        let answered = udp_ask_from_ports(&client, target, ports);
        assert!(answered.iter().all(Result::is_ok), "IPv6 flood chunk {chunk}: {answered:?}");
        let during =
            session.ask().unwrap_or_else(|e| panic!("the busy IPv6 connection failed after chunk {chunk}: {e:#}"));
        assert_eq!(during.backend, before.backend);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.agent(1).count_in_log(warning) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = lab.agent(1).log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(warning)).collect();
    assert_eq!(warnings.len(), 2, "one warning per table: {warnings:?}");
    assert!(warnings[1].contains("CONNTRACK6"), "the second names the IPv6 table: {}", warnings[1]);
    // A pass that overlapped the flood is an estimate; one whole pass after it (a tick every half second,
    // one tick each for tables this size) counts what stayed.
    std::thread::sleep(Duration::from_millis(1500));
    let text = metrics(&lab);
    let entries6 = metric(&text, "proxy_agent_bpf_map_entries{map=\"CONNTRACK6\"}").unwrap();
    assert!((1800.0..=f64::from(capacity)).contains(&entries6), "IPv6 entries {entries6}\n{text}");
    let evictions6 = metric(&text, "proxy_agent_conntrack_evictions_total").unwrap() - evictions;
    assert!(evictions6 >= 500.0, "3000 IPv6 flows through a 1024-flow table: {evictions6} more evictions\n{text}");
}

/// The table holds what it is sized for: 65536 flows through `tc_pod_ingress` (`BPF_PROG_TEST_RUN`) into a
/// table of 131072 entries, then each flow's next segment finds its own entry and its backend (the full
/// measurement, to 1M flows, is `cargo run -p proxy-lab --bin bench -- --flows 1000000`).
#[test]
fn the_connection_table_holds_the_flows_it_is_sized_for() {
    let m = proxy_lab::flow_capacity::measure(65_536).unwrap();
    eprintln!("{m:?}");
    assert_eq!(m.entries, 131_072, "the situation: every flow has both entries");
    assert_eq!(m.capacity, proxy_common::capacity::lru_entries(65_536, 2, cpus()));
    assert_eq!((m.lost, m.moved), (0, 0), "flows lost their entry or their backend: {m:?}");
}
