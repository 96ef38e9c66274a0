use super::*;

const KUBE_PROXY_STYLE: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ""
clusterCIDR: 10.200.0.0/16,fd00::/48
nodePortAddresses: [10.240.0.0/24]
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: " Node7 "
iptables:
  masqueradeAll: true
  masqueradeBit: 14
  syncPeriod: 30s
  minSyncPeriod: 10s
conntrack:
  maxPerCore: 32768
  tcpEstablishedTimeout: 24h0m0s
  tcpBeLiberal: true
featureGates: {}
someFutureField: 1
"#;

#[test]
fn a_kube_proxy_configuration_loads_and_unknown_fields_are_listed() {
    let c = parse(KUBE_PROXY_STYLE).unwrap();
    assert_eq!(c.mode, None, "\"\" is this agent's default");
    let pair = [("10.200.0.0".parse().unwrap(), 16), ("fd00::".parse().unwrap(), 48)];
    assert_eq!(c.cluster_cidr, Some(crate::model::ClusterCidrs::new(&pair).unwrap()), "one per family");
    assert_eq!(c.node_port_addresses, Some(NodePortAddresses::Cidrs(vec![("10.240.0.0".parse().unwrap(), 24)])));
    assert_eq!(c.masquerade_all, Some(true));
    assert_eq!(c.hostname_override.as_deref(), Some("node7"), "trimmed and lower-cased, as kube-proxy");
    assert_eq!(c.sync_period, Some(Duration::from_secs(30)));
    assert_eq!(c.min_sync_period, Some(Duration::from_secs(10)));
    assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(c.tcp_be_liberal, Some(true));
    assert_eq!(c.unknown, vec!["someFutureField".to_owned()]);
    assert!(c.ignored.is_empty(), "{:?}", c.ignored);
    assert_eq!(c.conntrack_max_per_core, Some(32_768));
    assert_eq!(c.tcp_established_timeout, Some(Duration::from_hours(24)));
    assert_eq!(c.udp_timeout, Some(Duration::ZERO));
}

/// What `kubeadm config print init-defaults --component-configs KubeProxyConfiguration` prints: every
/// field written out, unset ones as null, "" or 0s. It used to stop start-up (`healthzBindAddress: ""`).
const KUBEADM_DEFAULTS: &str = include_str!("../../../tests/fixtures/kube-proxy/kubeadm-init-defaults.yaml");

#[test]
fn kubeadms_printed_defaults_load_with_kube_proxys_defaults() {
    let c = parse(KUBEADM_DEFAULTS).unwrap();
    assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(c.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
    assert_eq!((c.sync_period, c.min_sync_period), (Some(Duration::from_secs(30)), Some(Duration::from_secs(1))));
    assert_eq!((c.conntrack_max_per_core, c.conntrack_min), (Some(32_768), Some(131_072)));
    assert_eq!(c.tcp_established_timeout, Some(Duration::from_hours(24)));
    assert_eq!(c.tcp_close_wait_timeout, Some(Duration::from_hours(1)));
    assert_eq!(c.oom_score_adj, Some(-999));
    assert_eq!(c.masquerade_bit, Some(14));
    assert_eq!(c.node_port_addresses, Some(NodePortAddresses::All));
    assert_eq!(c.node_ip, None, "0.0.0.0: the Node's own address");
    assert_eq!(c.kubeconfig, Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")));
    assert_eq!(c.mode, None);
    assert!(c.unknown.is_empty(), "{:?}", c.unknown);
    assert!(c.ignored.is_empty(), "defaults warn about nothing: {:?}", c.ignored);
}

#[test]
fn explicit_zeros_are_kept_where_kube_proxy_keeps_them() {
    let c = parse("conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}\noomScoreAdj: 0")
        .unwrap();
    assert_eq!(c.conntrack_max_per_core, Some(0));
    assert_eq!(c.tcp_established_timeout, Some(Duration::ZERO), "0s: leave the kernel's");
    assert_eq!(c.tcp_close_wait_timeout, Some(Duration::ZERO));
    assert_eq!(c.oom_score_adj, Some(0));
}

#[test]
fn the_modes_section_supplies_sync_periods_and_ipvs_becomes_ebpf() {
    let nft = parse("mode: nftables\nnftables: {syncPeriod: 1m, minSyncPeriod: 2s, masqueradeAll: true}\niptables: {syncPeriod: 5m}").unwrap();
    assert_eq!((nft.sync_period, nft.min_sync_period), (Some(Duration::from_secs(60)), Some(Duration::from_secs(2))));
    assert_eq!(nft.masquerade_all, Some(true));
    assert_eq!(nft.node_port_addresses, Some(NodePortAddresses::Primary), "nftables: primary unless told");
    let ipvs = parse("mode: ipvs\nipvs: {scheduler: rr, syncPeriod: 10s}").unwrap();
    assert_eq!(ipvs.mode.as_deref(), Some("ipvs"), "served by the eBPF dataplane (mode::choose)");
    assert_eq!((ipvs.sync_period, ipvs.min_sync_period), (Some(Duration::from_secs(10)), Some(Duration::ZERO)));
    assert_eq!(ipvs.ignored, vec!["ipvs.* (no IPVS here)".to_owned()]);
}

#[test]
fn addresses_follow_kube_proxys_defaulting() {
    let c = parse("healthzBindAddress: 127.0.0.1\nmetricsBindAddress: 0.0.0.0:9100\nbindAddress: 10.240.0.11").unwrap();
    assert_eq!(c.healthz_bind_address, Some("127.0.0.1:10256".parse().unwrap()), "a bare IP gets the port");
    assert_eq!(c.metrics_bind_address, Some("0.0.0.0:9100".parse().unwrap()));
    assert_eq!(c.node_ip, Some(std::net::Ipv4Addr::new(10, 240, 0, 11).into()), "bindAddress overrides the node IP");
    let node6 = parse("bindAddress: fd00:240::11").unwrap();
    assert_eq!(node6.node_ip, Some("fd00:240::11".parse().unwrap()), "an IPv6 bindAddress overrides IPv6's node IP");
    let v6 = parse("bindAddress: \"::\"").unwrap();
    assert_eq!(v6.node_ip, None, "::: the Node's own address");
    assert_eq!(v6.healthz_bind_address, Some("[::]:10256".parse().unwrap()));
    assert_eq!(v6.metrics_bind_address, Some("[::1]:10249".parse().unwrap()));
}

#[test]
fn detect_local_modes_add_pod_interfaces() {
    let prefix = parse("detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: veth}").unwrap();
    assert_eq!(prefix.pod_interfaces, vec!["veth*".to_owned()]);
    let bridge = parse("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: cni0}").unwrap();
    assert_eq!(bridge.pod_interfaces, vec!["cni0".to_owned()]);
}

#[test]
fn an_invalid_value_names_the_field_and_the_value() {
    let cases = [
        ("iptables: {syncPeriod: soon}", "iptables.syncPeriod", "soon"),
        ("clusterCIDR: 10.200.0.0/40", "clusterCIDR[0]", "10.200.0.0/40"),
        ("clusterCIDR: 10.0.0.0/8,10.1.0.0/16", "clusterCIDR", "10.0.0.0/8,10.1.0.0/16"),
        ("metricsBindAddress: nowhere", "metricsBindAddress", "nowhere"),
        ("healthzBindAddress: 0.0.0.0:0", "healthzBindAddress", "0"),
        ("iptables: {masqueradeAll: perhaps}", "iptables.masqueradeAll", "perhaps"),
        ("iptables: {masqueradeBit: 32}", "iptables.masqueradeBit", "32"),
        ("mode: kernelspace", "mode", "kernelspace"),
        ("conntrack: {udpTimeout: forever}", "conntrack.udpTimeout", "forever"),
        ("conntrack: {tcpBeLiberal: yes please}", "conntrack.tcpBeLiberal", "yes please"),
        ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore", "-1"),
        ("oomScoreAdj: 1001", "oomScoreAdj", "1001"),
        ("nodePortAddresses: [primary, 10.0.0.0/8]", "nodePortAddresses[0]", "primary"),
        ("nodePortAddresses: [10.0.0.1]", "nodePortAddresses[0]", "10.0.0.1"),
        ("detectLocalMode: Psychic", "detectLocalMode", "Psychic"),
        ("detectLocalMode: BridgeInterface", "detectLocal.bridgeInterface", ""),
        ("bindAddress: here", "bindAddress", "here"),
        ("iptables: {syncPeriod: 1s, minSyncPeriod: 2s}", "syncPeriod", "2s"),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha2", "apiVersion", "kubeproxy.config.k8s.io/v1alpha2"),
        ("logging: {format: xml}", "logging.format", "xml"),
    ];
    for (text, field, value) in cases {
        let e = parse(text).unwrap_err();
        assert_eq!(e.field.as_str(), field, "{text}: {e}");
        assert!(e.value.contains(value), "{text}: {e}");
        assert!(e.to_string().starts_with(&format!("config file: {field}: ")), "{e}");
    }
}

/// The configuration the DaemonSet ships (deploy/base/configmap.yaml) loads without unknown fields.
#[test]
fn the_deployed_config_map_loads_cleanly() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/configmap.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let maps: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let map = maps.iter().find(|m| m["metadata"]["name"] == "proxy-agent").expect("the proxy-agent ConfigMap");
    let c = parse(map["data"]["config.conf"].as_str().unwrap()).unwrap();
    assert_eq!(c.mode.as_deref(), Some("ebpf"));
    assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
    assert!(c.unknown.is_empty() && c.ignored.is_empty(), "{:?} {:?}", c.unknown, c.ignored);
}

/// kind's and the EKS add-on's files (`tests/fixtures/kube-proxy/`): kind's stray `metadata` is an unknown
/// field, not an error; EKS's `minSyncPeriod: 0s` is kube-proxy's 1 s.
#[test]
fn kind_and_eks_configurations_load() {
    let kind = parse(include_str!("../../../tests/fixtures/kube-proxy/kind.yaml")).unwrap();
    assert_eq!(kind.mode.as_deref(), Some("iptables"));
    assert_eq!(kind.conntrack_max_per_core, Some(0));
    assert_eq!(kind.unknown, ["metadata"]);
    let eks = parse(include_str!("../../../tests/fixtures/kube-proxy/eks-config.yaml")).unwrap();
    assert_eq!(eks.metrics_bind_address, Some("0.0.0.0:10249".parse().unwrap()));
    assert_eq!((eks.sync_period, eks.min_sync_period), (Some(Duration::from_secs(30)), Some(Duration::from_secs(1))));
    assert_eq!(eks.kubeconfig, Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig")));
    assert!(eks.unknown.is_empty() && eks.ignored.is_empty(), "{:?} {:?}", eks.unknown, eks.ignored);
}
