//! The pod networks people run, with the agent's default interface patterns (no `--pod-interfaces`): routed
//! veths named as Calico (`cali…`), Cilium (`lxc…`), the AWS VPC CNI (`eni…`), Azure CNI (`azv…`), GKE
//! (`gke…`) and the `ptp` plugin / kindnet (`veth…`) name them, all on one node. (The bridge topology —
//! flannel, the `bridge` plugin — runs the behaviour tests with `PROXY_LAB_POD_NETWORK=bridge`.)

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Proto, request},
    lab::{PodNetwork, mode, node_ip, node_name},
    manifests::{Endpoint, Port, Svc},
};

const TIMEOUT: Duration = Duration::from_secs(2);
const NAMES: [&str; 6] = ["cali", "lxc", "eni", "azv", "gke", "veth"];

#[test]
fn every_common_pod_interface_name_is_served_with_the_default_patterns() {
    let spec = LabSpec {
        pods_per_node: NAMES.len(),
        pod_network: PodNetwork::Routed { names: NAMES.to_vec() },
        ..LabSpec::default()
    };
    let mut lab = Lab::start(spec).expect("lab");
    let pods: Vec<_> = lab.pods().to_vec();
    for pod in &pods {
        lab.serve(pod, &[8080], &[]).unwrap();
    }
    let vip = Ipv4Addr::new(10, 32, 0, 130);
    let mut svc = Svc::new("everyone", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30130];
    svc.external_policy = "Local";
    let endpoints: Vec<Endpoint> = pods.iter().map(|p| Endpoint::ready(p.ip, node_name(p.node))).collect();
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&endpoints)).unwrap();
    lab.start_agents().unwrap();

    if mode() == "ebpf" {
        // The situation: each name was matched by a default pattern, and so attached.
        let log = lab.agent(1).log();
        for name in NAMES {
            assert!(log.contains(&format!("\"{name}")), "{name}* was not attached by default:\n{log}");
        }
    }
    // Every pod reaches the ClusterIP, and is reached through it (ten connections per endpoint) ...
    let all: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
    for client in &pods {
        let seen: BTreeSet<String> = (0..10 * pods.len())
            .map(|_| {
                request(&client.ns, Proto::Tcp, SocketAddrV4::new(vip, 80), TIMEOUT)
                    .unwrap_or_else(|e| panic!("{} → {vip}: {e:#}", client.host_end))
                    .backend
            })
            .collect();
        assert_eq!(seen, all, "from {} ({})", client.name, client.host_end);
    }
    // ... and from outside, each node's NodePort reaches its own pods (externalTrafficPolicy Local), with
    // the client's address kept: the node's uplink and pod interfaces are told apart by name alone.
    for node in 1..=2 {
        let local: BTreeSet<String> = pods.iter().filter(|p| p.node == node).map(|p| p.name.clone()).collect();
        let mut seen = BTreeSet::new();
        for _ in 0..10 * local.len() {
            let r = request(&lab.external_ns(), Proto::Tcp, SocketAddrV4::new(node_ip(node), 30130), TIMEOUT).unwrap();
            assert_eq!(*r.seen_source.ip(), proxy_lab::lab::EXTERNAL_IP, "the client's address is kept");
            seen.insert(r.backend);
        }
        assert_eq!(seen, local, "node{node}'s NodePort");
    }
    lab.assert_no_leaks();
}
