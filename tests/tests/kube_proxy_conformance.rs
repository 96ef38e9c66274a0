//! kube-proxy's own proxier tests, replayed with real packets: the packet-flow scenarios of
//! `pkg/proxy/nftables/proxier_test.go` in kubernetes/kubernetes (its iptables twin has the same ones, less
//! the ClusterIP checks; where the two modes differ, the nftables mode is followed). Each scenario names
//! the upstream test and case; the addresses are mapped onto the lab's:
//!
//! | upstream | lab |
//! |---|---|
//! | node `test-node`, 192.168.0.2 | node1, 10.240.0.11 (the other nodes are node2) |
//! | pod client 10.0.0.2 | pod-1-1 (10.200.1.11), on node1 |
//! | node client 192.168.0.2 | a process on node1 |
//! | external client 203.0.113.2 / blocked 203.0.113.130 | 10.240.0.100 / 10.240.0.101 |
//! | service CIDR 172.30.0.0/16, ClusterIPs 172.30.0.x | 10.32.0.0/16, 10.32.0.x |
//! | external IP 192.168.99.11, LB IPs 1.2.3.4, 5.6.7.8, 9.10.11.12 | 10.250.0.11, 10.250.0.1–3 (routed via node1) |
//! | NodePorts 3001–3003 | 30001–30003 |
//! | endpoints 10.180.0.x / 10.0.1.x | pods of node1 (local) and node2, named per scenario |
//!
//! What each case expects, as upstream's tracer does: the set of endpoints new connections may reach (all
//! of them are seen over enough connections, no other), masquerade or not (the source the backend sees:
//! node1's address, or the client's own), REJECT (the client is refused at once), DROP (no answer, and
//! nothing leaves a node by its default route: the lab fails any test where something does), or no rule
//! at all.
//!
//! Expressed: 152 of the 207 cases upstream runs. Not expressed, and why: the SCTP case of
//! `TestClusterIPGeneral` (no SCTP sockets on this kernel), and the two variants of
//! `TestInternalExternalMasquerade` without a local-traffic detector (54 cases: the agent always knows its
//! pod interfaces, so pod traffic is always detected; it has no "no detector" mode). The iptables file's
//! localhost-NodePort cases neither: those are not served, as in kube-proxy's nftables mode. Beyond the
//! packet flows: the health check of `TestHealthCheckNodePortWhenTerminating`, the "renumber port"
//! conntrack cleanup of
//! `TestUpdateEndpointsMap`, established TCP kept when its endpoint leaves, and `TestBadIPs`.
//!
//! Both families: every Service is dual-stack where the lab is ([`manifest`]: each address, range and
//! endpoint has an IPv6 [`twin`]), and every case runs over IPv6 too, beside its IPv4 turn, to its
//! target's twin from its client's IPv6 address: upstream's IPv4 cases, asked of the IPv6 half of the same
//! Services (140 of them; `TestNodePorts`' IPv4 sub-tests and `TestBadIPs` are IPv4's alone, and
//! `TestNodePorts`' own 8 IPv6 cases run on an IPv6-only Service). Over IPv6 a masqueraded flow may show
//! any of node1's IPv6 addresses.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Outcome, Proto, attempt, attempt_from},
    echo6::{self, Outcome6},
    lab::{EXTERNAL_IP, EXTERNAL_IP6, Family, node_ip, node_ip6, node_name},
    manifests::{Endpoint, Port, Svc},
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a case waits before calling a flow dropped.
const DROP_WAIT: Duration = Duration::from_millis(1200);
/// The external client outside the source ranges (upstream's 203.0.113.130).
const BLOCKED_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 101);
/// [`BLOCKED_IP`]'s IPv6 twin, outside the IPv6 source ranges.
const BLOCKED_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0x65);
const SERVICE_CIDR: &str = "10.32.0.0/16";
/// The service CIDR's IPv6 twin: it holds every [`twin`] of an address of [`SERVICE_CIDR`].
const SERVICE_CIDR6: &str = "fd00:32::/64";

fn cip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 32, 0, last)
}

fn lb(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, last)
}

const EXTERNAL_SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

fn port(name: &'static str, port: u16, protocol: &'static str, target_port: u16) -> Port {
    Port { name, port, protocol, target_port }
}

/// Who sends.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// pod-1-1, on node1.
    Pod,
    /// A process of node1 itself.
    Node,
    /// The external client, inside every source range.
    External,
    /// The external client's second address, outside the source ranges.
    Blocked,
}

/// What the client must get.
#[derive(Clone, Debug)]
enum Want {
    /// New connections reach exactly these pods (over enough of them), masqueraded or not.
    Reach(&'static [&'static str], Masq),
    Reject,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Masq {
    Yes,
    No,
}
use Client::{Blocked, External, Node, Pod};
use Masq::{No, Yes};

struct Case {
    name: &'static str,
    from: Client,
    proto: Proto,
    to: SocketAddrV4,
    want: Want,
}

fn tcp(name: &'static str, from: Client, to: SocketAddrV4, want: Want) -> Case {
    Case { name, from, proto: Proto::Tcp, to, want }
}

fn udp(name: &'static str, from: Client, to: SocketAddrV4, want: Want) -> Case {
    Case { name, from, proto: Proto::Udp, to, want }
}

/// A lab of two nodes with `pods` pods each, every pod but pod-N-1 serving TCP 80, 8443, 5353 and UDP 53
/// (so a wrongly chosen endpoint answers and shows), the external client's second address, and agents
/// told the service CIDR.
fn lab(pods: usize, extra_args: &[&str]) -> Lab {
    let cidrs = format!("{SERVICE_CIDR},{SERVICE_CIDR6}");
    lab_with(pods, &[&["--service-cluster-ip-range", cidrs.as_str()], extra_args].concat())
}

/// [`lab`] with exactly these agent flags.
fn lab_with(pods: usize, extra_args: &[&str]) -> Lab {
    let mut spec = LabSpec { pods_per_node: pods, ..LabSpec::default() };
    spec.agent_args.extend(extra_args.iter().map(|a| (*a).to_owned()));
    let mut lab = Lab::start(spec).expect("lab");
    for n in 1..=2 {
        for k in 2..=pods {
            let pod = lab.pod(n, k).clone();
            lab.serve(&pod, &[80, 8443, 5353], &[53]).unwrap();
            if lab.dual_stack() {
                lab.serve6(&pod, &[80, 8443, 5353, 53]).unwrap();
            }
        }
    }
    lab.add_external_address(BLOCKED_IP).unwrap();
    for addr in [lb(1), lb(2), lb(3), EXTERNAL_SVC_IP] {
        lab.route_external_via(addr, 1).unwrap();
    }
    lab.route_external_net_via(SERVICE_CIDR, 1).unwrap();
    if lab.dual_stack() {
        lab.add_external_address6(BLOCKED_IP6).unwrap();
        for addr in [lb(1), lb(2), lb(3), EXTERNAL_SVC_IP] {
            lab.route_external6_via(twin(&lab, addr), 1).unwrap();
        }
        lab.route_external_net_via(SERVICE_CIDR6, 1).unwrap();
    }
    lab
}

/// The IPv6 twin of a lab IPv4 address, for each case's IPv6 turn: a node's, a pod's and the external
/// client's addresses map to their IPv6 ones; a Service, external or load-balancer address `10.B.C.D` to
/// `fd00:B::C:D`, its decimal digits read as hex (`10.32.0.41` is `fd00:32::41`).
fn twin(lab: &Lab, addr: Ipv4Addr) -> Ipv6Addr {
    if let Some(n) = (1..=2).find(|n| node_ip(*n) == addr) {
        return node_ip6(n);
    }
    if let Some(pod) = lab.pods().iter().find(|p| p.ip == addr) {
        return pod.ip6.expect("a dual-stack pod");
    }
    match addr {
        EXTERNAL_IP => EXTERNAL_IP6,
        BLOCKED_IP => BLOCKED_IP6,
        _ => {
            let [a, b, c, d] = addr.octets();
            assert!(a == 10 && b != 240 && b != 200, "{addr} has no IPv6 twin");
            let hex = |v: u8| u16::from_str_radix(&v.to_string(), 16).expect("decimal digits read as hex");
            Ipv6Addr::new(0xfd00, hex(b), 0, 0, 0, 0, hex(c), hex(d))
        }
    }
}

/// The IPv6 twin of a source range: the same clients inside and outside it (the nodes in the /28, the
/// external client alone in the /32; the blocked client in neither).
fn twin_range(range: &str) -> &'static str {
    match range {
        "10.240.0.0/28" => "fd00:240::10/124",
        // Upstream's whitespace, kept.
        "\" 10.240.0.100/32\"" => "\" fd00:240::64/128\"",
        other => panic!("source range {other} has no IPv6 twin here"),
    }
}

/// `svc` made dual-stack where the lab is: each address gets its [`twin`] (cluster IP, external IPs,
/// load-balancer IPs) and each source range its [`twin_range`], as a `RequireDualStack` Service has one
/// of each per family.
fn dual_svc(lab: &Lab, svc: &Svc) -> Svc {
    let mut svc = svc.clone();
    if lab.dual_stack() {
        svc.cluster_ip6 = Some(twin(lab, svc.cluster_ip));
        svc.external_ips6 = svc.external_ips.iter().map(|a| twin(lab, *a)).collect();
        assert!(svc.lb_ingress.iter().all(|(_, mode)| *mode == "VIP"), "IPv6 ingress IPs are VIP here");
        svc.lb_ingress6 = svc.lb_ingress.iter().map(|(a, _)| twin(lab, *a)).collect();
        let ranges6: Vec<&'static str> = svc.source_ranges.iter().map(|r| twin_range(r)).collect();
        svc.source_ranges.extend(ranges6);
    }
    svc
}

/// [`dual_svc`] with its endpoints: the IPv4 ones, and where the lab is dual-stack their IPv6 twins
/// (the same pods and conditions) in an IPv6 slice.
fn manifest(lab: &Lab, svc: &Svc, endpoints: &[Endpoint]) -> String {
    let svc = dual_svc(lab, svc);
    if !lab.dual_stack() {
        return svc.with_endpoints(endpoints);
    }
    let v6: Vec<Endpoint> = endpoints
        .iter()
        .map(|e| {
            let IpAddr::V4(addr) = e.addr else { panic!("an IPv4 endpoint") };
            Endpoint { addr: twin(lab, addr).into(), ..e.clone() }
        })
        .collect();
    svc.with_endpoints_of_both_families(endpoints, &v6)
}

/// Endpoint `pod-N-K` with the given conditions (ready, serving, terminating).
fn ep(lab: &Lab, (n, k): (usize, usize), (ready, serving, terminating): (bool, bool, bool)) -> Endpoint {
    Endpoint { ready, serving, terminating, ..Endpoint::ready(lab.pod(n, k).ip, node_name(n)) }
}

const READY: (bool, bool, bool) = (true, true, false);

fn ready(lab: &Lab, pods: &[(usize, usize)]) -> Vec<Endpoint> {
    pods.iter().map(|p| ep(lab, *p, READY)).collect()
}

/// What a client got, in either family.
#[derive(Debug)]
enum Got {
    Answered {
        backend: String,
        source: IpAddr,
    },
    Refused,
    TimedOut,
    /// Anything else, said in the failure message.
    #[expect(dead_code, reason = "read through Debug, in the failure message")]
    Failed(String),
}

impl From<Outcome> for Got {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Answered(r) => Self::Answered { backend: r.backend, source: IpAddr::V4(*r.seen_source.ip()) },
            Outcome::Refused => Self::Refused,
            Outcome::TimedOut => Self::TimedOut,
            Outcome::Failed(e) => Self::Failed(e),
        }
    }
}

impl From<Outcome6> for Got {
    fn from(outcome: Outcome6) -> Self {
        match outcome {
            Outcome6::Answered(r) => Self::Answered { backend: r.backend, source: IpAddr::V6(*r.seen_source.ip()) },
            Outcome6::Refused => Self::Refused,
            Outcome6::TimedOut => Self::TimedOut,
            Outcome6::Failed(e) => Self::Failed(e),
        }
    }
}

/// One connection attempt of `case` in `family`: over IPv6 from the client's IPv6 address to the
/// target's [`twin`].
fn try_once(lab: &Lab, case: &Case, family: Family, timeout: Duration) -> Got {
    let client = std::path::Path::new(env!("CARGO_BIN_EXE_lab-client"));
    if family == Family::V6 {
        let to = SocketAddrV6::new(twin(lab, *case.to.ip()), case.to.port(), 0, 0);
        return match case.from {
            Pod => echo6::attempt(&lab.pod(1, 1).ns, case.proto, None, to, timeout).into(),
            External => echo6::attempt(&lab.external_ns(), case.proto, None, to, timeout).into(),
            Blocked => echo6::attempt(&lab.external_ns(), case.proto, Some(BLOCKED_IP6), to, timeout).into(),
            Node => lab
                .request6_from_node(1, client, case.proto, to)
                .map_or_else(|e| Got::Failed(format!("{e:#}")), Got::from),
        };
    }
    let result = match case.from {
        Pod => attempt(&lab.pod(1, 1).ns, case.proto, case.to, timeout),
        External => attempt(&lab.external_ns(), case.proto, case.to, timeout),
        Blocked => attempt_from(&lab.external_ns(), BLOCKED_IP, case.proto, case.to, timeout),
        Node => lab.request_from_node(1, client, case.proto, case.to),
    };
    result.map_or_else(|e| Got::Failed(format!("{e:#}")), Got::from)
}

fn client_addr(lab: &Lab, from: Client) -> Ipv4Addr {
    match from {
        Pod => lab.pod(1, 1).ip,
        Node => node_ip(1),
        External => EXTERNAL_IP,
        Blocked => BLOCKED_IP,
    }
}

/// What a backend should see as the source: node1's address when masqueraded (or when node1 itself
/// sent), the one MASQUERADE takes towards `backend` (the outgoing interface's), else the client's own.
fn expected_source(lab: &Lab, case: &Case, masq: Masq, family: Family, backend: &str) -> Vec<IpAddr> {
    let masqueraded = masq == Yes || matches!(case.from, Node);
    match (family, masqueraded) {
        (Family::V4, true) => vec![lab.source_from_node_to(1, backend).into()],
        (Family::V4, false) => vec![client_addr(lab, case.from).into()],
        (Family::V6, true) => vec![lab.source6_from_node_to(1, backend).into()],
        (Family::V6, false) => vec![twin(lab, client_addr(lab, case.from)).into()],
    }
}

/// Runs one case in `family`; `Err` says what the client got instead.
fn check(lab: &Lab, case: &Case, family: Family) -> Result<(), String> {
    match &case.want {
        Want::Reach(pods, masq) => {
            // Enough connections that every allowed endpoint is seen: ten per endpoint misses one of three
            // with probability 3 * (2/3)^30 < 2e-5.
            let mut seen = BTreeSet::new();
            for i in 0..10 * pods.len() {
                match try_once(lab, case, family, TIMEOUT) {
                    Got::Answered { backend, source } => {
                        let expected = expected_source(lab, case, *masq, family, &backend);
                        if !expected.contains(&source) {
                            return Err(format!("connection {i}: {backend} saw source {source}, want {expected:?}"));
                        }
                        seen.insert(backend);
                    }
                    other => return Err(format!("connection {i}: {other:?}")),
                }
            }
            let want: BTreeSet<String> = pods.iter().map(|p| (*p).to_owned()).collect();
            if seen == want { Ok(()) } else { Err(format!("reached {seen:?}, want {want:?}")) }
        }
        Want::Reject => match try_once(lab, case, family, TIMEOUT) {
            Got::Refused => Ok(()),
            other => Err(format!("want a refusal, got {other:?}")),
        },
        Want::Drop => match try_once(lab, case, family, DROP_WAIT) {
            Got::TimedOut => Ok(()),
            other => Err(format!("want a drop, got {other:?}")),
        },
    }
}

/// Runs every case in every family the lab has (the Services are dual-stack: [`manifest`]), the
/// families side by side, and fails once, listing every case that failed (family, upstream test and case).
fn run(lab: &Lab, upstream: &str, cases: &[Case]) {
    run_in(lab, upstream, cases, &Family::of(lab));
}

/// [`run`] in the given families only.
fn run_in(lab: &Lab, upstream: &str, cases: &[Case], families: &[Family]) {
    let mut failures: Vec<String> = std::thread::scope(|scope| {
        let turns: Vec<_> = families
            .iter()
            .map(|&family| {
                scope.spawn(move || {
                    cases
                        .iter()
                        .filter_map(|c| {
                            check(lab, c, family).err().map(|e| {
                                format!("{} {upstream} / {:?} {} -> {}: {e}", family.name(), c.from, c.name, c.to)
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        turns.into_iter().flat_map(|t| t.join().expect("a family's turn panicked")).collect()
    });
    let leaks = lab.unexpected_leaks().expect("reading the lab's leak record");
    if !leaks.is_empty() {
        failures.push(format!("{upstream}: packets left a node by its default route: {leaks:?}"));
    }
    let total = cases.len() * families.len();
    let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
    eprintln!("{upstream}: {} cases, over {}", cases.len(), names.join(" and "));
    assert!(failures.is_empty(), "{} failures in {total} cases:\n{}", failures.len(), failures.join("\n"));
}

/// `TestNoEndpointsReject`: a Service without endpoints refuses at every address.
#[test]
fn no_endpoints_reject() {
    let mut lab = lab(2, &[]);
    let mut svc = Svc::new("svc1", cip(41), vec![port("p80", 80, "TCP", 80)]);
    svc.type_ = "LoadBalancer";
    svc.node_ports = vec![30001];
    svc.external_ips = vec![EXTERNAL_SVC_IP];
    svc.lb_ingress = vec![(lb(1), "VIP")];
    lab.write_manifest("svc1.yaml", &manifest(&lab, &svc, &[])).unwrap();
    lab.start_agents().unwrap();
    let np = at(node_ip(1), 30001);
    run(
        &lab,
        "TestNoEndpointsReject",
        &[
            tcp("pod to cluster IP with no endpoints", Pod, at(cip(41), 80), Want::Reject),
            tcp("external to external IP with no endpoints", External, at(EXTERNAL_SVC_IP, 80), Want::Reject),
            tcp("pod to NodePort with no endpoints", Pod, np, Want::Reject),
            tcp("external to NodePort with no endpoints", External, np, Want::Reject),
            tcp("pod to LoadBalancer IP with no endpoints", Pod, at(lb(1), 80), Want::Reject),
            tcp("external to LoadBalancer IP with no endpoints", External, at(lb(1), 80), Want::Reject),
        ],
    );
}

/// `TestClusterIPGeneral`: endpoints, target ports, one port number over TCP and UDP, a ClusterIP's
/// undefined ports and protocols (REJECT), an unallocated address of the service CIDR (DROP).
#[test]
fn cluster_ip_general() {
    let mut lab = lab(3, &[]);
    // Upstream's endpoints: 10.180.0.1 on test-node (pod-1-2), 10.180.2.1 elsewhere (pod-2-2).
    let svc1 = Svc::new("svc1", cip(41), vec![port("http", 80, "TCP", 80)]);
    let svc2 = Svc::new(
        "svc2",
        cip(42),
        vec![
            port("http", 80, "TCP", 80),
            port("https", 443, "TCP", 8443),
            port("dns-udp", 53, "UDP", 53),
            port("dns-tcp", 53, "TCP", 5353),
        ],
    );
    lab.write_manifest("svc1.yaml", &manifest(&lab, &svc1, &ready(&lab, &[(1, 2)]))).unwrap();
    lab.write_manifest("svc2.yaml", &manifest(&lab, &svc2, &ready(&lab, &[(1, 2), (2, 2)]))).unwrap();
    lab.start_agents().unwrap();
    let both: &[&str] = &["pod-1-2", "pod-2-2"];
    run(
        &lab,
        "TestClusterIPGeneral",
        &[
            tcp("simple clusterIP", Pod, at(cip(41), 80), Want::Reach(&["pod-1-2"], No)),
            tcp("clusterIP with multiple endpoints", Pod, at(cip(42), 80), Want::Reach(both, No)),
            tcp("clusterIP with TargetPort", Pod, at(cip(42), 443), Want::Reach(both, No)),
            tcp("clusterIP with TCP and UDP on same port (TCP)", Pod, at(cip(42), 53), Want::Reach(both, No)),
            udp("clusterIP with TCP and UDP on same port (UDP)", Pod, at(cip(42), 53), Want::Reach(both, No)),
            udp("TCP-only port does not match UDP traffic", Pod, at(cip(42), 80), Want::Reject),
            tcp("svc1 does not accept svc2's ports", Pod, at(cip(41), 443), Want::Reject),
            tcp("packet to unallocated cluster ip", Pod, at(cip(50), 80), Want::Drop),
            // The same from outside the node and from the node itself (upstream's tracer follows only
            // prerouting; kube-proxy's output hook has the same check).
            tcp("svc1 does not accept svc2's ports, from outside", External, at(cip(41), 443), Want::Reject),
            tcp("packet to unallocated cluster ip, from outside", External, at(cip(50), 80), Want::Drop),
            tcp("svc1 does not accept svc2's ports, from the node", Node, at(cip(41), 443), Want::Reject),
            tcp("packet to unallocated cluster ip, from the node", Node, at(cip(50), 80), Want::Drop),
        ],
    );
}

/// `TestClusterIPGeneral`'s hairpin case: an endpoint reaching itself through its Service is masqueraded.
#[test]
fn cluster_ip_hairpin() {
    let mut lab = lab(2, &[]);
    let svc1 = Svc::new("svc1", cip(41), vec![port("http", 80, "TCP", 80)]);
    lab.write_manifest("svc1.yaml", &svc1.with_endpoints(&ready(&lab, &[(1, 2)]))).unwrap();
    lab.start_agents().unwrap();
    let r = proxy_lab::echo::request(&lab.pod(1, 2).ns, Proto::Tcp, at(cip(41), 80), TIMEOUT).unwrap();
    let masqueraded = lab.source_from_node(1, 1);
    assert_eq!((r.backend.as_str(), *r.seen_source.ip()), ("pod-1-2", masqueraded), "TestClusterIPGeneral / hairpin");
}

/// `TestLoadBalancer`: source ranges hold at the load-balancer IPs (for pods too), not at the NodePort; a
/// range holding the node's address lets the load-balancer IPs themselves in as sources.
#[test]
fn load_balancer_source_ranges() {
    let mut lab = lab(2, &[]);
    let mut svc = Svc::new("svc1", cip(41), vec![port("p80", 80, "TCP", 80)]);
    svc.type_ = "LoadBalancer";
    svc.node_ports = vec![30001];
    svc.lb_ingress = vec![(lb(1), "VIP"), (lb(2), "VIP")];
    // The leading space is upstream's too: whitespace is ignored.
    svc.source_ranges = vec!["10.240.0.0/28", "\" 10.240.0.100/32\""];
    // Upstream's endpoint 10.180.0.1 has no node: remote here.
    lab.write_manifest("svc1.yaml", &manifest(&lab, &svc, &ready(&lab, &[(2, 2)]))).unwrap();
    lab.start_agents().unwrap();
    let one: &[&str] = &["pod-2-2"];
    let np = at(node_ip(1), 30001);
    run(
        &lab,
        "TestLoadBalancer",
        &[
            tcp("pod to cluster IP", Pod, at(cip(41), 80), Want::Reach(one, No)),
            tcp("external to nodePort", External, np, Want::Reach(one, Yes)),
            tcp("nodePort bypasses LoadBalancerSourceRanges", Blocked, np, Want::Reach(one, Yes)),
            tcp("accepted external to LB1", External, at(lb(1), 80), Want::Reach(one, Yes)),
            tcp("accepted external to LB2", External, at(lb(2), 80), Want::Reach(one, Yes)),
            tcp("blocked external to LB1", Blocked, at(lb(1), 80), Want::Drop),
            tcp("blocked external to LB2", Blocked, at(lb(2), 80), Want::Drop),
            tcp("pod to LB1 (blocked by LoadBalancerSourceRanges)", Pod, at(lb(1), 80), Want::Drop),
            tcp("pod to LB2 (blocked by LoadBalancerSourceRanges)", Pod, at(lb(2), 80), Want::Drop),
            tcp("node to LB1 (allowed by LoadBalancerSourceRanges)", Node, at(lb(1), 80), Want::Reach(one, Yes)),
            tcp("node to LB2 (allowed by LoadBalancerSourceRanges)", Node, at(lb(2), 80), Want::Reach(one, Yes)),
        ],
    );
    // "same node to LB1/LB2, SNATted to LB1/LB2 (implicitly allowed)": a SYN whose source is the VIP itself,
    // as a load balancer hairpinning the node's own request delivers it. Sent raw from outside (the lab's
    // client cannot hold the VIP and still route to it); its DNATed, masqueraded arrival at the backend is
    // the verdict. The backend's answer goes back to the VIP, by node1's default route: expected.
    for vip in [lb(1), lb(2)] {
        lab.expect_leaks_to(vip);
        let arrived = spoofed_syn_reaches(&lab, vip, at(vip, 80), "pod-2-2");
        assert!(arrived, "TestLoadBalancer / same node to {vip}, SNATted to {vip}: the SYN never reached pod-2-2");
    }
}

/// Sends one TCP SYN from `source` (an address the sender does not hold) to `target` from the external
/// client, and says whether pod `backend` received it on port 80 masqueraded by node1.
fn spoofed_syn_reaches(lab: &Lab, source: Ipv4Addr, target: SocketAddrV4, backend: &str) -> bool {
    use proxy_lab::{
        fuzz::wire::{Datagram, L4},
        rawtcp::Capture,
    };
    const SYN: u8 = 0x02;
    let (n, k) = parse_pod(backend);
    let pod = lab.pod(n, k).clone();
    let masqueraded = lab.source_from_node(1, n);
    let capture = Capture::start(&pod.ns).unwrap();
    let syn = Datagram {
        src: source,
        dst: *target.ip(),
        ttl: 64,
        id: 4242,
        tos: 0,
        dont_fragment: true,
        options: Vec::new(),
        l4: L4::Tcp { sport: 47_001, dport: target.port(), seq: 1, flags: SYN, payload: Vec::new() },
    };
    proxy_lab::rawtcp::send_ipv4(&lab.external_ns(), vec![syn.ip_bytes()], Duration::from_millis(10)).unwrap();
    capture
        .packets(Duration::from_millis(500))
        .iter()
        .any(|p| p.len() >= 40 && p[9] == 6 && p[12..16] == masqueraded.octets() && p[16..20] == pod.ip.octets())
}

fn parse_pod(name: &str) -> (usize, usize) {
    let mut parts = name.trim_start_matches("pod-").split('-').map(|p| p.parse::<usize>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// `TestNodePorts` (IPv4 sub-tests): NodePorts are served on the addresses `--nodeport-addresses` selects
/// (upstream's default there is the node's primary address), not on a secondary one left out.
#[test]
fn node_ports_on_selected_addresses() {
    let secondary = Ipv4Addr::new(10, 240, 0, 21);
    for (subtest, addresses, secondary_served) in
        [("ipv4", "10.240.0.11/32", false), ("ipv4, multiple nodeport-addresses", "10.240.0.0/24", true)]
    {
        let mut lab = lab(2, &["--nodeport-addresses", addresses]);
        lab.add_node_address(1, secondary).unwrap();
        let mut svc = Svc::new("svc1", cip(41), vec![port("p80", 80, "TCP", 80)]);
        svc.type_ = "NodePort";
        svc.node_ports = vec![30001];
        // Upstream: 10.180.0.1 without a node (remote), 10.180.2.1 on test-node.
        lab.write_manifest("svc1.yaml", &svc.with_endpoints(&ready(&lab, &[(2, 2), (1, 2)]))).unwrap();
        lab.start_agents().unwrap();
        let both: &[&str] = &["pod-1-2", "pod-2-2"];
        let secondary_case = if secondary_served {
            tcp("external to nodePort on secondary IP", External, at(secondary, 30001), Want::Reach(both, Yes))
        } else {
            // No rule: the node's own stack answers, and nothing listens there.
            tcp("secondary nodeIP ignores NodePorts", External, at(secondary, 30001), Want::Reject)
        };
        // IPv4 only: an IPv4 `--nodeport-addresses` leaves IPv6 NodePorts on every address (upstream's
        // IPv6 sub-tests are `node_ports_on_selected_addresses_ipv6`).
        run_in(
            &lab,
            &format!("TestNodePorts/{subtest}"),
            &[
                tcp("pod to cluster IP", Pod, at(cip(41), 80), Want::Reach(both, No)),
                tcp("external to nodePort", External, at(node_ip(1), 30001), Want::Reach(both, Yes)),
                tcp("node to nodePort", Node, at(node_ip(1), 30001), Want::Reach(both, Yes)),
                secondary_case,
            ],
            &[Family::V4],
        );
    }
}

/// `TestNodePorts` (IPv6 sub-tests), on an IPv6-only Service: upstream's `2001:db8::1/128` and
/// `2001:db8::/64` are the lab's node address `fd00:240::11/128` and its `/64`, the secondary address
/// `fd00:240::21`. Each case reaches both endpoints over enough connections (the chance of missing one in 16
/// is 2^-15 per case), masqueraded or not as upstream says (the node's own case, from a node process, checks
/// the endpoints only), in every mode.
#[test]
fn node_ports_on_selected_addresses_ipv6() {
    use proxy_lab::echo6::{self, Echo6};
    let primary = node_ip6(1);
    let secondary = Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0x21);
    for (subtest, addresses, secondary_served) in
        [("ipv6", "fd00:240::11/128", false), ("ipv6, multiple nodeport-addresses", "fd00:240::/64", true)]
    {
        let mut spec = LabSpec::default();
        spec.agent_args.extend(["--nodeport-addresses".to_owned(), addresses.to_owned()]);
        let mut lab = Lab::start(spec).expect("lab");
        assert!(lab.dual_stack(), "this topology has no IPv6 (PROXY_LAB_POD_NETWORK=vxlan)");
        lab.add_node_address6(1, secondary).unwrap();
        let backends = [lab.pod(2, 2).clone(), lab.pod(1, 2).clone()];
        let echoes: Vec<Echo6> = backends.iter().map(|p| Echo6::start(&p.ns, &p.name, 80).unwrap()).collect();
        let mut svc = Svc::new("svc1", cip(41), vec![port("p80", 80, "TCP", 80)]);
        svc.type_ = "NodePort";
        svc.node_ports = vec![30001];
        let v6: Vec<Endpoint> = backends.iter().map(|p| Endpoint::ready(p.ip6.unwrap(), node_name(p.node))).collect();
        let cluster_ip: Ipv6Addr = "fd00:32::41".parse().unwrap();
        let yaml = svc.with_endpoints(&v6).replace(
            &format!("  clusterIP: {}\n", cip(41)),
            &format!("  clusterIP: '{cluster_ip}'\n  clusterIPs: ['{cluster_ip}']\n  ipFamilies: [IPv6]\n"),
        );
        lab.write_manifest("svc1.yaml", &yaml).unwrap();
        lab.start_agents().unwrap();
        let names: BTreeSet<&str> = backends.iter().map(|p| p.name.as_str()).collect();
        let client = lab.pod(1, 1).clone();
        let case = |what: &str, ns: &str, target: SocketAddrV6, masqueraded: bool| {
            let mut reached = BTreeSet::new();
            for _ in 0..16 {
                let reply = echo6::tcp(ns, target, TIMEOUT)
                    .unwrap_or_else(|e| panic!("TestNodePorts/{subtest}: {what}: {e:#}"));
                let source = IpAddr::V6(*reply.seen_source.ip());
                let own = [client.ip6.map(IpAddr::V6), Some(IpAddr::V6(EXTERNAL_IP6))];
                assert_eq!(!own.contains(&Some(source)), masqueraded, "TestNodePorts/{subtest}: {what}: {reply:?}");
                reached.insert(reply.backend);
            }
            let reached: BTreeSet<&str> = reached.iter().map(String::as_str).collect();
            assert_eq!(reached, names, "TestNodePorts/{subtest}: {what}: both endpoints");
        };
        let at6 = |addr, port| SocketAddrV6::new(addr, port, 0, 0);
        case("pod to cluster IP", &client.ns, at6(cluster_ip, 80), false);
        case("external to nodePort", &lab.external_ns(), at6(primary, 30001), true);
        // A process of the node itself (its namespace and cgroup, where the eBPF mode's socket programs are).
        let lab_client = std::path::Path::new(env!("CARGO_BIN_EXE_lab-client"));
        let mut reached = BTreeSet::new();
        for _ in 0..16 {
            let out = lab.run_on_node(1, lab_client, &["tcp", &at6(primary, 30001).to_string(), "2000"]).unwrap();
            let reply =
                out.trim().strip_prefix("OK ").unwrap_or_else(|| panic!("TestNodePorts/{subtest}: node: {out}"));
            reached.insert(reply.split_whitespace().next().unwrap_or_default().to_owned());
        }
        let reached: BTreeSet<&str> = reached.iter().map(String::as_str).collect();
        assert_eq!(reached, names, "TestNodePorts/{subtest}: node to nodePort: both endpoints");
        if secondary_served {
            case("external to nodePort on secondary IP", &lab.external_ns(), at6(secondary, 30001), true);
        } else {
            let e = echo6::tcp(&lab.external_ns(), at6(secondary, 30001), TIMEOUT)
                .expect_err("secondary nodeIP ignores NodePorts");
            assert!(echo6::refused(&e), "TestNodePorts/{subtest}: no rule, the node's stack refuses: {e:#}");
        }
        drop(echoes);
    }
}

/// The Service of `TestExternalTrafficPolicyLocal` and `...Cluster`: LoadBalancer with an external IP,
/// endpoints pod-2-2 (upstream 10.180.0.1, no node) and pod-1-2 (10.180.2.1, test-node).
fn policy_lab(policy: &'static str) -> Lab {
    let mut lab = lab(2, &[]);
    let mut svc = Svc::new("svc1", cip(41), vec![port("p80", 80, "TCP", 80)]);
    svc.type_ = "LoadBalancer";
    svc.external_policy = policy;
    svc.node_ports = vec![30001];
    svc.external_ips = vec![EXTERNAL_SVC_IP];
    svc.lb_ingress = vec![(lb(1), "VIP")];
    if policy == "Local" {
        svc.health_check_node_port = Some(30000);
    }
    lab.write_manifest("svc1.yaml", &manifest(&lab, &svc, &ready(&lab, &[(2, 2), (1, 2)]))).unwrap();
    lab.start_agents().unwrap();
    lab
}

/// `TestExternalTrafficPolicyLocal`: external traffic reaches only the local endpoint and keeps its
/// source; pod traffic to the external addresses reaches both, unmasqueraded.
#[test]
fn external_traffic_policy_local() {
    let lab = policy_lab("Local");
    let both: &[&str] = &["pod-1-2", "pod-2-2"];
    let local: &[&str] = &["pod-1-2"];
    run(
        &lab,
        "TestExternalTrafficPolicyLocal",
        &[
            tcp("pod to cluster IP hits both endpoints, unmasqueraded", Pod, at(cip(41), 80), Want::Reach(both, No)),
            tcp(
                "pod to external IP hits both endpoints, unmasqueraded",
                Pod,
                at(EXTERNAL_SVC_IP, 80),
                Want::Reach(both, No),
            ),
            tcp(
                "external to external IP hits only local endpoint, unmasqueraded",
                External,
                at(EXTERNAL_SVC_IP, 80),
                Want::Reach(local, No),
            ),
            tcp("pod to LB IP hits only both endpoints, unmasqueraded", Pod, at(lb(1), 80), Want::Reach(both, No)),
            tcp(
                "external to LB IP hits only local endpoint, unmasqueraded",
                External,
                at(lb(1), 80),
                Want::Reach(local, No),
            ),
            tcp(
                "pod to NodePort hits both endpoints, unmasqueraded",
                Pod,
                at(node_ip(1), 30001),
                Want::Reach(both, No),
            ),
            tcp(
                "external to NodePort hits only local endpoint, unmasqueraded",
                External,
                at(node_ip(1), 30001),
                Want::Reach(local, No),
            ),
        ],
    );
}

/// `TestExternalTrafficPolicyCluster`: everything to the external addresses is masqueraded, from pods too.
#[test]
fn external_traffic_policy_cluster() {
    let lab = policy_lab("Cluster");
    let both: &[&str] = &["pod-1-2", "pod-2-2"];
    run(
        &lab,
        "TestExternalTrafficPolicyCluster",
        &[
            tcp("pod to cluster IP hits both endpoints, unmasqueraded", Pod, at(cip(41), 80), Want::Reach(both, No)),
            tcp(
                "pod to external IP hits both endpoints, masqueraded",
                Pod,
                at(EXTERNAL_SVC_IP, 80),
                Want::Reach(both, Yes),
            ),
            tcp(
                "external to external IP hits both endpoints, masqueraded",
                External,
                at(EXTERNAL_SVC_IP, 80),
                Want::Reach(both, Yes),
            ),
            tcp("pod to LB IP hits both endpoints, masqueraded", Pod, at(lb(1), 80), Want::Reach(both, Yes)),
            tcp("external to LB IP hits both endpoints, masqueraded", External, at(lb(1), 80), Want::Reach(both, Yes)),
            tcp("pod to NodePort hits both endpoints, masqueraded", Pod, at(node_ip(1), 30001), Want::Reach(both, Yes)),
            tcp(
                "external to NodePort hits both endpoints, masqueraded",
                External,
                at(node_ip(1), 30001),
                Want::Reach(both, Yes),
            ),
        ],
    );
}

/// `TestInternalTrafficPolicy`: Cluster reaches all endpoints; Local only this node's, dropping when it
/// has none; once the slice is deleted every variant refuses.
#[test]
fn internal_traffic_policy() {
    // (sub-test, policy, endpoints on node1, endpoints on node2, what the pod reaches)
    type Subtest = (&'static str, &'static str, &'static [usize], &'static [usize], Want);
    let subtests: [Subtest; 4] = [
        (
            "internalTrafficPolicy is cluster",
            "Cluster",
            &[2],
            &[2, 3],
            Want::Reach(&["pod-1-2", "pod-2-2", "pod-2-3"], No),
        ),
        (
            "internalTrafficPolicy is local and there is one local endpoint",
            "Local",
            &[2],
            &[2, 3],
            Want::Reach(&["pod-1-2"], No),
        ),
        (
            "internalTrafficPolicy is local and there are multiple local endpoints",
            "Local",
            &[2, 3],
            &[2],
            Want::Reach(&["pod-1-2", "pod-1-3"], No),
        ),
        ("internalTrafficPolicy is local and there are no local endpoints", "Local", &[], &[2, 3], Want::Drop),
    ];
    for (subtest, policy, on_node1, on_node2, want) in subtests {
        let mut lab = lab(3, &[]);
        let mut svc = Svc::new("svc1", Ipv4Addr::new(10, 32, 1, 1), vec![port("", 80, "TCP", 80)]);
        svc.internal_policy = policy;
        let pods: Vec<(usize, usize)> =
            on_node1.iter().map(|k| (1, *k)).chain(on_node2.iter().map(|k| (2, *k))).collect();
        lab.write_manifest("svc1.yaml", &manifest(&lab, &svc, &ready(&lab, &pods))).unwrap();
        lab.start_agents().unwrap();
        let to = at(Ipv4Addr::new(10, 32, 1, 1), 80);
        run(&lab, &format!("TestInternalTrafficPolicy/{subtest}"), &[tcp("pod to ClusterIP", Pod, to, want)]);
        let seen = lab.sync_counts();
        lab.write_manifest("svc1.yaml", &dual_svc(&lab, &svc).yaml()).unwrap();
        lab.wait_for_sync(&seen).unwrap();
        run(&lab, &format!("TestInternalTrafficPolicy/{subtest}"), &[tcp("endpoints deleted", Pod, to, Want::Reject)]);
    }
}

/// The endpoints of one `TestTerminatingEndpoints*` sub-test: (pod, ready, serving, terminating).
type Conditions = &'static [((usize, usize), (bool, bool, bool))];

/// What node1's healthCheckNodePort answers: status and `localEndpoints`.
fn health_check(lab: &Lab, port: u16) -> (u16, serde_json::Value) {
    let (status, body) = proxy_lab::echo::http_get(&lab.external_ns(), at(node_ip(1), port), TIMEOUT).unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json["localEndpoints"].clone())
}

/// One sub-test: its name, endpoints, what pod traffic to the ClusterIP and external traffic to the LB IP
/// get, and (Local policy) the health check's status and `localEndpoints`.
type Subtest = (&'static str, Conditions, Want, Want, Option<(u16, u64)>);

/// `TestTerminatingEndpointsTrafficPolicyLocal` and `...Cluster`: terminating endpoints take new
/// connections only when no ready one is left (per node for a Local policy, cluster-wide for Cluster).
/// With a Local policy the health check counts ready local endpoints only (`TestHealthCheckNodePortWhenTerminating`):
/// a node whose endpoints all terminate answers 503, so load balancers drain it.
fn terminating_endpoints(upstream: &str, policy: &'static str, subtests: &[Subtest]) {
    for (subtest, endpoints, to_cluster_ip, to_lb, health) in subtests {
        let mut lab = lab(5, &[]);
        let mut svc = Svc::new("svc1", Ipv4Addr::new(10, 32, 1, 1), vec![port("", 80, "TCP", 80)]);
        svc.type_ = "LoadBalancer";
        svc.external_policy = policy;
        svc.lb_ingress = vec![(lb(1), "VIP")];
        if policy == "Local" {
            svc.health_check_node_port = Some(30000);
        }
        let eps: Vec<Endpoint> = endpoints.iter().map(|(pod, cond)| ep(&lab, *pod, *cond)).collect();
        lab.write_manifest("svc1.yaml", &manifest(&lab, &svc, &eps)).unwrap();
        lab.start_agents().unwrap();
        let (vip, lb_ip) = (at(Ipv4Addr::new(10, 32, 1, 1), 80), at(lb(1), 80));
        let name = format!("{upstream}/{subtest}");
        run(
            &lab,
            &name,
            &[
                tcp("pod to clusterIP", Pod, vip, to_cluster_ip.clone()),
                tcp("external to LB", External, lb_ip, to_lb.clone()),
            ],
        );
        if let Some((status, local)) = health {
            let got = health_check(&lab, 30000);
            assert_eq!(got, (*status, serde_json::json!(local)), "{name}: health check (status, localEndpoints)");
        }
        let seen = lab.sync_counts();
        lab.write_manifest("svc1.yaml", &dual_svc(&lab, &svc).yaml()).unwrap();
        lab.wait_for_sync(&seen).unwrap();
        run(
            &lab,
            &name,
            &[
                tcp("pod to clusterIP after endpoints deleted", Pod, vip, Want::Reject),
                tcp("external to LB after endpoints deleted", External, lb_ip, Want::Reject),
            ],
        );
    }
}

// Upstream's 10.0.1.1–10.0.1.4 on test-node are pod-1-2..pod-1-5; 10.0.1.5 elsewhere is pod-2-2.
const R: (bool, bool, bool) = (true, true, false);
const ST: (bool, bool, bool) = (false, true, true);
const T: (bool, bool, bool) = (false, false, true);

#[test]
fn terminating_endpoints_traffic_policy_local() {
    terminating_endpoints(
        "TestTerminatingEndpointsTrafficPolicyLocal",
        "Local",
        &[
            (
                "ready endpoints exist",
                &[((1, 2), R), ((1, 3), R), ((1, 4), ST), ((1, 5), T), ((2, 2), R)],
                Want::Reach(&["pod-1-2", "pod-1-3", "pod-2-2"], No),
                Want::Reach(&["pod-1-2", "pod-1-3"], No),
                Some((200, 2)),
            ),
            (
                "only terminating endpoints exist",
                &[((1, 3), ST), ((1, 4), ST), ((1, 5), T), ((2, 2), R)],
                Want::Reach(&["pod-2-2"], No),
                Want::Reach(&["pod-1-3", "pod-1-4"], No),
                Some((503, 0)),
            ),
            (
                "terminating endpoints on remote node",
                &[((2, 2), ST)],
                Want::Reach(&["pod-2-2"], No),
                Want::Drop,
                Some((503, 0)),
            ),
            (
                "no usable endpoints on any node",
                &[((1, 5), T), ((2, 2), T)],
                Want::Reject,
                Want::Reject,
                Some((503, 0)),
            ),
        ],
    );
}

#[test]
fn terminating_endpoints_traffic_policy_cluster() {
    terminating_endpoints(
        "TestTerminatingEndpointsTrafficPolicyCluster",
        "Cluster",
        &[
            (
                "ready endpoints exist",
                &[((1, 2), R), ((1, 3), R), ((2, 3), ST), ((2, 4), T), ((2, 2), R)],
                Want::Reach(&["pod-1-2", "pod-1-3", "pod-2-2"], No),
                Want::Reach(&["pod-1-2", "pod-1-3", "pod-2-2"], Yes),
                None,
            ),
            (
                "only terminating endpoints exist",
                &[((1, 3), ST), ((1, 4), ST), ((2, 4), T), ((2, 2), ST)],
                Want::Reach(&["pod-1-3", "pod-1-4", "pod-2-2"], No),
                Want::Reach(&["pod-1-3", "pod-1-4", "pod-2-2"], Yes),
                None,
            ),
            (
                "terminating endpoints on remote node",
                &[((2, 2), ST)],
                Want::Reach(&["pod-2-2"], No),
                Want::Reach(&["pod-2-2"], Yes),
                None,
            ),
            ("no usable endpoints on any node", &[((1, 5), T), ((2, 2), T)], Want::Reject, Want::Reject, None),
        ],
    );
}

/// `TestInternalExternalMasquerade`: pods, the node and external clients × ClusterIP, NodePort and LB ×
/// a plain Service, one with eTP Local and one with iTP Local; with a local-traffic detector, with and
/// without masqueradeAll. Endpoints: svcN has pod-1-(N+1) on node1 and pod-2-(N+1) elsewhere.
fn masquerade_matrix(variant: &str, masquerade_all: bool) {
    let extra: &[&str] = if masquerade_all { &["--masquerade-all"] } else { &[] };
    let mut lab = lab(4, extra);
    for (n, (name, etp, itp)) in
        [("svc1", "Cluster", "Cluster"), ("svc2", "Local", "Cluster"), ("svc3", "Cluster", "Local")]
            .into_iter()
            .enumerate()
    {
        let i = u8::try_from(n).unwrap() + 1;
        let mut svc = Svc::new(name, cip(40 + i), vec![port("p80", 80, "TCP", 80)]);
        svc.type_ = "LoadBalancer";
        svc.node_ports = vec![30000 + u16::from(i)];
        svc.health_check_node_port = (etp == "Local").then_some(30100 + u16::from(i));
        svc.external_policy = etp;
        svc.internal_policy = itp;
        svc.lb_ingress = vec![(lb(i), "VIP")];
        let pods = [(1, n + 2), (2, n + 2)];
        lab.write_manifest(&format!("{name}.yaml"), &manifest(&lab, &svc, &ready(&lab, &pods))).unwrap();
    }
    lab.start_agents().unwrap();
    let s1: &[&str] = &["pod-1-2", "pod-2-2"];
    let s2: &[&str] = &["pod-1-3", "pod-2-3"];
    let s2_local: &[&str] = &["pod-1-3"];
    let s3: &[&str] = &["pod-1-4", "pod-2-4"];
    let s3_local: &[&str] = &["pod-1-4"];
    let pod_cip = if masquerade_all { Yes } else { No };
    let (np, lb_) = (|p: u16| at(node_ip(1), p), |i: u8| at(lb(i), 80));
    let cases = [
        tcp("pod to ClusterIP", Pod, at(cip(41), 80), Want::Reach(s1, pod_cip)),
        tcp("pod to NodePort", Pod, np(30001), Want::Reach(s1, Yes)),
        tcp("pod to LB", Pod, lb_(1), Want::Reach(s1, Yes)),
        tcp("node to ClusterIP", Node, at(cip(41), 80), Want::Reach(s1, Yes)),
        tcp("node to NodePort", Node, np(30001), Want::Reach(s1, Yes)),
        tcp("node to LB", Node, lb_(1), Want::Reach(s1, Yes)),
        tcp("external to ClusterIP", External, at(cip(41), 80), Want::Reach(s1, Yes)),
        tcp("external to NodePort", External, np(30001), Want::Reach(s1, Yes)),
        tcp("external to LB", External, lb_(1), Want::Reach(s1, Yes)),
        tcp("pod to ClusterIP with eTP:Local", Pod, at(cip(42), 80), Want::Reach(s2, pod_cip)),
        tcp("pod to NodePort with eTP:Local", Pod, np(30002), Want::Reach(s2, No)),
        tcp("pod to LB with eTP:Local", Pod, lb_(2), Want::Reach(s2, No)),
        tcp("node to ClusterIP with eTP:Local", Node, at(cip(42), 80), Want::Reach(s2, Yes)),
        // Upstream sends this one to svc1's NodePort (3001), and expects svc1's endpoints: kept as written.
        tcp("node to NodePort with eTP:Local", Node, np(30001), Want::Reach(s1, Yes)),
        tcp("node to LB with eTP:Local", Node, lb_(2), Want::Reach(s2, Yes)),
        tcp("external to ClusterIP with eTP:Local", External, at(cip(42), 80), Want::Reach(s2, Yes)),
        tcp("external to NodePort with eTP:Local", External, np(30002), Want::Reach(s2_local, No)),
        tcp("external to LB with eTP:Local", External, lb_(2), Want::Reach(s2_local, No)),
        tcp("pod to ClusterIP with iTP:Local", Pod, at(cip(43), 80), Want::Reach(s3_local, pod_cip)),
        tcp("pod to NodePort with iTP:Local", Pod, np(30003), Want::Reach(s3, Yes)),
        tcp("pod to LB with iTP:Local", Pod, lb_(3), Want::Reach(s3, Yes)),
        tcp("node to ClusterIP with iTP:Local", Node, at(cip(43), 80), Want::Reach(s3_local, Yes)),
        tcp("node to NodePort with iTP:Local", Node, np(30003), Want::Reach(s3, Yes)),
        tcp("node to LB with iTP:Local", Node, lb_(3), Want::Reach(s3, Yes)),
        tcp("external to ClusterIP with iTP:Local", External, at(cip(43), 80), Want::Reach(s3_local, Yes)),
        tcp("external to NodePort with iTP:Local", External, np(30003), Want::Reach(s3, Yes)),
        tcp("external to LB with iTP:Local", External, lb_(3), Want::Reach(s3, Yes)),
    ];
    run(&lab, &format!("TestInternalExternalMasquerade/{variant}"), &cases);
}

#[test]
fn internal_external_masquerade() {
    masquerade_matrix("base", false);
}

#[test]
fn internal_external_masquerade_with_masquerade_all() {
    masquerade_matrix("masqueradeAll", true);
}

/// `TestUpdateEndpointsMap`'s "renumber port" case (conntrack cleanup required): a live UDP flow to a
/// ClusterIP follows its endpoint when the endpoint's port is renumbered (53 → 5354), as kube-proxy's
/// deletion of the flow's conntrack entry makes it.
#[test]
fn a_udp_flow_follows_its_endpoints_renumbered_port() {
    let mut lab = lab(2, &[]);
    let pod = lab.pod(1, 2).clone();
    let renumbered = proxy_lab::lab::PodRef { name: "pod-1-2:5354".into(), ..pod.clone() };
    lab.serve(&renumbered, &[], &[5354]).unwrap();
    let dns = vec![port("dns", 53, "UDP", 53)];
    let svc = Svc::new("dns", cip(60), dns);
    lab.write_manifest("dns.yaml", &svc.with_endpoints(&ready(&lab, &[(1, 2)]))).unwrap();
    lab.start_agents().unwrap();
    let session = proxy_lab::echo::UdpSession::open(&lab.pod(1, 1).ns, at(cip(60), 53), TIMEOUT).unwrap();
    assert_eq!(session.ask().unwrap().backend, "pod-1-2", "the flow starts at port 53");

    let seen = lab.sync_counts();
    let renumbered_svc = Svc::new("dns", cip(60), vec![port("dns", 53, "UDP", 5354)]);
    lab.write_manifest("dns.yaml", &renumbered_svc.with_endpoints(&ready(&lab, &[(1, 2)]))).unwrap();
    lab.wait_for_sync(&seen).unwrap();
    let after = session.ask().expect("the flow must still be answered").backend;
    assert_eq!(after, "pod-1-2:5354", "the same flow must follow the endpoint to its new port");
}

/// kube-proxy keeps an established TCP connection's conntrack entry when its endpoint stops serving or
/// leaves the Service: the connection goes on until the application ends it (a terminating pod finishes
/// its work). New connections go to the endpoints left.
#[test]
fn an_established_tcp_connection_outlives_its_endpoint_leaving() {
    let mut lab = lab(2, &[]);
    let svc = Svc::new("svc1", cip(61), vec![port("http", 80, "TCP", 80)]);
    lab.write_manifest("svc1.yaml", &manifest(&lab, &svc, &ready(&lab, &[(1, 2)]))).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).ns.clone();
    let session = proxy_lab::echo::TcpSession::open(&client, at(cip(61), 80), TIMEOUT).unwrap();
    assert_eq!(session.ask().unwrap().backend, "pod-1-2");
    // The same connection over IPv6, to the Service's IPv6 twin.
    let target6 = SocketAddrV6::new(twin(&lab, cip(61)), 80, 0, 0);
    let session6 = lab.dual_stack().then(|| proxy_lab::echo::TcpSession::open6(&client, target6, TIMEOUT).unwrap());
    if let Some(session6) = &session6 {
        assert_eq!(session6.ask().unwrap().backend, "pod-1-2", "IPv6");
    }
    let stopped = ep(&lab, (1, 2), (false, false, true));
    for (step, endpoints) in
        [("stops serving", vec![stopped, ep(&lab, (2, 2), READY)]), ("is removed", ready(&lab, &[(2, 2)]))]
    {
        let seen = lab.sync_counts();
        lab.write_manifest("svc1.yaml", &manifest(&lab, &svc, &endpoints)).unwrap();
        lab.wait_for_sync(&seen).unwrap();
        let r = session.ask().unwrap_or_else(|e| panic!("after the endpoint {step}: the connection broke: {e:#}"));
        assert_eq!(r.backend, "pod-1-2", "after the endpoint {step}");
        let fresh = proxy_lab::echo::request(&client, Proto::Tcp, at(cip(61), 80), TIMEOUT).unwrap();
        assert_eq!(fresh.backend, "pod-2-2", "after the endpoint {step}: new connections");
        if let Some(session6) = &session6 {
            let r = session6.ask().unwrap_or_else(|e| panic!("IPv6, after the endpoint {step}: broke: {e:#}"));
            assert_eq!(r.backend, "pod-1-2", "IPv6, after the endpoint {step}");
            let fresh = echo6::tcp(&client, target6, TIMEOUT).unwrap();
            assert_eq!(fresh.backend, "pod-2-2", "IPv6, after the endpoint {step}: new connections");
        }
    }
}

/// `TestBadIPs`: addresses with leading zeros (written before the API server refused them) are read as
/// kube-proxy reads them (decimal), in the ClusterIP, external IPs, load-balancer ingress, source ranges
/// and EndpointSlice addresses.
#[test]
fn addresses_with_leading_zeros_are_served() {
    let mut lab = lab(2, &[]);
    let mut svc = Svc::new("svc1", cip(41), vec![port("p80", 80, "TCP", 80)]);
    svc.type_ = "LoadBalancer";
    svc.node_ports = vec![30001];
    svc.external_ips = vec![EXTERNAL_SVC_IP];
    svc.lb_ingress = vec![(lb(1), "VIP")];
    svc.source_ranges = vec!["10.240.000.000/024"];
    let yaml = svc
        .with_endpoints(&ready(&lab, &[(2, 2)]))
        .replace("10.32.0.41", "10.032.0.041")
        .replace("10.250.0.11", "10.250.000.011")
        .replace("10.250.0.1\n", "010.250.0.001\n")
        .replace("\"10.200.2.12\"", "\"10.200.002.012\"");
    for zeros in ["10.032.0.041", "10.250.000.011", "010.250.0.001", "10.200.002.012", "10.240.000.000/024"] {
        assert!(yaml.contains(zeros), "the manifest must carry {zeros}: {yaml}");
    }
    lab.write_manifest("svc1.yaml", &yaml).unwrap();
    lab.start_agents().unwrap();
    let one: &[&str] = &["pod-2-2"];
    // IPv4 only: kube-proxy's sloppy parsing is of IPv4's dotted quads.
    run_in(
        &lab,
        "TestBadIPs",
        &[
            tcp("pod to cluster IP 10.032.0.041", Pod, at(cip(41), 80), Want::Reach(one, No)),
            tcp("external to external IP 10.250.000.011", External, at(EXTERNAL_SVC_IP, 80), Want::Reach(one, Yes)),
            tcp(
                "external to LB IP 010.250.0.001 in range 10.240.000.000/024",
                External,
                at(lb(1), 80),
                Want::Reach(one, Yes),
            ),
        ],
        &[Family::V4],
    );
}

/// kube-proxy learns the service CIDRs from `networking.k8s.io/v1` `ServiceCIDR` objects
/// (`TestProxier_OnServiceCIDRsChanged`): with no flag, the object alone makes an unallocated address of
/// its range dropped; once it is deleted, such a packet is routed on again (the lab sees it leave).
#[test]
fn service_cidr_objects_set_the_ranges_whose_unallocated_addresses_are_dropped() {
    let mut lab = lab_with(2, &[]);
    let cidr = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [10.32.0.0/16, 'fd00:32::/64']\n";
    lab.write_manifest("servicecidr.yaml", cidr).unwrap();
    let svc1 = Svc::new("svc1", cip(41), vec![port("http", 80, "TCP", 80)]);
    lab.write_manifest("svc1.yaml", &manifest(&lab, &svc1, &ready(&lab, &[(1, 2)]))).unwrap();
    lab.start_agents().unwrap();
    let unallocated = at(cip(50), 80);
    run(
        &lab,
        "TestProxier_OnServiceCIDRsChanged",
        &[
            tcp("packet to unallocated cluster ip", Pod, unallocated, Want::Drop),
            tcp("svc1 does not accept other ports", Pod, at(cip(41), 443), Want::Reject),
            tcp("simple clusterIP", Pod, at(cip(41), 80), Want::Reach(&["pod-1-2"], No)),
        ],
    );

    let seen = lab.sync_counts();
    lab.remove_manifest("servicecidr.yaml").unwrap();
    lab.wait_for_sync(&seen).unwrap();
    lab.expect_leaks_to(*unallocated.ip());
    let after = tcp("after the ServiceCIDR is deleted", Pod, unallocated, Want::Drop);
    let outcome = try_once(&lab, &after, Family::V4, DROP_WAIT);
    assert!(matches!(outcome, Got::TimedOut), "{outcome:?}");
    let leaked = lab.leaks().unwrap();
    assert!(
        leaked.iter().any(|l| l.dst == *unallocated.ip()),
        "without a service CIDR the packet is routed on by the default route, as kube-proxy leaves it: {leaked:?}"
    );
}
