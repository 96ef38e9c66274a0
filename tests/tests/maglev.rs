//! Maglev consistent hashing and backends picked by the 5-tuple's hash, against the kernel programs with
//! real traffic (eBPF mode).
//!
//! An external load balancer may send the packets of one flow to any node. With `--lb-algorithm maglev`
//! every node builds the same table from the same backends, so the flow meets the same backend wherever
//! it lands; when a backend goes, only its flows (and few others) move.

use std::{collections::BTreeMap, net::Ipv4Addr, net::SocketAddrV4, time::Duration};

use proxy_lab::{
    Lab, LabSpec, PodRef,
    echo::{TcpSession, udp_ask_from_ports},
    lab::node_name,
    manifests::{Endpoint, Port, Svc},
};

const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 40);

fn dns_lb(backends: &[PodRef]) -> String {
    let mut svc = Svc::new(
        "dns-lb",
        Ipv4Addr::new(10, 32, 0, 70),
        vec![Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 }],
    );
    svc.type_ = "LoadBalancer";
    svc.node_ports = vec![30053];
    svc.lb_ingress = vec![(LB_IP, "VIP")];
    let eps: Vec<Endpoint> = backends.iter().map(|p| Endpoint::ready(p.ip, node_name(p.node))).collect();
    svc.with_endpoints(&eps)
}

/// The backend each client port reached through node `node`.
fn through(lab: &Lab, node: usize, ports: &[u16]) -> BTreeMap<u16, String> {
    lab.route_external_via(LB_IP, node).unwrap();
    let answers = udp_ask_from_ports(&lab.external_ns(), SocketAddrV4::new(LB_IP, 53), ports.to_vec());
    ports
        .iter()
        .zip(answers)
        .map(|(p, a)| (*p, a.unwrap_or_else(|e| panic!("port {p} via node {node}: {e}"))))
        .collect()
}

fn lab_with_backends() -> (Lab, Vec<PodRef>) {
    let mut spec = LabSpec::default();
    spec.agent_args.extend(["--lb-algorithm".to_owned(), "maglev".to_owned()]);
    let mut lab = Lab::start(spec).expect("lab");
    let backends: Vec<PodRef> = [(1, 2), (1, 3), (2, 1), (2, 2)].iter().map(|&(n, k)| lab.pod(n, k).clone()).collect();
    for b in &backends {
        lab.serve(b, &[8080], &[5353]).unwrap();
    }
    lab.write_manifest("lb.yaml", &dns_lb(&backends)).unwrap();
    lab.start_agents().unwrap();
    (lab, backends)
}

/// The same 48 flows (client ports) sent through node 1, then through node 2, which has never seen them:
/// each meets the same backend both times, and together they use every backend. (The hash over slots that
/// non-Maglev frontends use agrees across nodes too, the slots being in the same order; what only Maglev
/// gives is checked by `removing_one_backend_moves_only_its_flows`, which fails without it: 20 of 51 kept.)
#[test]
fn two_nodes_pick_the_same_backend_for_the_same_flow() {
    let (lab, backends) = lab_with_backends();
    let ports: Vec<u16> = (47_200..47_248).collect();
    let via_1 = through(&lab, 1, &ports);
    let via_2 = through(&lab, 2, &ports);
    assert_eq!(via_1, via_2, "the nodes disagree on some flows");
    for b in &backends {
        assert!(via_1.values().any(|name| *name == b.name), "{} got no flow: {via_1:?}", b.name);
    }
}

/// 64 flows through node 1; one of the four backends leaves the Service; the same flows through node 2
/// (new to it, so decided by its new table): the removed backend's flows all moved, and nearly all the
/// others kept their backend (Maglev moves about 1/N of the table, plus a few percent).
#[test]
fn removing_one_backend_moves_only_its_flows() {
    let (mut lab, backends) = lab_with_backends();
    let ports: Vec<u16> = (47_300..47_364).collect();
    let before = through(&lab, 1, &ports);
    let gone = &backends[3];
    let seen = lab.sync_counts();
    lab.write_manifest("lb.yaml", &dns_lb(&backends[..3])).unwrap();
    lab.wait_for_sync(&seen).unwrap();
    let after = through(&lab, 2, &ports);
    let of_gone: Vec<u16> = before.iter().filter(|(_, b)| **b == gone.name).map(|(p, _)| *p).collect();
    assert!(!of_gone.is_empty(), "the removed backend had no flow to move: {before:?}");
    assert!(of_gone.iter().all(|p| after[p] != gone.name), "a flow stayed on the removed backend");
    let others: Vec<u16> = before.keys().filter(|p| !of_gone.contains(p)).copied().collect();
    let kept = others.iter().filter(|p| before[*p] == after[*p]).count();
    assert!(kept * 100 >= others.len() * 90, "only {kept} of {} other flows kept their backend", others.len());
}

/// A TCP connection whose conntrack entries are lost (deleted here from the pinned map, as an eviction or a
/// lost map would) keeps its backend: its next segment, not a SYN, picks by the 5-tuple's hash, which is
/// how its SYN picked. Done on a ClusterIP (random in kube-proxy, hashed here), without Maglev.
#[test]
fn a_connection_whose_state_is_lost_keeps_its_backend() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backends: Vec<PodRef> = [(1, 2), (2, 1), (2, 2)].iter().map(|&(n, k)| lab.pod(n, k).clone()).collect();
    for b in &backends {
        lab.serve(b, &[8080], &[]).unwrap();
    }
    let vip = Ipv4Addr::new(10, 32, 0, 71);
    let svc = Svc::new("web", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    let eps: Vec<Endpoint> = backends.iter().map(|p| Endpoint::ready(p.ip, node_name(p.node))).collect();
    lab.write_manifest("web.yaml", &svc.with_endpoints(&eps)).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let sessions: Vec<TcpSession> = (0..8)
        .map(|_| TcpSession::open(&client, SocketAddrV4::new(vip, 80), Duration::from_secs(2)).unwrap())
        .collect();
    let first: Vec<String> = sessions.iter().map(|s| s.ask().unwrap().backend).collect();

    let map = lab.pinned_map(1, proxy_common::maps::CONNTRACK).unwrap();
    let mut ct: aya::maps::HashMap<_, proxy_common::conntrack::CtKey, proxy_common::conntrack::CtValue> =
        aya::maps::HashMap::try_from(map).unwrap();
    let keys: Vec<_> = ct.keys().map(Result::unwrap).collect();
    assert!(keys.len() >= 16, "the situation: the connections' entries exist ({} found)", keys.len());
    for k in &keys {
        ct.remove(k).unwrap();
    }
    assert_eq!(ct.keys().count(), 0, "the state is gone");

    for (i, s) in sessions.iter().enumerate() {
        let again = s.ask().unwrap_or_else(|e| panic!("connection {i} broke after losing its state: {e:#}"));
        assert_eq!(again.backend, first[i], "connection {i} moved to another backend");
    }
}
