//! Flow lifetimes in every mode, with real traffic: the agent times its own table in the eBPF mode and sets
//! the kernel's conntrack timeouts in the netfilter modes, as kube-proxy does.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::udp_ask_from_ports,
    lab::node_name,
    manifests::{Endpoint, Port, Svc},
};

/// With a 2 s UDP timeout, a flow keeps its backend while it lives, and an idle one expires: its next
/// datagram is a new flow, balanced afresh. Sixteen client ports: while their flows live, none moves to a
/// backend added meanwhile; after 5 s of silence about half do (all staying has odds of 2^-16).
#[test]
fn idle_udp_flows_expire_and_their_next_datagram_is_balanced_afresh() {
    let mut spec = LabSpec::default();
    spec.agent_args.extend(["--conntrack-udp-timeout".to_owned(), "2s".to_owned()]);
    let mut lab = Lab::start(spec).expect("lab");
    let (first, second) = (lab.pod(2, 1).clone(), lab.pod(2, 2).clone());
    lab.serve(&first, &[], &[5353]).unwrap();
    lab.serve(&second, &[], &[5353]).unwrap();
    let dns = vec![Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 }];
    let svc = Svc::new("dns", Ipv4Addr::new(10, 32, 0, 60), dns);
    lab.write_manifest("dns.yaml", &svc.with_endpoints(&[Endpoint::ready(first.ip, node_name(2))])).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let target = SocketAddrV4::new(Ipv4Addr::new(10, 32, 0, 60), 53);
    let ports: Vec<u16> = (48_000..48_016).collect();

    let answered = udp_ask_from_ports(&client, target, ports.clone());
    assert!(answered.iter().all(|r| r.as_deref() == Ok(first.name.as_str())), "{answered:?}");
    let both = [Endpoint::ready(first.ip, node_name(2)), Endpoint::ready(second.ip, node_name(2))];
    let seen = lab.sync_counts();
    lab.write_manifest("dns.yaml", &svc.with_endpoints(&both)).unwrap();
    lab.wait_for_sync(&seen).unwrap();
    let live = udp_ask_from_ports(&client, target, ports.clone());
    assert!(live.iter().all(|r| r.as_deref() == Ok(first.name.as_str())), "live flows keep their backend: {live:?}");

    std::thread::sleep(Duration::from_secs(5));
    let fresh = udp_ask_from_ports(&client, target, ports);
    assert!(fresh.iter().all(Result::is_ok), "{fresh:?}");
    let moved = fresh.iter().filter(|r| r.as_deref() == Ok(second.name.as_str())).count();
    assert!(moved > 0, "after expiry no flow was balanced afresh: {fresh:?}");
    if proxy_lab::lab::mode() != "ebpf" {
        let set = proxy_lab::cmd::run(
            "ip",
            &["netns", "exec", lab.node_ns(1).as_str(), "cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"],
        )
        .unwrap();
        assert_eq!(set.trim(), "2", "the agent set the kernel's UDP timeout, as kube-proxy does");
    }
}
