//! Restart without disruption: the agent is killed (SIGKILL) and started again under sustained traffic.
//! In eBPF mode, pinned maps and links keep the data path running while no agent runs; the new agent adopts
//! them and swaps its programs into the same links. In the netfilter modes the rules stay in the kernel; the
//! new iptables agent finds them as it would write them and writes nothing, the nftables one rewrites its
//! table atomically. Either way established connections survive and new ones keep working. Every test here runs in the mode the lab runs (`PROXY_LAB_MODE`).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    thread,
    time::{Duration, Instant},
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{TcpSession, UdpSession},
    echo6::Echo6,
    lab::{mode, node_ip, node_ip6, node_name},
    manifests::{Endpoint, Port, Svc},
    traffic::{Bounds, RequestLoops},
};

const TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn sigkill_and_restart_under_load_drops_no_connection() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    for (n, k) in [(1, 2), (2, 2)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[]).unwrap();
    }
    let mut svc = Svc::new(
        "steady",
        Ipv4Addr::new(10, 32, 0, 95),
        vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }],
    );
    svc.type_ = "NodePort";
    svc.node_ports = vec![30105];
    let endpoints =
        vec![Endpoint::ready(lab.pod(1, 2).ip, node_name(1)), Endpoint::ready(lab.pod(2, 2).ip, node_name(2))];
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&endpoints)).unwrap();
    lab.start_agents().unwrap();

    let cluster_ip = SocketAddrV4::new(Ipv4Addr::new(10, 32, 0, 95), 80);
    let node_port = SocketAddrV4::new(node_ip(1), 30105);
    let pod_session = TcpSession::open(&lab.pod(1, 1).ns.clone(), cluster_ip, TIMEOUT).unwrap();
    let ext_session = TcpSession::open(&lab.external_ns(), node_port, TIMEOUT).unwrap();
    let first = (pod_session.ask().unwrap().backend, ext_session.ask().unwrap().backend);

    // New connections from a pod and from outside, back to back, for as long as the restart takes (bounded:
    // at most 20 s and 4000 requests per client).
    let clients = [(lab.pod(1, 1).ns.clone(), cluster_ip), (lab.external_ns(), node_port)];
    let bounds = Bounds { at_most: Duration::from_secs(20), requests: 4000, pause: Duration::ZERO, timeout: TIMEOUT };
    let load = RequestLoops::start(&clients, bounds).unwrap();
    thread::sleep(Duration::from_millis(500));
    lab.agent(1).kill_hard();
    // No agent on node1 now: the pinned programs and maps carry on alone.
    let before_dead = load.answered();
    thread::sleep(Duration::from_millis(1500));
    let while_dead = load.answered() - before_dead;
    lab.restart_agent_hard(1).unwrap();
    thread::sleep(Duration::from_millis(1000));
    let (ok, failed) = load.finish();
    eprintln!("{ok} requests answered, {failed} failed, {while_dead} answered while no agent ran");
    assert_eq!(failed, 0, "no request may fail across a SIGKILL and restart");
    assert!(while_dead > 0, "traffic must keep flowing while the agent is dead");
    assert_eq!(
        (
            pod_session.ask().expect("pod connection survives").backend,
            ext_session.ask().expect("external connection survives").backend
        ),
        first,
        "established connections keep their backends"
    );
    // eBPF adopts the pinned maps; iptables finds its chains as it renders them. (nftables rewrites its
    // table in one transaction: it reads back names, not rules.)
    if mode() == "ebpf" || mode() == "iptables" {
        let log = lab.agent(1).log();
        let first_sync = log.lines().find(|l| l.contains("service table applied")).unwrap();
        assert!(
            first_sync.contains("writes=0") && first_sync.contains("deletes=0"),
            "the new agent must adopt, not rewrite: {first_sync}"
        );
    }
}

/// One restart: what it is, the agent's flags, its environment.
type RestartStep<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);

/// Restarts that change the maps under live traffic, in turn: (a) a bigger connection table
/// (`--conntrack-min`), (b) an upgrade to a build whose `CONNTRACK` and `SERVICES` layouts have another
/// version (the test-only `PROXY_AGENT_TEST_LAYOUT_BUMP`), (c) the downgrade back with the default size.
/// Held TCP connections (from a pod to the ClusterIP, from outside to the NodePort) and a UDP flow, in
/// each family (the Service is dual-stack), keep their backends and their translation, and new connections made back to back throughout all succeed. In
/// the eBPF mode each restart builds new maps beside the old ones and swaps the programs only once they
/// are filled; the netfilter modes run the same restarts (their rules and the kernel's conntrack stay).
#[test]
fn restarts_that_resize_upgrade_and_downgrade_the_maps_drop_no_flow() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    assert!(lab.dual_stack(), "the restart tests run on the routed topology, which has IPv6");
    let mut echoes = Vec::new();
    for (n, k) in [(1, 2), (2, 2)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[5353]).unwrap();
        echoes.push(Echo6::start(&pod.ns, &pod.name, 8080).unwrap());
        echoes.push(Echo6::start(&pod.ns, &pod.name, 5353).unwrap());
    }
    let vip = Ipv4Addr::new(10, 32, 0, 94);
    let vip6 = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x94);
    let mut svc = Svc::new(
        "upgraded",
        vip,
        vec![
            Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
            Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
        ],
    );
    svc.type_ = "NodePort";
    svc.node_ports = vec![30106, 30107];
    svc.cluster_ip6 = Some(vip6);
    let endpoints =
        vec![Endpoint::ready(lab.pod(1, 2).ip, node_name(1)), Endpoint::ready(lab.pod(2, 2).ip, node_name(2))];
    let endpoints6: Vec<Endpoint> =
        [(1, 2), (2, 2)].map(|(n, k)| Endpoint::ready(lab.pod(n, k).ip6.unwrap(), node_name(n))).into();
    lab.write_manifest("svc.yaml", &svc.with_endpoints_of_both_families(&endpoints, &endpoints6)).unwrap();
    lab.start_agents().unwrap();

    let cluster_ip = SocketAddrV4::new(vip, 80);
    let node_port = SocketAddrV4::new(node_ip(1), 30106);
    let pod_ns = lab.pod(1, 1).ns.clone();
    let pod_sessions: Vec<TcpSession> =
        (0..4).map(|_| TcpSession::open(&pod_ns, cluster_ip, TIMEOUT).unwrap()).collect();
    let ext_session = TcpSession::open(&lab.external_ns(), node_port, TIMEOUT).unwrap();
    let udp = UdpSession::open(&pod_ns, SocketAddrV4::new(vip, 53), TIMEOUT).unwrap();
    let pod_sessions6: Vec<_> =
        (0..4).map(|_| TcpSession::open6(&pod_ns, SocketAddrV6::new(vip6, 80, 0, 0), TIMEOUT).unwrap()).collect();
    let node_port6 = SocketAddrV6::new(node_ip6(1), 30106, 0, 0);
    let ext_session6 = TcpSession::open6(&lab.external_ns(), node_port6, TIMEOUT).unwrap();
    let udp6 = UdpSession::open6(&pod_ns, SocketAddrV6::new(vip6, 53, 0, 0), TIMEOUT).unwrap();
    let backends = |label: &str| -> Vec<String> {
        let failed = |what: &str, e: &anyhow::Error| -> String { panic!("{label}: {what} failed: {e:#}") };
        let mut b: Vec<String> = pod_sessions
            .iter()
            .map(|s| s.ask().map_or_else(|e| failed("a held pod connection", &e), |r| r.backend))
            .collect();
        b.push(ext_session.ask().map_or_else(|e| failed("the held external connection", &e), |r| r.backend));
        b.push(udp.ask().map_or_else(|e| failed("the UDP flow", &e), |r| r.backend));
        for s in &pod_sessions6 {
            b.push(s.ask().map_or_else(|e| failed("a held IPv6 pod connection", &e), |r| r.backend));
        }
        b.push(ext_session6.ask().map_or_else(|e| failed("the held IPv6 external connection", &e), |r| r.backend));
        b.push(udp6.ask().map_or_else(|e| failed("the IPv6 UDP flow", &e), |r| r.backend));
        b
    };
    let first = backends("before");

    // New connections from a pod and from outside, back to back, bounded: 90 s and 40000 per client.
    let clients = [(pod_ns.clone(), cluster_ip), (lab.external_ns(), node_port)];
    let bounds = Bounds { at_most: Duration::from_secs(90), requests: 40_000, pause: Duration::ZERO, timeout: TIMEOUT };
    let load = RequestLoops::start(&clients, bounds).unwrap();
    let mode_args = ["--mode".to_owned(), mode()];
    let steps: [RestartStep; 3] = [
        ("a bigger conntrack table", vec!["--conntrack-min", "262144"], vec![]),
        (
            "an upgrade to other layout versions",
            vec!["--conntrack-min", "262144"],
            vec![("PROXY_AGENT_TEST_LAYOUT_BUMP", "CONNTRACK,SERVICES,CONNTRACK6,SERVICES6")],
        ),
        ("the downgrade back, default size", vec![], vec![]),
    ];
    let mut per_step = Vec::new();
    for (label, args, env) in steps {
        thread::sleep(Duration::from_millis(700));
        let before = load.answered();
        let args: Vec<&str> = mode_args.iter().map(String::as_str).chain(args).collect();
        lab.restart_agent_with_env(1, &args, &env).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        if mode() == "ebpf" {
            let log = lab.agent(1).log();
            assert!(log.contains("upgrade complete"), "{label}: the new maps were not swapped in:\n{log}");
            assert!(!lab.pin_dir(1).join("previous").exists(), "{label}: the previous maps are still pinned");
        }
        thread::sleep(Duration::from_millis(700));
        assert_eq!(backends(label), first, "{label}: flows kept their backends");
        per_step.push((label, load.answered() - before));
    }
    let (ok, failed) = load.finish();
    eprintln!("{ok} requests answered, {failed} failed; per step: {per_step:?}");
    assert_eq!(failed, 0, "no request may fail across the restarts");
    assert!(per_step.iter().all(|(_, n)| *n > 0), "traffic flowed through every step: {per_step:?}");
    if mode() == "ebpf" {
        let info =
            aya::maps::MapData::from_pin(lab.pin_path(1, proxy_common::maps::CONNTRACK)).unwrap().info().unwrap();
        let cpus = aya::util::nr_cpus().unwrap().get();
        let default = proxy_common::capacity::lru_entries(131_072, 2, cpus);
        assert_eq!(info.max_entries(), default, "the downgrade's default size: 131072 flows");
    }
}

/// An upgrade from a real older build: agents of `PROXY_AGENT_PREVIOUS_BIN` (e.g. the commit before layout
/// versions, built with `cargo xtask build-ebpf && cargo build -p proxy-agent` in a worktree of its own)
/// serve a NodePort under load with held connections; node 1's is replaced by the build under test. Run
/// by hand (`cargo test -p proxy-lab --test restart an_upgrade_from -- --ignored`): the suite has no older
/// build to hand.
#[test]
#[ignore = "needs PROXY_AGENT_PREVIOUS_BIN, an older agent build"]
fn an_upgrade_from_the_previous_build_drops_no_flow() {
    let Some(previous) = std::env::var_os("PROXY_AGENT_PREVIOUS_BIN") else {
        panic!("set PROXY_AGENT_PREVIOUS_BIN to an older agent binary");
    };
    let spec = LabSpec { agent_binary: Some(previous.into()), ..LabSpec::default() };
    let mut lab = Lab::start(spec).expect("lab");
    for (n, k) in [(1, 2), (2, 2)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[]).unwrap();
    }
    let vip = Ipv4Addr::new(10, 32, 0, 92);
    let mut svc =
        Svc::new("old-to-new", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30108];
    let endpoints =
        vec![Endpoint::ready(lab.pod(1, 2).ip, node_name(1)), Endpoint::ready(lab.pod(2, 2).ip, node_name(2))];
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&endpoints)).unwrap();
    lab.start_agents().unwrap();
    let cluster_ip = SocketAddrV4::new(vip, 80);
    let node_port = SocketAddrV4::new(node_ip(1), 30108);
    let pod_ns = lab.pod(1, 1).ns.clone();
    let sessions: Vec<TcpSession> = (0..4)
        .map(|_| TcpSession::open(&pod_ns, cluster_ip, TIMEOUT).unwrap())
        .chain((0..2).map(|_| TcpSession::open(&lab.external_ns(), node_port, TIMEOUT).unwrap()))
        .collect();
    let first: Vec<String> = sessions.iter().map(|s| s.ask().unwrap().backend).collect();
    let clients = [(pod_ns.clone(), cluster_ip), (lab.external_ns(), node_port)];
    let bounds = Bounds { at_most: Duration::from_secs(30), requests: 40_000, pause: Duration::ZERO, timeout: TIMEOUT };
    let load = RequestLoops::start(&clients, bounds).unwrap();
    thread::sleep(Duration::from_millis(700));
    lab.upgrade_agent(1).unwrap();
    thread::sleep(Duration::from_millis(1000));
    let (ok, failed) = load.finish();
    let log = lab.agent(1).log();
    eprintln!("{}", log.lines().filter(|l| l.contains("upgrade")).collect::<Vec<_>>().join("\n"));
    let now: Vec<String> = sessions.iter().map(|s| s.ask().expect("a held connection survives").backend).collect();
    eprintln!("{ok} requests answered, {failed} failed");
    assert_eq!(now, first, "held connections keep their backends");
    // From a build of this scheme's layouts the bar is 0 (`restarts_that_resize_upgrade_and_downgrade_*`).
    // From the builds before it, whose conntrack layout the new programs cannot read during the ~100 ms
    // swap, a request opened in that window may fail: 1 of ~15k in 2 of 4 runs when this was written.
    assert!(failed <= 2, "{failed} requests failed across the upgrade");
    assert!(log.contains("upgrade complete"), "{log}");
}

/// An API-server outage of 30 s with the agent restarted in the middle of it: node 1's agent watches the
/// lab's stand-in API server (`proxy_lab::apiserver`), which goes away; the agent is killed and started
/// again while it is away; the Service's endpoints change meanwhile (one backend replaced; the old pod keeps
/// running). The restarted agent serves what is programmed (0 failed requests throughout), reports
/// `/livez` and `/healthz` healthy as kube-proxy does while it has nothing to do, and when the server
/// returns it syncs the changes: new connections then reach the new backend set only.
#[test]
fn an_api_outage_with_a_restart_during_it_loses_nothing_and_catches_up() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let (old, kept, new) = (lab.pod(1, 2).clone(), lab.pod(2, 2).clone(), lab.pod(1, 3).clone());
    for pod in [&old, &kept, &new] {
        lab.serve(pod, &[8080], &[]).unwrap();
    }
    let vip = Ipv4Addr::new(10, 32, 0, 93);
    let svc = Svc::new("outage", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    let eps = |pods: &[&proxy_lab::PodRef]| -> Vec<Endpoint> {
        pods.iter().map(|p| Endpoint::ready(p.ip, node_name(p.node))).collect()
    };
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&eps(&[&old, &kept]))).unwrap();
    lab.start_agents().unwrap();
    let mut api = proxy_lab::apiserver::ApiServer::start(&lab.node_ns(1), 16_443, &lab.manifest_dir()).unwrap();
    let kubeconfig = lab.work_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    lab.restart_agent_watching(1, Some(&kubeconfig), "service table applied").expect("the agent syncs from the API");

    let target = SocketAddrV4::new(vip, 80);
    let client = lab.pod(1, 1).ns.clone();
    let bounds = Bounds {
        at_most: Duration::from_secs(120),
        requests: 10_000,
        pause: Duration::from_millis(20),
        timeout: TIMEOUT,
    };
    let load = RequestLoops::start(&[(client.clone(), target)], bounds).unwrap();

    let outage = Instant::now();
    api.stop();
    thread::sleep(Duration::from_secs(3));
    lab.restart_agent_watching(1, Some(&kubeconfig), "dataplane started").expect("the agent starts without the API");
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&eps(&[&new, &kept]))).unwrap();
    thread::sleep(Duration::from_secs(2));
    let health = |path: &str| {
        proxy_lab::echo::http_get_path(&lab.node_ns(1), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256), path, TIMEOUT)
            .map(|(code, _)| code)
    };
    assert_eq!(health("/livez").unwrap(), 200, "alive while the API is away");
    assert_eq!(health("/healthz").unwrap(), 200, "healthy: nothing waits to be programmed");
    assert_eq!(lab.agent(1).count_in_log("service table applied"), 0, "the situation: no sync yet");
    let during = load.answered();
    thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));

    let seen = lab.agent(1).count_in_log("service table applied");
    api.resume().unwrap();
    let back = Instant::now();
    lab.agent(1)
        .wait_for_log("service table applied", seen, Duration::from_secs(40))
        .expect("a sync once the API is back");
    let caught_up = back.elapsed();
    let (ok, failed) = load.finish();
    eprintln!(
        "{ok} requests answered ({during} before the changes), {failed} failed; changes applied {caught_up:?} after the API returned"
    );
    assert_eq!(failed, 0, "no request to a live backend may fail through the outage");
    let answers = proxy_lab::echo::requests(&client, proxy_lab::echo::Proto::Tcp, target, 30, TIMEOUT).unwrap();
    let names: Vec<String> = answers.into_iter().map(|r| r.unwrap().backend).collect();
    assert!(names.iter().all(|n| *n != old.name), "the old backend left with the change: {names:?}");
    assert!(names.contains(&new.name), "the new backend serves: {names:?}");
}

/// The periodic full resync re-reads what the kernel holds: a Service's map entries (eBPF), its
/// `KUBE-SERVICES` rules (iptables) or its verdict-map element (nftables) deleted behind the agent's back
/// are written again within a full resync period (1 s here), without any change in the cluster.
#[test]
fn the_periodic_resync_repairs_state_changed_behind_the_agents_back() {
    use aya::maps::HashMap;
    use proxy_common::service::{ServiceKey, ServiceValue};

    let mut spec = LabSpec::default();
    spec.agent_args.extend(["--sync-period", "1s", "--full-resync-period", "1s"].map(str::to_owned));
    let vip = Ipv4Addr::new(10, 32, 0, 98);
    let (lab, client, target) = one_working_service(spec, "repaired", vip);

    let node1 = lab.node_ns(1);
    let in_node1 = |args: &[&str]| proxy_lab::cmd::run("ip", &[&["netns", "exec", node1.as_str()], args].concat());
    let mut ebpf_entries = None;
    match mode().as_str() {
        "iptables" => drop(in_node1(&["iptables", "-w", "-t", "nat", "-F", "KUBE-SERVICES"]).unwrap()),
        "nftables" => drop(in_node1(&["nft", "flush", "map", "ip", "proxy-agent", "service-ips"]).unwrap()),
        _ => {
            let mut services: HashMap<_, ServiceKey, ServiceValue> =
                HashMap::try_from(lab.pinned_map(1, proxy_common::maps::SERVICES).unwrap()).unwrap();
            let ours: Vec<ServiceKey> =
                services.keys().filter_map(Result::ok).filter(|k| k.addr == u32::from_ne_bytes(vip.octets())).collect();
            assert!(!ours.is_empty());
            for key in &ours {
                services.remove(key).unwrap();
            }
            ebpf_entries = Some((services, ours.len()));
        }
    }
    let broken =
        proxy_lab::echo::attempt(&client, proxy_lab::echo::Proto::Tcp, target, Duration::from_millis(300)).unwrap();
    assert!(!matches!(broken, proxy_lab::echo::Outcome::Answered(_)), "the entries really were gone: {broken:?}");

    // Bounded: a few sync periods.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if proxy_lab::echo::request(&client, proxy_lab::echo::Proto::Tcp, target, Duration::from_millis(500)).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the resync never repaired the dataplane");
        thread::sleep(Duration::from_millis(200));
    }
    if let Some((services, count)) = ebpf_entries {
        assert_eq!(
            services.keys().filter_map(Result::ok).filter(|k| k.addr == u32::from_ne_bytes(vip.octets())).count(),
            count
        );
    }
}

/// An upgrade that changes a map's layout: the new agent cannot adopt the old pin, so it replaces it (with a
/// warning naming the map and the property) and serves traffic from a fresh map instead of failing to start.
#[test]
fn a_pinned_map_with_another_layout_is_replaced_not_fatal() {
    if mode() != "ebpf" {
        return;
    }
    let (mut lab, client, target) = one_working_service(LabSpec::default(), "upgraded", Ipv4Addr::new(10, 32, 0, 97));

    // What an older build might have pinned: same name, another key and value size, no flags.
    let pin = lab.pin_path(1, proxy_common::maps::SERVICES);
    std::fs::remove_file(&pin).unwrap();
    let old: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::create(16, 0).unwrap();
    old.pin(&pin).unwrap();

    lab.restart_agent_hard(1).expect("the agent starts despite the incompatible pin");
    let log = lab.agent(1).log();
    assert!(log.contains("different layout") && log.contains("SERVICES"), "{log}");
    let services = lab.pinned_map(1, proxy_common::maps::SERVICES).unwrap();
    let typed: Result<
        aya::maps::HashMap<_, proxy_common::service::ServiceKey, proxy_common::service::ServiceValue>,
        _,
    > = aya::maps::HashMap::try_from(services);
    assert!(typed.is_ok(), "the pin now holds this build's layout");
    assert!(proxy_lab::echo::request(&client, proxy_lab::echo::Proto::Tcp, target, TIMEOUT).is_ok());
}

/// A lab whose agents serve one ClusterIP (`vip`:80) backed by pod 2-2, checked to answer a pod on node 1.
/// Returns the lab, the client's namespace and the Service address.
fn one_working_service(spec: LabSpec, name: &'static str, vip: Ipv4Addr) -> (Lab, String, SocketAddrV4) {
    let mut lab = Lab::start(spec).expect("lab");
    let pod = lab.pod(2, 2).clone();
    lab.serve(&pod, &[8080], &[]).unwrap();
    let svc = Svc::new(name, vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&[Endpoint::ready(pod.ip, node_name(2))])).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let target = SocketAddrV4::new(vip, 80);
    assert!(proxy_lab::echo::request(&client, proxy_lab::echo::Proto::Tcp, target, TIMEOUT).is_ok());
    (lab, client, target)
}
