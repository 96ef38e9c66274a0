//! Flow lifetimes in every mode, with real traffic: the agent times its own table in the eBPF mode and sets
//! the kernel's conntrack timeouts in the netfilter modes, as kube-proxy does. Over both families where the
//! lab has IPv6: the Service is dual-stack and each family's flows are asked side by side.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec, PodRef,
    echo::udp_ask_from_ports,
    lab::{Family, node_name},
    manifests::{Endpoint, Port, Svc},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 60);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x60);

/// The Service with `pods` as its endpoints, in each family the lab has.
fn manifest(lab: &Lab, svc: &Svc, pods: &[&PodRef]) -> String {
    let ready =
        |f: Family| -> Vec<Endpoint> { pods.iter().map(|p| Endpoint::ready(f.pod(p), node_name(p.node))).collect() };
    if lab.dual_stack() {
        svc.with_endpoints_of_both_families(&ready(Family::V4), &ready(Family::V6))
    } else {
        svc.with_endpoints(&ready(Family::V4))
    }
}

/// With a 2 s UDP timeout, a flow keeps its backend while it lives, and an idle one expires: its next
/// datagram is a new flow, balanced afresh. Sixteen client ports per family: while their flows live, none
/// moves to a backend added meanwhile; after 5 s of silence about half do (all staying has odds of 2^-16).
#[test]
fn idle_udp_flows_expire_and_their_next_datagram_is_balanced_afresh() {
    let mut spec = LabSpec::default();
    spec.agent_args.extend(["--conntrack-udp-timeout".to_owned(), "2s".to_owned()]);
    let mut lab = Lab::start(spec).expect("lab");
    let (first, second) = (lab.pod(2, 1).clone(), lab.pod(2, 2).clone());
    let families = Family::of(&lab);
    for pod in [&first, &second] {
        lab.serve(pod, &[], &[5353]).unwrap();
        if lab.dual_stack() {
            lab.serve6(pod, &[5353]).unwrap();
        }
    }
    let dns = vec![Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 }];
    let mut svc = Svc::new("dns", VIP, dns);
    svc.cluster_ip6 = lab.dual_stack().then_some(VIP6);
    lab.write_manifest("dns.yaml", &manifest(&lab, &svc, &[&first])).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let target = |f: Family| match f {
        Family::V4 => SocketAddr::from((VIP, 53)),
        Family::V6 => SocketAddr::from((VIP6, 53)),
    };
    let ports: Vec<u16> = (48_000..48_016).collect();
    let ask_all = || -> Vec<(Family, Vec<Result<String, String>>)> {
        families.iter().map(|&f| (f, udp_ask_from_ports(&client, target(f), ports.clone()))).collect()
    };

    for (f, answered) in ask_all() {
        assert!(answered.iter().all(|r| r.as_deref() == Ok(first.name.as_str())), "{}: {answered:?}", f.name());
    }
    let seen = lab.sync_counts();
    lab.write_manifest("dns.yaml", &manifest(&lab, &svc, &[&first, &second])).unwrap();
    lab.wait_for_sync(&seen).unwrap();
    for (f, live) in ask_all() {
        assert!(
            live.iter().all(|r| r.as_deref() == Ok(first.name.as_str())),
            "{}: live flows keep their backend: {live:?}",
            f.name()
        );
    }

    std::thread::sleep(Duration::from_secs(5));
    for (f, fresh) in ask_all() {
        assert!(fresh.iter().all(Result::is_ok), "{}: {fresh:?}", f.name());
        let moved = fresh.iter().filter(|r| r.as_deref() == Ok(second.name.as_str())).count();
        assert!(moved > 0, "{}: after expiry no flow was balanced afresh: {fresh:?}", f.name());
    }
    if proxy_lab::lab::mode() != "ebpf" {
        let set = proxy_lab::cmd::run(
            "ip",
            &["netns", "exec", lab.node_ns(1).as_str(), "cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"],
        )
        .unwrap();
        assert_eq!(set.trim(), "2", "the agent set the kernel's UDP timeout, as kube-proxy does");
    }
}
