//! The iptables fallback (`--mode iptables`, kube-proxy's own chains) against the same behaviours as the
//! eBPF dataplane, with real traffic: a first set of the parity tests (issue 6 extends it to every test).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Outcome, Proto, attempt, request},
    lab::{EXTERNAL_IP, node_ip, node_name},
    manifests::{Endpoint, Port, Svc},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn iptables_lab(serving: &[(usize, usize)]) -> Lab {
    let spec = LabSpec { agent_args: vec!["--mode".into(), "iptables".into()], ..LabSpec::default() };
    let mut lab = Lab::start(spec).expect("lab");
    for &(n, k) in serving {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[8080]).unwrap();
    }
    lab
}

fn http() -> Vec<Port> {
    vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]
}

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// ClusterIP, same node and other node, TCP and UDP; the backend sees the client pod's address.
#[test]
fn iptables_cluster_ip_reaches_backends_on_both_nodes() {
    let mut lab = iptables_lab(&[(1, 2), (2, 2)]);
    let ports = vec![
        Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
        Port { name: "dns", port: 53, protocol: "UDP", target_port: 8080 },
    ];
    let local = Svc::new("local", Ipv4Addr::new(10, 32, 0, 110), ports.clone());
    let remote = Svc::new("remote", Ipv4Addr::new(10, 32, 0, 111), ports);
    lab.write_manifest("l.yaml", &local.with_endpoints(&[Endpoint::ready(lab.pod(1, 2).ip, node_name(1))])).unwrap();
    lab.write_manifest("r.yaml", &remote.with_endpoints(&[Endpoint::ready(lab.pod(2, 2).ip, node_name(2))])).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).clone();
    for (vip, backend) in [(110, "pod-1-2"), (111, "pod-2-2")] {
        for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
            let r = request(&client.ns, proto, at(Ipv4Addr::new(10, 32, 0, vip), port), TIMEOUT)
                .unwrap_or_else(|e| panic!("{vip} {proto:?}: {e:#}"));
            assert_eq!((r.backend.as_str(), *r.seen_source.ip()), (backend, client.ip));
        }
    }
}

/// NodePort under both external traffic policies, from outside.
#[test]
fn iptables_node_ports_follow_the_external_traffic_policy() {
    let mut lab = iptables_lab(&[(1, 2), (2, 2)]);
    let mut cluster = Svc::new("np-cluster", Ipv4Addr::new(10, 32, 0, 112), http());
    cluster.type_ = "NodePort";
    cluster.node_ports = vec![30110];
    let mut local = Svc::new("np-local", Ipv4Addr::new(10, 32, 0, 113), http());
    local.type_ = "NodePort";
    local.node_ports = vec![30111];
    local.external_policy = "Local";
    lab.write_manifest("c.yaml", &cluster.with_endpoints(&[Endpoint::ready(lab.pod(2, 2).ip, node_name(2))])).unwrap();
    lab.write_manifest("l.yaml", &local.with_endpoints(&[Endpoint::ready(lab.pod(1, 2).ip, node_name(1))])).unwrap();
    lab.start_agents().unwrap();
    let ext = lab.external_ns();
    let r = request(&ext, Proto::Tcp, at(node_ip(1), 30110), TIMEOUT).unwrap();
    assert_eq!((r.backend.as_str(), *r.seen_source.ip()), ("pod-2-2", node_ip(1)), "Cluster: masqueraded");
    let r = request(&ext, Proto::Tcp, at(node_ip(1), 30111), TIMEOUT).unwrap();
    assert_eq!((r.backend.as_str(), *r.seen_source.ip()), ("pod-1-2", EXTERNAL_IP), "Local: source kept");
    let dropped = attempt(&ext, Proto::Tcp, at(node_ip(2), 30111), Duration::from_millis(1500)).unwrap();
    assert!(matches!(dropped, Outcome::TimedOut), "Local without a local endpoint: dropped, got {dropped:?}");
}

/// No endpoints: refused at once; hairpin: answered from the node's address.
#[test]
fn iptables_rejects_without_endpoints_and_masquerades_hairpin() {
    let mut lab = iptables_lab(&[(1, 1)]);
    lab.write_manifest("empty.yaml", &Svc::new("empty", Ipv4Addr::new(10, 32, 0, 114), http()).with_endpoints(&[]))
        .unwrap();
    let own = Svc::new("own", Ipv4Addr::new(10, 32, 0, 115), http());
    lab.write_manifest("own.yaml", &own.with_endpoints(&[Endpoint::ready(lab.pod(1, 1).ip, node_name(1))])).unwrap();
    lab.start_agents().unwrap();
    let pod = lab.pod(1, 1).clone();
    let refused = attempt(&pod.ns, Proto::Tcp, at(Ipv4Addr::new(10, 32, 0, 114), 80), TIMEOUT).unwrap();
    assert!(matches!(refused, Outcome::Refused), "{refused:?}");
    let r = request(&pod.ns, Proto::Tcp, at(Ipv4Addr::new(10, 32, 0, 115), 80), TIMEOUT).unwrap();
    assert_eq!(r.backend, "pod-1-1");
    assert_ne!(*r.seen_source.ip(), pod.ip, "hairpin traffic must be masqueraded");
}
