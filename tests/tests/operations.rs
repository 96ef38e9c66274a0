//! What an operator watches: `/healthz` and `/livez` with kube-proxy's semantics, and Prometheus metrics
//! under kube-proxy's names.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Proto, http_get_path, request},
    lab::{node_ip, node_name},
    manifests::{Endpoint, Port, Svc},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn healthz_livez_and_metrics_report_what_kube_proxy_reports() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let pod = lab.pod(2, 2).clone();
    lab.serve(&pod, &[8080], &[]).unwrap();
    let http = vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }];
    let svc = Svc::new("web", Ipv4Addr::new(10, 32, 0, 96), http.clone());
    lab.write_manifest("web.yaml", &svc.with_endpoints(&[Endpoint::ready(pod.ip, node_name(2))])).unwrap();
    // One object the dataplane cannot honour: counted, not programmed.
    let bad = Svc::new("bad", Ipv4Addr::new(10, 32, 0, 97), http).yaml().replace("port: 80", "port: 0");
    lab.write_manifest("bad.yaml", &bad).unwrap();
    lab.start_agents().unwrap();
    assert_eq!(
        request(&lab.pod(1, 1).ns.clone(), Proto::Tcp, SocketAddrV4::new(Ipv4Addr::new(10, 32, 0, 96), 80), TIMEOUT)
            .unwrap()
            .backend,
        "pod-2-2"
    );

    for path in ["/healthz", "/livez"] {
        let (status, body) =
            http_get_path(&lab.external_ns(), SocketAddrV4::new(node_ip(1), 10256), path, TIMEOUT).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(json["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')), "{path}: {body}");
        assert!(json["currentTime"].as_str().is_some(), "{path}: {body}");
        assert_eq!(json.get("nodeEligible").is_some(), path == "/healthz", "{path}: {body}");
    }

    // Metrics listen on the node's loopback only, as kube-proxy's do.
    let (status, text) =
        http_get_path(&lab.node_ns(1), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249), "/metrics", TIMEOUT).unwrap();
    assert_eq!(status, 200);
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0) >= 1.0, "{text}");
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap_or(0.0) > 1.7e9, "{text}");
    assert!(metric(&text, "kubeproxy_network_programming_duration_seconds_count").unwrap_or(0.0) >= 1.0, "{text}");
    assert_eq!(metric(&text, "proxy_agent_rejected_objects{kind=\"Service\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "proxy_agent_frontends"), Some(1.0), "{text}");
    let entries = |map: &str| metric(&text, &format!("proxy_agent_map_entries{{map=\"{map}\"}}"));
    match proxy_lab::lab::mode().as_str() {
        // kube-proxy's fixed rules plus one Service port's: its KUBE-SERVICES jump, KUBE-SVC- and KUBE-SEP-.
        "iptables" => assert!(entries("iptables-nat-rules").unwrap_or(0.0) >= 8.0, "{text}"),
        // One ClusterIP: its verdict-map element, and its address in `cluster-ips`.
        "nftables" => assert_eq!(entries("nftables-map-elements"), Some(2.0), "{text}"),
        // One ClusterIP with one endpoint: slot 0 and slot 1, one backend, one reverse-NAT entry.
        _ => {
            assert_eq!(entries("SERVICES"), Some(2.0), "{text}");
            assert_eq!(entries("BACKENDS"), Some(1.0), "{text}");
        }
    }
}

/// An invalid value in the config file stops start-up with a message naming the field and the value.
#[test]
fn an_invalid_config_file_stops_start_up_naming_field_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kube-proxy.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  syncPeriod: often\n",
    )
    .unwrap();
    let out = std::process::Command::new(proxy_lab::agent::binary().unwrap())
        .arg("--config")
        .arg(&config)
        .args(["--hostname-override", "n1", "--manifests", "/nonexistent"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must not start: {stderr}");
    assert!(stderr.contains("iptables.syncPeriod") && stderr.contains("often"), "{stderr}");
}

/// Real installers' kube-proxy settings (`tests/fixtures/kube-proxy/`, each with where it came from) start
/// the agent unchanged and it serves a ClusterIP: the `KubeProxyConfiguration`s of kubeadm (printed
/// defaults: nulls, "" and 0s everywhere), kind and the EKS add-on, and the command lines of k3s
/// (`--proxy-mode=iptables`, a port-less `--healthz-bind-address`, `0s` conntrack timeouts; here with a
/// dual-stack `--cluster-cidr` and a DaemonSet's `--v=2`), kops, GCE and AKS (an empty
/// `--pod-interface-name-prefix=`).
#[test]
fn real_installer_configurations_start_the_agent_and_serve_a_cluster_ip() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube-proxy");
    let config = |file: &str| vec!["--config".to_owned(), fixtures.join(file).display().to_string()];
    let args = |file: &str| -> Vec<String> {
        std::fs::read_to_string(fixtures.join(file))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            // The lab names each node itself.
            .filter(|l| !l.starts_with("--hostname-override"))
            .map(|l| l.replace("--cluster-cidr=10.42.0.0/16", "--cluster-cidr=10.200.0.0/16,fd00:200::/56"))
            .collect()
    };
    let installers = [
        ("kubeadm", config("kubeadm-init-defaults.yaml")),
        ("kind", config("kind.yaml")),
        ("EKS", config("eks-config.yaml")),
        ("k3s", [args("k3s-args.txt"), vec!["--v=2".to_owned()]].concat()),
        ("kops", args("kops-args.txt")),
        ("GCE", args("gce-args.txt")),
        ("AKS", args("aks-args.txt")),
    ];
    for (installer, args) in installers {
        let spec = LabSpec {
            agent_args: [vec!["--mode".into(), proxy_lab::lab::mode()], args].concat(),
            ..LabSpec::default()
        };
        let mut lab = Lab::start(spec).expect("lab");
        let pod = lab.pod(2, 2).clone();
        lab.serve(&pod, &[8080], &[]).unwrap();
        let vip = Ipv4Addr::new(10, 32, 0, 98);
        let http = vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }];
        let endpoints = [Endpoint::ready(pod.ip, "node2".into())];
        lab.write_manifest("svc.yaml", &Svc::new("installer", vip, http).with_endpoints(&endpoints)).unwrap();
        lab.start_agents().unwrap_or_else(|e| panic!("{installer}: the agent did not start: {e:#}"));
        let r = request(&lab.pod(1, 1).ns.clone(), Proto::Tcp, SocketAddrV4::new(vip, 80), TIMEOUT)
            .unwrap_or_else(|e| panic!("{installer}: {e:#}"));
        assert_eq!(r.backend, "pod-2-2", "{installer}");
    }
}

/// Switching modes: the chosen mode is logged and exported; starting in one mode removes what the others
/// left (kube-proxy's KUBE- chains and nftables table, the eBPF programs), and traffic flows in each.
#[test]
fn each_mode_removes_the_others_leftovers_and_reports_itself() {
    let spec = LabSpec { agent_args: vec!["--mode".into(), "iptables".into()], ..LabSpec::default() };
    let mut lab = Lab::start(spec).expect("lab");
    let pod = lab.pod(2, 2).clone();
    lab.serve(&pod, &[8080], &[]).unwrap();
    let vip = Ipv4Addr::new(10, 32, 0, 99);
    let http = vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }];
    lab.write_manifest(
        "web.yaml",
        &Svc::new("web", vip, http).with_endpoints(&[Endpoint::ready(pod.ip, node_name(2))]),
    )
    .unwrap();
    let node1 = lab.node_ns(1);
    let sh = |args: &[&str]| proxy_lab::cmd::run("ip", &[&["netns", "exec", node1.as_str()], args].concat()).unwrap();
    // What kube-proxy's nftables mode would have left on the node.
    sh(&["nft", "add table ip kube-proxy; add chain ip kube-proxy services"]);
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let works = || request(&client, Proto::Tcp, SocketAddrV4::new(vip, 80), TIMEOUT).map(|r| r.backend).unwrap();
    let mode_metric =
        || http_get_path(&node1, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249), "/metrics", TIMEOUT).unwrap().1;
    let iptables_rules = || sh(&["iptables-save"]);
    let nft_tables = || sh(&["nft", "list", "tables"]);
    let xdp_attached = || sh(&["ip", "link", "show", "eth0"]).contains("xdp");

    assert_eq!(works(), "pod-2-2");
    assert!(iptables_rules().contains("KUBE-SVC-"));
    assert!(!nft_tables().contains("kube-proxy"), "kube-proxy's nftables table must go: {}", nft_tables());
    assert!(
        mode_metric().contains("proxy_agent_dataplane_mode{mode=\"iptables\",reason=\"requested\"} 1"),
        "{}",
        mode_metric()
    );

    lab.restart_agent_with(1, &["--mode", "nftables"]).unwrap();
    assert!(!iptables_rules().contains("KUBE-"), "iptables leftovers must go: {}", iptables_rules());
    assert!(nft_tables().contains("table ip proxy-agent"), "{}", nft_tables());
    assert_eq!(works(), "pod-2-2");
    assert!(mode_metric().contains("mode=\"nftables\""));

    // eBPF takes over from the nftables mode's table (see tests/tests/migration.rs), removes it, and keeps
    // conntrack on with a table of its own while flows the table translated may be alive.
    lab.restart_agent_with(1, &["--mode", "ebpf"]).unwrap();
    let tables = nft_tables();
    assert!(!tables.lines().any(|l| l == "table ip proxy-agent"), "nftables leftovers must go: {tables}");
    assert!(tables.lines().any(|l| l == "table ip proxy-agent-conntrack"), "conntrack is kept on: {tables}");
    assert!(xdp_attached(), "the eBPF dataplane is attached");
    assert_eq!(works(), "pod-2-2");
    assert!(mode_metric().contains("mode=\"ebpf\""));

    // The nftables mode drains the eBPF dataplane; with no flow of its left, it goes at once.
    lab.restart_agent_with(1, &["--mode", "nftables"]).unwrap();
    lab.agent(1).wait_for_log("eBPF dataplane drained and removed", 0, Duration::from_secs(10)).unwrap();
    assert!(!xdp_attached(), "eBPF leftovers must go");
    assert!(
        !nft_tables().contains("proxy-agent-conntrack"),
        "the keeper goes with it: {}\n{}",
        nft_tables(),
        lab.agent(1).log()
    );
    assert_eq!(works(), "pod-2-2");

    lab.restart_agent_with(1, &["--mode", "iptables"]).unwrap();
    assert!(!nft_tables().contains("proxy-agent"), "nftables leftovers must go: {}", nft_tables());
    assert!(iptables_rules().contains("KUBE-SVC-"));
    assert_eq!(works(), "pod-2-2");
}

/// The capabilities `deploy/base/daemonset.yaml` gives the agent's container, read from the manifest.
fn daemonset_capabilities() -> Vec<String> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/daemonset.yaml");
    let ds: DaemonSet = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let container = ds.spec.unwrap().template.spec.unwrap().containers.into_iter().find(|c| c.name == "proxy-agent");
    let caps =
        container.and_then(|c| c.security_context?.capabilities?.add).expect("the agent container adds capabilities");
    caps.iter().map(|c| c.to_lowercase()).collect()
}

/// A capability's bit in `/proc/PID/status` (linux/capability.h), for the ones a DaemonSet might list.
fn capability_bit(name: &str) -> u32 {
    match name {
        "net_bind_service" => 10,
        "net_admin" => 12,
        "net_raw" => 13,
        "ipc_lock" => 14,
        "sys_module" => 16,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("capability {other} is not in this test's table"),
    }
}

/// The DaemonSet runs the agent without `privileged`, with a short capability list: the agent must work
/// with exactly that list (read from the manifest), in the lab's mode. Pod, external and node traffic.
#[test]
fn the_agent_works_with_only_the_daemonsets_capabilities() {
    let caps = daemonset_capabilities();
    assert!(!caps.iter().any(|c| c == "sys_admin"), "the point is to need less than CAP_SYS_ADMIN: {caps:?}");
    let spec = LabSpec { agent_capabilities: Some(caps.clone()), ..LabSpec::default() };
    let mut lab = Lab::start(spec).expect("lab");
    let pod = lab.pod(2, 2).clone();
    lab.serve(&pod, &[8080], &[]).unwrap();
    let vip = Ipv4Addr::new(10, 32, 0, 94);
    let mut svc = Svc::new("capped", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30106];
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&[Endpoint::ready(pod.ip, node_name(2))])).unwrap();
    lab.start_agents().unwrap();
    let pid = lab.agent(1).pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let effective = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let bits = u64::from_str_radix(effective.trim_start_matches("CapEff:").trim(), 16).unwrap();
    eprintln!("agent with {caps:?}: {effective}");
    let wanted = caps.iter().fold(0u64, |mask, cap| mask | 1 << capability_bit(cap));
    assert_eq!(bits, wanted, "the agent must hold the manifest's capabilities and nothing else: {effective}");

    let from_pod = request(&lab.pod(1, 1).ns.clone(), Proto::Tcp, SocketAddrV4::new(vip, 80), TIMEOUT).unwrap();
    assert_eq!(from_pod.backend, "pod-2-2");
    let from_outside = request(&lab.external_ns(), Proto::Tcp, SocketAddrV4::new(node_ip(1), 30106), TIMEOUT).unwrap();
    assert_eq!(from_outside.backend, "pod-2-2");
    let client = std::path::Path::new(env!("CARGO_BIN_EXE_lab-client"));
    let from_node = lab.request_from_node(1, client, Proto::Tcp, SocketAddrV4::new(vip, 80)).unwrap();
    assert!(matches!(from_node, proxy_lab::echo::Outcome::Answered(ref r) if r.backend == "pod-2-2"), "{from_node:?}");
}

/// The eBPF data path names every drop: a client refused by a Service without endpoints shows up as
/// `proxy_agent_packet_drops_total{reason="rejected"}`, over IPv4 and again over IPv6 (the Service is
/// dual-stack), and every reason is exported, zero or not. The netfilter modes have no such counters (the
/// kernel's own are in `iptables -L -v` / `nft list`).
#[test]
fn drops_are_counted_by_reason_and_exported() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let http = vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }];
    let empty = Ipv4Addr::new(10, 32, 0, 98);
    let empty6 = std::net::Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x98);
    let mut svc = Svc::new("empty", empty, http);
    svc.cluster_ip6 = Some(empty6);
    lab.write_manifest("empty.yaml", &svc.with_endpoints_of_both_families(&[], &[])).unwrap();
    lab.start_agents().unwrap();
    let metrics = || {
        let (status, text) =
            http_get_path(&lab.node_ns(1), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249), "/metrics", TIMEOUT).unwrap();
        assert_eq!(status, 200);
        text
    };
    let drops =
        |text: &str, reason: &str| metric(text, &format!("proxy_agent_packet_drops_total{{reason=\"{reason}\"}}"));
    let client = lab.pod(1, 1).ns.clone();
    let outcome = proxy_lab::echo::attempt(&client, Proto::Tcp, SocketAddrV4::new(empty, 80), TIMEOUT).unwrap();
    assert!(matches!(outcome, proxy_lab::echo::Outcome::Refused), "a Service without endpoints refuses: {outcome:?}");
    let text = metrics();
    if proxy_lab::lab::mode() != "ebpf" {
        assert!(!text.contains("proxy_agent_packet_drops_total"), "{text}");
        return;
    }
    let after_ipv4 = drops(&text, "rejected").unwrap_or(0.0);
    assert!(after_ipv4 >= 1.0, "{text}");
    for reason in proxy_common::drop::NAMES {
        assert!(drops(&text, reason).is_some(), "reason {reason} not exported: {text}");
    }
    let target6 = std::net::SocketAddrV6::new(empty6, 80, 0, 0);
    let outcome = proxy_lab::echo6::Outcome6::of(proxy_lab::echo6::tcp(&client, target6, TIMEOUT));
    assert!(matches!(outcome, proxy_lab::echo6::Outcome6::Refused), "the IPv6 half refuses too: {outcome:?}");
    let after_ipv6 = drops(&metrics(), "rejected").unwrap_or(0.0);
    assert!(after_ipv6 > after_ipv4, "the IPv6 refusal counted: {after_ipv4} then {after_ipv6}");
}
