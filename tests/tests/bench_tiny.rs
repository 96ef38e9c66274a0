//! The benchmark harness at tiny scale, so it never rots: every mode, two scales, NodePort paths, the
//! report and the plots. Figures are not judged here (timing in tests flakes); only that each was measured
//! through a working path and reported.

use proxy_lab::bench::{self, BenchConfig, report};

#[test]
fn the_benchmark_measures_every_mode_and_writes_its_report() {
    let config = BenchConfig::tiny();
    let results = bench::run(&config).expect("benchmark");
    assert!(results.skipped.is_empty(), "{:?}", results.skipped);
    assert_eq!(results.data.len(), config.modes.len() * config.scales.len());
    for row in &results.data {
        let pair = row.connections[0];
        assert!(pair.service > 0.0 && pair.direct > 0.0, "{} at {}: {pair:?}", row.mode, row.services);
        assert!(row.requests[0].service > 0.0, "{} at {}", row.mode, row.services);
    }
    for row in &results.control {
        assert_eq!(row.change_ms.len(), config.endpoint_changes, "{}", row.mode);
        assert!(row.full_sync_ms > 0.0 && row.peak_rss_kib > 0, "{row:?}");
        assert_eq!(row.bpf_map_kib.is_some_and(|k| k > 0), row.mode == "ebpf", "{row:?}");
    }
    let paths: Vec<&str> = results.node_port.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["eBPF, XDP", "eBPF, TC (XDP off)", "nftables", "iptables"]);
    assert!(results.node_port.iter().all(|r| r.connections[0] > 0.0 && r.udp_exchanges[0] > 0.0));

    let dir = tempfile::tempdir().unwrap();
    let text = report::write(dir.path(), &config, &results).unwrap();
    for mode in &config.modes {
        assert!(text.contains(&format!("| {mode} | 20 |")), "{mode} row missing:\n{text}");
    }
    assert!(text.contains("## Against the targets"));
    for plot in ["clusterip-ratio.svg", "full-sync.svg", "nodeport.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text"), "{plot} is not a plot with labels");
    }
}
