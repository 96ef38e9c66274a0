//! Maglev consistent hashing and backends picked by the 5-tuple's hash, against the kernel programs with
//! real traffic (eBPF mode).
//!
//! An external load balancer may send the packets of one flow to any node. With `--lb-algorithm maglev`
//! every node builds the same table from the same backends, so the flow meets the same backend wherever
//! it lands; when a backend goes, only its flows (and few others) move. Each test asks over both families
//! where the lab has IPv6 (the Services are dual-stack; IPv6 frontends share the Maglev tables' layout).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec, PodRef,
    echo::{TcpSession, udp_ask_from_ports},
    lab::{Family, node_name},
    manifests::{Endpoint, Port, Svc},
};

const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 40);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x40);

/// `svc` with `backends` as its endpoints, dual-stack (cluster IP `vip6`) where the lab has IPv6.
fn dual(lab: &Lab, mut svc: Svc, vip6: Ipv6Addr, backends: &[PodRef]) -> String {
    let ready = |f: Family| -> Vec<Endpoint> {
        backends.iter().map(|p| Endpoint::ready(f.pod(p), node_name(p.node))).collect()
    };
    if !lab.dual_stack() {
        return svc.with_endpoints(&ready(Family::V4));
    }
    svc.cluster_ip6 = Some(vip6);
    svc.lb_ingress6 = svc.lb_ingress.iter().map(|_| LB_IP6).collect();
    svc.with_endpoints_of_both_families(&ready(Family::V4), &ready(Family::V6))
}

fn dns_lb(lab: &Lab, backends: &[PodRef]) -> String {
    let mut svc = Svc::new(
        "dns-lb",
        Ipv4Addr::new(10, 32, 0, 70),
        vec![Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 }],
    );
    svc.type_ = "LoadBalancer";
    svc.node_ports = vec![30053];
    svc.lb_ingress = vec![(LB_IP, "VIP")];
    dual(lab, svc, Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x70), backends)
}

/// The backend each client port reached through node `node`, asking the load-balancer IP of `family`.
fn through(lab: &Lab, family: Family, node: usize, ports: &[u16]) -> BTreeMap<u16, String> {
    let lb: IpAddr = match family {
        Family::V4 => {
            lab.route_external_via(LB_IP, node).unwrap();
            LB_IP.into()
        }
        Family::V6 => {
            lab.route_external6_via(LB_IP6, node).unwrap();
            LB_IP6.into()
        }
    };
    let answers = udp_ask_from_ports(&lab.external_ns(), SocketAddr::new(lb, 53), ports.to_vec());
    ports
        .iter()
        .zip(answers)
        .map(|(p, a)| (*p, a.unwrap_or_else(|e| panic!("{}: port {p} via node {node}: {e}", family.name()))))
        .collect()
}

fn lab_with_backends() -> (Lab, Vec<PodRef>) {
    let mut spec = LabSpec::default();
    spec.agent_args.extend(["--lb-algorithm".to_owned(), "maglev".to_owned()]);
    let mut lab = Lab::start(spec).expect("lab");
    let backends: Vec<PodRef> = [(1, 2), (1, 3), (2, 1), (2, 2)].iter().map(|&(n, k)| lab.pod(n, k).clone()).collect();
    for b in &backends {
        lab.serve(b, &[8080], &[5353]).unwrap();
        if lab.dual_stack() {
            lab.serve6(b, &[5353]).unwrap();
        }
    }
    lab.write_manifest("lb.yaml", &dns_lb(&lab, &backends)).unwrap();
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
    for family in Family::of(&lab) {
        let via_1 = through(&lab, family, 1, &ports);
        let via_2 = through(&lab, family, 2, &ports);
        assert_eq!(via_1, via_2, "{}: the nodes disagree on some flows", family.name());
        for b in &backends {
            assert!(via_1.values().any(|name| *name == b.name), "{}: {} got no flow: {via_1:?}", family.name(), b.name);
        }
    }
}

/// 64 flows through node 1; one of the four backends leaves the Service; the same flows through node 2
/// (new to it, so decided by its new table): the removed backend's flows all moved, and nearly all the
/// others kept their backend (Maglev moves about 1/N of the table, plus a few percent).
#[test]
fn removing_one_backend_moves_only_its_flows() {
    let (mut lab, backends) = lab_with_backends();
    let ports: Vec<u16> = (47_300..47_364).collect();
    let families = Family::of(&lab);
    let before: Vec<_> = families.iter().map(|&f| through(&lab, f, 1, &ports)).collect();
    let gone = &backends[3];
    let seen = lab.sync_counts();
    lab.write_manifest("lb.yaml", &dns_lb(&lab, &backends[..3])).unwrap();
    lab.wait_for_sync(&seen).unwrap();
    for (&family, before) in families.iter().zip(&before) {
        let name = family.name();
        let after = through(&lab, family, 2, &ports);
        let of_gone: Vec<u16> = before.iter().filter(|(_, b)| **b == gone.name).map(|(p, _)| *p).collect();
        assert!(!of_gone.is_empty(), "{name}: the removed backend had no flow to move: {before:?}");
        assert!(of_gone.iter().all(|p| after[p] != gone.name), "{name}: a flow stayed on the removed backend");
        let others: Vec<u16> = before.keys().filter(|p| !of_gone.contains(p)).copied().collect();
        let kept = others.iter().filter(|p| before[*p] == after[*p]).count();
        assert!(
            kept * 100 >= others.len() * 90,
            "{name}: only {kept} of {} other flows kept their backend",
            others.len()
        );
    }
}

/// Removes every entry of node 1's pinned conntrack map `name` (key `K`, value `V`): how many there were.
fn forget_flows<K: aya::Pod, V: aya::Pod>(lab: &Lab, name: &str) -> usize {
    let map = lab.pinned_map(1, name).unwrap();
    let mut ct: aya::maps::HashMap<_, K, V> = aya::maps::HashMap::try_from(map).unwrap();
    let keys: Vec<K> = ct.keys().map(Result::unwrap).collect();
    for k in &keys {
        ct.remove(k).unwrap();
    }
    assert_eq!(ct.keys().count(), 0, "{name}: the state is gone");
    keys.len()
}

/// A TCP connection whose conntrack entries are lost (deleted here from the pinned maps, as an eviction or
/// a lost map would) keeps its backend: its next segment, not a SYN, picks by the 5-tuple's hash, which is
/// how its SYN picked. Done on a ClusterIP (random in kube-proxy, hashed here), without Maglev, with eight
/// connections per family.
#[test]
fn a_connection_whose_state_is_lost_keeps_its_backend() {
    use proxy_common::conntrack::{CtKey, CtKey6, CtValue, CtValue6};
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backends: Vec<PodRef> = [(1, 2), (2, 1), (2, 2)].iter().map(|&(n, k)| lab.pod(n, k).clone()).collect();
    for b in &backends {
        lab.serve(b, &[8080], &[]).unwrap();
        if lab.dual_stack() {
            lab.serve6(b, &[8080]).unwrap();
        }
    }
    let vip = Ipv4Addr::new(10, 32, 0, 71);
    let vip6 = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x71);
    let svc = Svc::new("web", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    lab.write_manifest("web.yaml", &dual(&lab, svc, vip6, &backends)).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let timeout = Duration::from_secs(2);
    let sessions: Vec<TcpSession> =
        (0..8).map(|_| TcpSession::open(&client, std::net::SocketAddrV4::new(vip, 80), timeout).unwrap()).collect();
    let sessions6: Vec<TcpSession<_>> = if lab.dual_stack() {
        (0..8)
            .map(|_| TcpSession::open6(&client, std::net::SocketAddrV6::new(vip6, 80, 0, 0), timeout).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    let first: Vec<String> = sessions.iter().map(|s| s.ask().unwrap().backend).collect();
    let first6: Vec<String> = sessions6.iter().map(|s| s.ask().unwrap().backend).collect();

    let forgotten = forget_flows::<CtKey, CtValue>(&lab, proxy_common::maps::CONNTRACK);
    assert!(forgotten >= 16, "the situation: the IPv4 connections' entries existed ({forgotten} found)");
    if lab.dual_stack() {
        let forgotten = forget_flows::<CtKey6, CtValue6>(&lab, proxy_common::maps::CONNTRACK6);
        assert!(forgotten >= 16, "the situation: the IPv6 connections' entries existed ({forgotten} found)");
    }

    for (i, s) in sessions.iter().enumerate() {
        let again = s.ask().unwrap_or_else(|e| panic!("IPv4 connection {i} broke after losing its state: {e:#}"));
        assert_eq!(again.backend, first[i], "IPv4 connection {i} moved to another backend");
    }
    for (i, s) in sessions6.iter().enumerate() {
        let again = s.ask().unwrap_or_else(|e| panic!("IPv6 connection {i} broke after losing its state: {e:#}"));
        assert_eq!(again.backend, first6[i], "IPv6 connection {i} moved to another backend");
    }
}
