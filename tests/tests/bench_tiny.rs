//! The benchmark harness at tiny scale, so it never rots: every mode, two scales, NodePort paths, the
//! report and the plots. Figures are not judged here (timing in tests flakes); only that each was measured
//! through a working path and reported.

use proxy_lab::bench::{self, BenchConfig, Family, report};

#[test]
fn the_benchmark_measures_every_mode_and_writes_its_report() {
    let config = BenchConfig::tiny();
    let results = bench::run(&config).expect("benchmark");
    assert!(results.skipped.is_empty(), "{:?}", results.skipped);
    // Both families where the lab is dual-stack (every topology but VXLAN).
    let dual_stack = proxy_lab::LabSpec::default().pod_network != proxy_lab::lab::PodNetwork::Vxlan;
    let families: &[Family] = if dual_stack { &[Family::V4, Family::V6] } else { &[Family::V4] };
    assert_eq!(results.data.len(), config.modes.len() * config.scales.len() * families.len());
    for &family in families {
        assert_eq!(
            results.data.iter().filter(|r| r.family == family).count(),
            config.modes.len() * config.scales.len()
        );
    }
    for row in &results.data {
        let pair = row.connections[0];
        let what = format!("{} at {} over {}", row.mode, row.services, row.family.name());
        assert!(pair.service > 0.0 && pair.direct > 0.0, "{what}: {pair:?}");
        assert!(row.requests[0].service > 0.0, "{what}");
    }
    for row in &results.control {
        assert_eq!(row.change_ms.len(), config.endpoint_changes, "{}", row.mode);
        assert!(row.full_sync_ms > 0.0 && row.peak_rss_kib > 0, "{row:?}");
        assert_eq!(row.bpf_map_kib.is_some_and(|k| k > 0), row.mode == "ebpf", "{row:?}");
    }
    for &family in families {
        let paths: Vec<&str> =
            results.node_port.iter().filter(|r| r.family == family).map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["eBPF, XDP", "eBPF, TC (XDP off)", "nftables", "iptables"], "{}", family.name());
    }
    assert!(
        results
            .node_port
            .iter()
            .all(|r| r.connections[0] > 0.0 && r.udp_exchanges[0] > 0.0 && r.udp_delivered[0] > 0.0)
    );

    let dir = tempfile::tempdir().unwrap();
    let text = report::write(dir.path(), &config, &results).unwrap();
    for mode in &config.modes {
        assert!(text.contains(&format!("| {mode} | 20 |")), "{mode} row missing:\n{text}");
    }
    assert!(text.contains("## Against the targets"));
    if dual_stack {
        let has_ipv6 = text.contains("### IPv6 beside IPv4") && text.contains("| eBPF, XDP, IPv6 |");
        assert!(has_ipv6, "IPv6 figures missing:\n{text}");
    }
    for plot in ["clusterip-ratio.svg", "full-sync.svg", "nodeport.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text"), "{plot} is not a plot with labels");
    }
}

/// Not a test: where the connection rate goes. `PROXY_LAB_MODE=… cargo test --release -p proxy-lab --test
/// bench_tiny connection_latency -- --ignored --nocapture` prints the latency spread of back-to-back
/// connections, direct to a pod and through a ClusterIP; a few slow ones (a lost SYN costs a 1 s
/// retransmission) dominate a connections-per-second figure.
#[test]
#[ignore = "a measurement, run by hand"]
fn connection_latency() {
    use std::{net::SocketAddrV4, time::Instant};

    use proxy_lab::{
        Lab, LabSpec,
        lab::node_name,
        manifests::{Endpoint, Port, Svc},
    };
    let mut lab = Lab::start(LabSpec::default()).unwrap();
    let pod = lab.pod(2, 2).clone();
    lab.serve(&pod, &[8080], &[]).unwrap();
    let vip = std::net::Ipv4Addr::new(10, 32, 0, 90);
    let mut svc = Svc::new("lat", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30090];
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&[Endpoint::ready(pod.ip, node_name(2))])).unwrap();
    lab.start_agents().unwrap();
    let count: usize = std::env::var("PROXY_CONNECTIONS").ok().and_then(|c| c.parse().ok()).unwrap_or(2000);
    let pod_client = lab.pod(1, 1).ns.clone();
    let node_port = SocketAddrV4::new(proxy_lab::lab::node_ip(1), 30090);
    for (client, target) in [
        (pod_client.clone(), SocketAddrV4::new(pod.ip, 8080)),
        (pod_client, SocketAddrV4::new(vip, 80)),
        (lab.external_ns(), node_port),
    ] {
        let mut ms: Vec<f64> = proxy_lab::netns::in_netns(&client, move || {
            (0..count)
                .map(|_| {
                    let t = Instant::now();
                    proxy_lab::echo::tcp_request_here(target, std::time::Duration::from_secs(3)).unwrap();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect()
        })
        .unwrap();
        ms.sort_by(f64::total_cmp);
        let slow = ms.iter().filter(|m| **m > 200.0).count();
        eprintln!(
            "{target}: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {slow} of {} over 200 ms, total {:.1} s",
            ms[ms.len() / 2],
            ms[ms.len() * 99 / 100],
            ms[ms.len() - 1],
            ms.len(),
            ms.iter().sum::<f64>() / 1e3
        );
    }
}

/// Not a test: what the periodic full resync (every `--full-resync-period`: re-read what the kernel holds,
/// repair drift) costs an idle agent. `PROXY_LAB_MODE=… PROXY_SERVICES=10000 cargo test --release -p proxy-lab
/// --test bench_tiny resync_cost -- --ignored --nocapture` prints the first sync and two resyncs 20 s apart
/// with their writes and elapsed time. The benchmark itself runs agents with a 10-minute sync period.
#[test]
#[ignore = "a measurement, run by hand"]
fn resync_cost() {
    use std::time::Duration;

    use proxy_lab::{Lab, LabSpec, lab::mode};
    let count: usize = std::env::var("PROXY_SERVICES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000);
    // `PROXY_FULL_RESYNC=1h` shows what the periodic syncs in between cost instead.
    let full = std::env::var("PROXY_FULL_RESYNC").unwrap_or_else(|_| "20s".to_owned());
    let args = ["--mode", &mode(), "--sync-period", "20s", "--full-resync-period", &full].map(str::to_owned).to_vec();
    let mut lab = Lab::start(LabSpec { agent_args: args, ..LabSpec::default() }).unwrap();
    lab.write_manifest("filler.yaml", &bench::filler_manifest(count, 10)).unwrap();
    lab.start_agents_within(Duration::from_secs(600)).unwrap();
    // The first sync is itself a re-read (nothing applied yet); two periodic ones follow.
    lab.agent(1).wait_for_log("service table applied", 2, Duration::from_secs(600)).unwrap();
    for line in lab.agent(1).log().lines().filter(|l| l.contains("service table applied")) {
        let fields: Vec<&str> = line
            .split_whitespace()
            .filter(|w| ["scope=", "writes=", "deletes=", "elapsed_ms="].iter().any(|k| w.starts_with(k)))
            .collect();
        eprintln!("{} × 10, {}: {}", count, mode(), fields.join(" "));
    }
}
