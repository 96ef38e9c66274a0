//! ClusterIP through the eBPF dataplane, with real TCP and UDP traffic between pod namespaces.
//!
//! Each test builds its own lab (nodes, pods, one real agent per node reading a manifest directory), sends
//! real requests, and checks which backend answered and what source address it saw.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Proto, Reply, request, requests},
    lab::node_name,
    manifests::{Endpoint, Port, service_with_endpoints},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn vip(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(std::net::Ipv4Addr::new(10, 32, 0, last), port)
}

fn http(target_port: u16) -> Vec<Port> {
    vec![Port { name: "http", port: 80, protocol: "TCP", target_port }]
}

fn ready(lab: &Lab, pods: &[(usize, usize)]) -> Vec<Endpoint> {
    pods.iter().map(|&(n, k)| Endpoint::ready(lab.pod(n, k).ip, node_name(n))).collect()
}

/// kube-proxy behaviour: a ClusterIP Service forwards to its endpoints, and the backend sees the client
/// pod's own address (no SNAT for pod-to-service traffic).
fn clusterip_tcp_same_and_other_node(spec: LabSpec) {
    let mut lab = Lab::start(spec).expect("lab");
    let (local, remote) = (lab.pod(1, 2).clone(), lab.pod(2, 1).clone());
    lab.serve(&local, &[8080], &[]).unwrap();
    lab.serve(&remote, &[8080], &[]).unwrap();
    let local_eps = ready(&lab, &[(1, 2)]);
    let remote_eps = ready(&lab, &[(2, 1)]);
    lab.write_manifest(
        "local.yaml",
        &service_with_endpoints("default", "web-local", vip(10, 80).ip().to_owned(), &http(8080), &local_eps),
    )
    .unwrap();
    lab.write_manifest(
        "remote.yaml",
        &service_with_endpoints("default", "web-remote", *vip(11, 80).ip(), &http(8080), &remote_eps),
    )
    .unwrap();
    lab.start_agents().unwrap();

    let client = lab.pod(1, 1).clone();
    for (target, backend) in [(vip(10, 80), &local), (vip(11, 80), &remote)] {
        let reply = request(&client.ns, Proto::Tcp, target, TIMEOUT).unwrap_or_else(|e| panic!("{target}: {e:#}"));
        assert_eq!(reply.backend, backend.name, "{target} answered by the wrong pod");
        assert_eq!(*reply.seen_source.ip(), client.ip, "backend must see the client pod's address");
    }
    // The backend itself is still reachable by pod IP: traffic that is not to a Service passes untouched.
    let direct = request(&client.ns, Proto::Tcp, SocketAddrV4::new(remote.ip, 8080), TIMEOUT).unwrap();
    assert_eq!(direct.backend, remote.name);
}

#[test]
fn clusterip_tcp_reaches_backends_on_same_and_other_node() {
    clusterip_tcp_same_and_other_node(LabSpec::default());
}

/// The same with senders computing full checksums (no offload). This is the variant that catches a wrong
/// checksum: with offload on, veth hands the packet over as `CHECKSUM_PARTIAL` and the receiver never checks
/// (seen here: dropping the L4 pseudo-header update fails only this test).
#[test]
fn clusterip_tcp_with_checksum_offload_off() {
    clusterip_tcp_same_and_other_node(LabSpec { tx_checksum_offload: false, ..LabSpec::default() });
}

/// kube-dns's shape: one Service with port 53 over UDP and over TCP. Replies must come from the Service IP.
#[test]
fn dns_like_service_answers_on_udp_and_tcp_port_53() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let ports = vec![
        Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
        Port { name: "dns-tcp", port: 53, protocol: "TCP", target_port: 5353 },
    ];
    for (n, k) in [(1, 3), (2, 3)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[5353], &[5353]).unwrap();
    }
    let eps = ready(&lab, &[(1, 3), (2, 3)]);
    lab.write_manifest("dns.yaml", &service_with_endpoints("kube-system", "kube-dns", *vip(53, 53).ip(), &ports, &eps))
        .unwrap();
    lab.start_agents().unwrap();

    let backends = [lab.pod(1, 3).name.clone(), lab.pod(2, 3).name.clone()];
    for client in [lab.pod(1, 1).clone(), lab.pod(2, 2).clone()] {
        for proto in [Proto::Udp, Proto::Tcp] {
            let replies = requests(&client.ns, proto, vip(53, 53), 10, TIMEOUT).unwrap();
            for reply in replies {
                let reply = reply.unwrap_or_else(|e| panic!("{proto:?} from {}: {e:#}", client.name));
                assert!(backends.contains(&reply.backend), "unexpected backend {}", reply.backend);
                assert_eq!(*reply.seen_source.ip(), client.ip);
            }
        }
    }
}

/// kube-proxy picks a backend at random per connection. 600 new connections over 3 backends: each count
/// is Binomial(600, 1/3), mean 200, standard deviation 11.5; the bounds 140..=260 are over 5 standard
/// deviations wide, so a correct dataplane fails this less than once in a million runs.
#[test]
fn load_spreads_across_three_backends() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let pods = [(1, 2), (1, 3), (2, 1)];
    for &(n, k) in &pods {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[]).unwrap();
    }
    let eps = ready(&lab, &pods);
    lab.write_manifest("web.yaml", &service_with_endpoints("default", "web", *vip(20, 80).ip(), &http(8080), &eps))
        .unwrap();
    lab.start_agents().unwrap();

    let client = lab.pod(1, 1).clone();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for reply in requests(&client.ns, Proto::Tcp, vip(20, 80), 600, TIMEOUT).unwrap() {
        *counts.entry(reply.expect("request").backend).or_default() += 1;
    }
    eprintln!("spread over 600 connections: {counts:?}");
    assert_eq!(counts.len(), 3, "every backend must get traffic: {counts:?}");
    for (backend, count) in &counts {
        assert!((140..=260).contains(count), "{backend} got {count} of 600: {counts:?}");
    }
}

fn backends_seen(replies: Vec<anyhow::Result<Reply>>) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for reply in replies {
        *seen.entry(reply.expect("request").backend).or_default() += 1;
    }
    seen
}

/// EndpointSlice updates take effect without restarting the agent: an added endpoint starts receiving new
/// connections, and a removed one receives none.
#[test]
fn endpoint_added_and_removed_while_running() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let (first, second) = (lab.pod(1, 2).clone(), lab.pod(2, 2).clone());
    lab.serve(&first, &[8080], &[]).unwrap();
    lab.serve(&second, &[8080], &[]).unwrap();
    let write = |lab: &Lab, pods: &[(usize, usize)]| {
        let eps = ready(lab, pods);
        lab.write_manifest("web.yaml", &service_with_endpoints("default", "web", *vip(30, 80).ip(), &http(8080), &eps))
            .unwrap();
    };
    write(&lab, &[(1, 2)]);
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).clone();
    assert_eq!(
        backends_seen(requests(&client.ns, Proto::Tcp, vip(30, 80), 20, TIMEOUT).unwrap()).keys().collect::<Vec<_>>(),
        [&first.name]
    );

    let seen = lab.sync_counts();
    write(&lab, &[(1, 2), (2, 2)]);
    lab.wait_for_sync(&seen).unwrap();
    let both = backends_seen(requests(&client.ns, Proto::Tcp, vip(30, 80), 60, TIMEOUT).unwrap());
    assert!(both.contains_key(&second.name), "added endpoint never answered: {both:?}");

    let seen = lab.sync_counts();
    write(&lab, &[(2, 2)]);
    lab.wait_for_sync(&seen).unwrap();
    let after = backends_seen(requests(&client.ns, Proto::Tcp, vip(30, 80), 40, TIMEOUT).unwrap());
    assert_eq!(after.keys().collect::<Vec<_>>(), [&second.name], "removed endpoint still answered: {after:?}");
}

/// A bad edit to one manifest is rejected with a log line naming the object and the field; every other
/// Service keeps working, and so does the edited one, at its last good version (as a rejected
/// `kubectl apply` leaves it).
#[test]
fn bad_manifest_edits_are_rejected_and_nothing_else_breaks() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let (a, b) = (lab.pod(1, 2).clone(), lab.pod(2, 1).clone());
    lab.serve(&a, &[8080], &[]).unwrap();
    lab.serve(&b, &[8080], &[]).unwrap();
    let good_a = service_with_endpoints("default", "alpha", *vip(40, 80).ip(), &http(8080), &ready(&lab, &[(1, 2)]));
    let good_b = service_with_endpoints("default", "beta", *vip(41, 80).ip(), &http(8080), &ready(&lab, &[(2, 1)]));
    lab.write_manifest("alpha.yaml", &good_a).unwrap();
    lab.write_manifest("beta.yaml", &good_b).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).clone();

    let bad_edits = [
        ("clusterIP: 10.32.0.40\n", "clusterIP: 10.32.0.400\n", "spec.clusterIP"),
        ("    port: 80\n", "    port: 0\n", "spec.ports[0].port"),
        ("    port: 80\n", "    port: 70000\n", "spec.ports[0].port"),
        ("    protocol: TCP\n    targetPort", "    protocol: QUIC\n    targetPort", "spec.ports[0].protocol"),
        ("addresses: [\"10.200.1.12\"]", "addresses: [\"10.200.1.300\"]", "endpoints[0].addresses[0]"),
    ];
    for (from, to, field) in bad_edits {
        let bad = good_a.replacen(from, to, 1);
        assert_ne!(bad, good_a, "edit {from:?} did not apply to the manifest");
        let errors_before = lab.agent(1).count_in_log(field);
        lab.write_manifest("alpha.yaml", &bad).unwrap();
        lab.agent(1).wait_for_log(field, errors_before, Duration::from_secs(10)).unwrap();
        let log = lab.agent(1).log();
        let line = log.lines().rfind(|l| l.contains(field)).unwrap();
        assert!(
            line.contains("ERROR") && line.contains("alpha"),
            "rejection must be an error naming the object: {line}"
        );

        for (target, backend) in [(vip(41, 80), &b.name), (vip(40, 80), &a.name)] {
            let reply = request(&client.ns, Proto::Tcp, target, TIMEOUT)
                .unwrap_or_else(|e| panic!("{target} after bad edit {to:?}: {e:#}"));
            assert_eq!(&reply.backend, backend);
        }
    }
    // A good edit is taken again: alpha moves to beta's backend.
    let seen = lab.sync_counts();
    lab.write_manifest(
        "alpha.yaml",
        &service_with_endpoints("default", "alpha", *vip(40, 80).ip(), &http(8080), &ready(&lab, &[(2, 1)])),
    )
    .unwrap();
    lab.wait_for_sync(&seen).unwrap();
    assert_eq!(request(&client.ns, Proto::Tcp, vip(40, 80), TIMEOUT).unwrap().backend, b.name);
}

/// One TCP request from `source_port` (reusable at once, as a busy client's ports are) to `target`. The
/// connection ends with a reset, so no `TIME_WAIT` keeps the same four-tuple from being used again at once.
fn request_from_port(source_port: u16, target: SocketAddrV4) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Write as _};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.bind(&SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, source_port).into())?;
    socket.connect_timeout(&target.into(), TIMEOUT)?;
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT))?;
    (&stream).write_all(b"hello\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.split_whitespace().next().unwrap_or_default().to_owned())
}

/// A client that reached a pod through a Service may next connect to that pod directly from the same
/// source port (a busy client reuses ports): the old translated flow must not capture the new flow's replies.
/// And then through the Service again from that port: the old flow is forgotten whole, so the new one gets
/// its own reverse translation. Both found by the benchmark, whose load generator does exactly this.
#[test]
fn a_source_port_reused_for_a_direct_connection_to_a_former_backend_works() {
    let (lab, backend) = one_backend_on_node_2(LabSpec::default(), "web", 31);
    let direct = SocketAddrV4::new(backend.ip, 8080);
    let results = proxy_lab::netns::in_netns(&lab.pod(1, 1).ns.clone(), move || {
        (41000..41005)
            .map(|port| {
                let via_service = request_from_port(port, vip(31, 80)).map_err(|e| format!("{e:#}"));
                let straight = request_from_port(port, direct).map_err(|e| format!("{e:#}"));
                let again = request_from_port(port, vip(31, 80)).map_err(|e| format!("{e:#}"));
                (port, via_service, straight, again)
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    for (port, via_service, straight, again) in results {
        assert_eq!(via_service.as_deref(), Ok("pod-2-2"), "port {port} through the Service");
        assert_eq!(straight.as_deref(), Ok("pod-2-2"), "port {port} straight to the pod after the Service");
        assert_eq!(again.as_deref(), Ok("pod-2-2"), "port {port} through the Service again");
    }
}

/// kubernetes/kubernetes#74839: a segment the node's conntrack finds out of window (in the wild a late
/// retransmission; here injected by the backend pod) must not reset a Service connection. Unhandled,
/// conntrack marks it INVALID, so it skips reverse NAT and reaches the client from the backend's own
/// address; the client answers that unknown peer with a RST, which kills the backend's side. The client's
/// next request on the connection then fails with "connection reset by peer". The netfilter modes drop
/// INVALID forwarded packets; the eBPF mode's own conntrack does not judge windows.
#[test]
fn an_out_of_window_segment_from_the_backend_does_not_reset_the_connection() {
    survives_an_out_of_window_segment(LabSpec::default());
}

/// The same with `--conntrack-tcp-be-liberal` (kube-proxy's `conntrack.tcpBeLiberal`): the agent sets the
/// kernel's `nf_conntrack_tcp_be_liberal`, conntrack keeps tracking the segment (so it is translated), and
/// the netfilter modes leave their INVALID drop rule out.
#[test]
fn with_conntrack_tcp_be_liberal_an_out_of_window_segment_does_not_reset_the_connection() {
    let mut spec = LabSpec::default();
    spec.agent_args.push("--conntrack-tcp-be-liberal".to_owned());
    let lab = survives_an_out_of_window_segment(spec);
    let set = proxy_lab::cmd::run(
        "ip",
        &["netns", "exec", lab.node_ns(1).as_str(), "cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"],
    )
    .unwrap();
    assert_eq!(set.trim(), "1", "the agent set the node's sysctl");
}

/// Opens a ClusterIP connection (pod 1-1 to a backend on node 2), injects an out-of-window segment from the
/// backend into it, and checks the connection still answers. Returns the lab for further checks.
fn survives_an_out_of_window_segment(spec: LabSpec) -> Lab {
    use proxy_lab::{
        echo::TcpSession,
        rawtcp::{Capture, inject},
    };

    let (lab, backend) = one_backend_on_node_2(spec, "boom", 74);

    let capture = Capture::start(&backend.ns).unwrap();
    let session = TcpSession::open(&lab.pod(1, 1).ns.clone(), vip(74, 80), TIMEOUT).unwrap();
    let first = session.ask().unwrap();
    let (client, server) = (first.seen_source, SocketAddrV4::new(backend.ip, 8080));
    let segments = capture.segments(Duration::from_millis(300));
    let last = |from, to| segments.iter().rev().find(|s| s.from == from && s.to == to).copied();
    let (sent, received) = (last(server, client).expect("the reply seen"), last(client, server).expect("the request"));
    // A sequence number 1 GiB past what the backend has sent is beyond any window conntrack allows; the
    // acknowledgment is the real one, so a RST answering it is one the backend accepts.
    let seq = sent.end().wrapping_add(1 << 30);
    inject(&backend.ns, server, client, seq, received.end(), b"boom\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        capture.segments(Duration::from_millis(100)).iter().any(|s| s.from == server && s.to == client && s.seq == seq),
        "the injected segment left the backend pod"
    );

    let after = session.ask().expect("the connection survives an out-of-window segment");
    assert_eq!(after.backend, first.backend);
    lab
}

/// A lab whose agents serve one ClusterIP Service `name` at `vip(last, 80)`, backed by pod 2-2 on port 8080.
fn one_backend_on_node_2(spec: LabSpec, name: &str, last: u8) -> (Lab, proxy_lab::lab::PodRef) {
    let mut lab = Lab::start(spec).expect("lab");
    let backend = lab.pod(2, 2).clone();
    lab.serve(&backend, &[8080], &[]).unwrap();
    let eps = ready(&lab, &[(2, 2)]);
    let svc = service_with_endpoints("default", name, *vip(last, 80).ip(), &http(8080), &eps);
    lab.write_manifest(&format!("{name}.yaml"), &svc).unwrap();
    lab.start_agents().unwrap();
    (lab, backend)
}
