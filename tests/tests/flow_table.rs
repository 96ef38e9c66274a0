//! The eBPF dataplane's connection table, with real traffic: its sweep, its capacity and its metrics.
//! (Lifetimes in every mode: `flow_lifetimes.rs`.)

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use proxy_common::conntrack::{CtKey, CtValue, SnatValue};
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
    let ports = vec![
        Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
        Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
    ];
    let vip = Ipv4Addr::new(10, 32, 0, 61);
    let mut svc = Svc::new("mixed", vip, ports);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30161, 30162];
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&[Endpoint::ready(backend.ip, node_name(2))])).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let replies = proxy_lab::echo::requests(&client, Proto::Tcp, SocketAddrV4::new(vip, 80), 20, TIMEOUT).unwrap();
    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    let udp = udp_ask_from_ports(&client, SocketAddrV4::new(vip, 53), (48_100..48_120).collect());
    assert!(udp.iter().all(Result::is_ok), "{udp:?}");
    let node_port = SocketAddrV4::new(proxy_lab::lab::node_ip(1), 30161);
    let external = proxy_lab::echo::requests(&lab.external_ns(), Proto::Tcp, node_port, 10, TIMEOUT).unwrap();
    assert!(external.iter().all(Result::is_ok), "{external:?}");
    let conntrack = || -> usize {
        let map = lab.pinned_map(1, proxy_common::maps::CONNTRACK).unwrap();
        aya::maps::HashMap::<_, CtKey, CtValue>::try_from(map).unwrap().keys().count()
    };
    let snat = || -> usize {
        let map = lab.pinned_map(1, proxy_common::maps::SNAT).unwrap();
        aya::maps::HashMap::<_, CtKey, SnatValue>::try_from(map).unwrap().keys().count()
    };
    // The situation: 50 flows with two entries each, and 10 SNATed flows with two SNAT entries each.
    assert!(conntrack() >= 100, "expected the flows' entries in the table, found {}", conntrack());
    assert!(snat() >= 20, "expected the SNATed flows' entries, found {}", snat());

    // Lifetimes of 1 s, a sweep pass every half second: gone well within 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (conntrack() > 0 || snat() > 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!((conntrack(), snat()), (0, 0), "ended flows left in the tables");
    let text = metrics(&lab);
    let expired = metric(&text, "proxy_agent_conntrack_expired_total").unwrap_or(0.0);
    assert!(expired >= 50.0, "expired flows counted: {expired}\n{text}");
    assert_eq!(metric(&text, "proxy_agent_bpf_map_entries{map=\"CONNTRACK\"}"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "proxy_agent_bpf_map_entries{map=\"SNAT\"}"), Some(0.0), "{text}");
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
    let vip = Ipv4Addr::new(10, 32, 0, 62);
    lab.write_manifest(
        "svc.yaml",
        &Svc::new("busy", vip, ports).with_endpoints(&[Endpoint::ready(backend.ip, node_name(2))]),
    )
    .unwrap();
    lab.start_agents().unwrap();
    let text = metrics(&lab);
    let capacity = proxy_common::capacity::lru_entries(1024, 2, cpus());
    assert_eq!(metric(&text, "proxy_agent_bpf_map_capacity{map=\"CONNTRACK\"}"), Some(f64::from(capacity)), "{text}");

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
