//! The differential check: one desired table (one set of manifests) served by each dataplane mode in turn
//! on the same lab, and the same probes (client × frontend × protocol) sent in each mode. A probe's verdict
//! is what the client saw: which backend answered and the source address it saw, a refusal, or silence.
//! Every mode must give every probe the same verdict, and that verdict must be kube-proxy's.
//!
//! The table is built so that each probe has one right answer (a single eligible endpoint, or session
//! affinity), which makes verdicts comparable without statistics; load spreading is checked per mode by
//! the behaviour tests.
//!
//! Every Service is dual-stack, with one EndpointSlice per family, and every probe is sent over IPv6 too
//! (to the Service's IPv6 address, the node's IPv6 address, the IPv6 external or load-balancer IP): in the
//! modes its verdict must be the IPv4 one.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    path::Path,
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Outcome, Proto, attempt},
    echo6::{self, Echo6},
    lab::{EXTERNAL_IP, EXTERNAL_IP6, node_ip, node_ip6, node_name},
    manifests::{Endpoint, Port, Svc},
};

/// Long enough for an answer or a refusal; a probe still unanswered then was dropped.
const WAIT: Duration = Duration::from_millis(1500);
const MODES: [&str; 3] = ["ebpf", "iptables", "nftables"];

#[derive(Clone, Copy, Debug)]
enum Client {
    Pod(usize, usize),
    Node(usize),
    External,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// The backend that answered, and whose address it saw as the client's.
    Answered {
        backend: String,
        source: String,
    },
    Refused,
    Dropped,
    /// The client's own call failed: the errno (`os error N`), else the whole message.
    Failed(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Answered { backend, source } => write!(f, "{backend} saw {source}"),
            Self::Refused => f.write_str("refused"),
            Self::Dropped => f.write_str("dropped"),
            Self::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// What kube-proxy does with a probe: answer (by this backend), refuse, drop, or fail the client's own call
/// with this errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Answer(&'static str),
    Refuse,
    Drop,
    Fail(&'static str),
}

/// `os error N` out of a client's error message, which otherwise differs by where the call failed.
fn errno(message: &str) -> String {
    message
        .find("(os error ")
        .map_or_else(|| message.to_owned(), |at| message[at + 1..].trim_end_matches(')').to_owned())
}

struct Probe {
    what: &'static str,
    client: Client,
    proto: Proto,
    target: SocketAddrV4,
    expect: Expect,
    /// Asked this many times; all answers must come from one backend (session affinity).
    repeat: usize,
}

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 32, 0, last)
}

const EXTERNAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 20);
const LB_OPEN: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 21);
const LB_RANGED: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 22);

/// The IPv6 twin of a lab IPv4 address: a Service address `10.x.0.N` becomes `fd00:x::N` (hex digits
/// read as written), a node's address its IPv6 one.
fn v6(addr: Ipv4Addr) -> Ipv6Addr {
    let [a, b, _, d] = addr.octets();
    if let Some(n) = (1..=2).find(|n| node_ip(*n) == addr) {
        return node_ip6(n);
    }
    let hex = |v: u8| u16::from_str_radix(&v.to_string(), 16).expect("decimal digits read as hex");
    assert_eq!(a, 10, "a lab address");
    Ipv6Addr::new(0xfd00, hex(b), 0, 0, 0, 0, 0, hex(d))
}

/// One manifest set exercising every kind of frontend and policy.
fn write_table(lab: &Lab) {
    let tcp_udp = || {
        vec![
            Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
            Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
        ]
    };
    let http = || vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }];
    let on = |n: usize, k: usize| Endpoint::ready(lab.pod(n, k).ip, node_name(n));
    let on6 = |n: usize, k: usize| Endpoint::ready(lab.pod(n, k).ip6.expect("a dual-stack pod"), node_name(n));

    let cip = Svc::new("cip", vip(30), tcp_udp());
    let empty = Svc::new("empty", vip(31), tcp_udp());
    let mut np_cluster = Svc::new("np-cluster", vip(32), http());
    np_cluster.type_ = "NodePort";
    np_cluster.node_ports = vec![30110];
    let mut np_local = Svc::new("np-local", vip(33), http());
    np_local.type_ = "NodePort";
    np_local.node_ports = vec![30111];
    np_local.external_policy = "Local";
    let mut external = Svc::new("external", vip(34), http());
    external.external_ips = vec![EXTERNAL_VIP];
    external.external_ips6 = vec![v6(EXTERNAL_VIP)];
    let mut lb = Svc::new("lb", vip(35), http());
    lb.type_ = "LoadBalancer";
    lb.node_ports = vec![30112];
    lb.lb_ingress = vec![(LB_OPEN, "VIP")];
    lb.lb_ingress6 = vec![v6(LB_OPEN)];
    lb.source_ranges = vec!["10.240.0.100/32", "'fd00:240::64/128'"];
    let mut lb_ranged = Svc::new("lb-ranged", vip(36), http());
    lb_ranged.type_ = "LoadBalancer";
    lb_ranged.node_ports = vec![30113];
    lb_ranged.lb_ingress = vec![(LB_RANGED, "VIP")];
    lb_ranged.lb_ingress6 = vec![v6(LB_RANGED)];
    lb_ranged.source_ranges = vec!["192.0.2.0/24", "'fd00:192::/64'"];
    let mut itp_local = Svc::new("itp-local", vip(37), http());
    itp_local.internal_policy = "Local";
    let hairpin = Svc::new("hairpin", vip(38), http());
    let mut sticky = Svc::new("sticky", vip(39), http());
    sticky.affinity_timeout = Some(300);

    for (svc, endpoints) in [
        (cip, vec![(2, 2)]),
        (empty, vec![]),
        (np_cluster, vec![(2, 2)]),
        (np_local, vec![(1, 2)]),
        (external, vec![(2, 2)]),
        (lb, vec![(1, 2)]),
        (lb_ranged, vec![(1, 2)]),
        (itp_local, vec![(2, 2)]),
        (hairpin, vec![(1, 2)]),
        (sticky, vec![(1, 2), (2, 2)]),
    ] {
        let svc = Svc { cluster_ip6: Some(v6(svc.cluster_ip)), ..svc };
        let v4: Vec<Endpoint> = endpoints.iter().map(|&(n, k)| on(n, k)).collect();
        let v6: Vec<Endpoint> = endpoints.iter().map(|&(n, k)| on6(n, k)).collect();
        lab.write_manifest(&format!("{}.yaml", svc.name), &svc.with_endpoints_of_both_families(&v4, &v6)).unwrap();
    }
}

fn probes() -> Vec<Probe> {
    use Client::{External, Node, Pod};
    use Expect::{Answer, Drop, Fail, Refuse};
    let p = |what, client, proto, target, expect| Probe { what, client, proto, target, expect, repeat: 1 };
    let (n1, n2) = (node_ip(1), node_ip(2));
    vec![
        p("ClusterIP TCP, pod on node1", Pod(1, 1), Proto::Tcp, at(vip(30), 80), Answer("pod-2-2")),
        p("ClusterIP TCP, pod on node2", Pod(2, 1), Proto::Tcp, at(vip(30), 80), Answer("pod-2-2")),
        p("ClusterIP UDP, pod on node1", Pod(1, 1), Proto::Udp, at(vip(30), 53), Answer("pod-2-2")),
        p("ClusterIP TCP, node1 itself", Node(1), Proto::Tcp, at(vip(30), 80), Answer("pod-2-2")),
        p("ClusterIP UDP, node1 itself", Node(1), Proto::Udp, at(vip(30), 53), Answer("pod-2-2")),
        p("no endpoints TCP, pod", Pod(1, 1), Proto::Tcp, at(vip(31), 80), Refuse),
        p("no endpoints UDP, pod", Pod(1, 1), Proto::Udp, at(vip(31), 53), Refuse),
        p("no endpoints TCP, node1 itself", Node(1), Proto::Tcp, at(vip(31), 80), Refuse),
        // kube-proxy's REJECT in OUTPUT drops the node's own datagram as it leaves: sendmsg fails, EPERM.
        p("no endpoints UDP, node1 itself", Node(1), Proto::Udp, at(vip(31), 53), Fail("os error 1")),
        p("NodePort Cluster, external via node1", External, Proto::Tcp, at(n1, 30110), Answer("pod-2-2")),
        p("NodePort Cluster, external via node2", External, Proto::Tcp, at(n2, 30110), Answer("pod-2-2")),
        p("NodePort Cluster, pod to node1", Pod(1, 1), Proto::Tcp, at(n1, 30110), Answer("pod-2-2")),
        p("NodePort Cluster, node1 itself", Node(1), Proto::Tcp, at(n1, 30110), Answer("pod-2-2")),
        p("NodePort Local, external via node1", External, Proto::Tcp, at(n1, 30111), Answer("pod-1-2")),
        p("NodePort Local, external via node2", External, Proto::Tcp, at(n2, 30111), Drop),
        p("NodePort Local, pod on node2 to node2", Pod(2, 1), Proto::Tcp, at(n2, 30111), Answer("pod-1-2")),
        p("NodePort Local, node2 itself", Node(2), Proto::Tcp, at(n2, 30111), Answer("pod-1-2")),
        p("externalIP, external via node1", External, Proto::Tcp, at(EXTERNAL_VIP, 80), Answer("pod-2-2")),
        p("externalIP, pod on node1", Pod(1, 1), Proto::Tcp, at(EXTERNAL_VIP, 80), Answer("pod-2-2")),
        p("LB IP in range, external", External, Proto::Tcp, at(LB_OPEN, 80), Answer("pod-1-2")),
        p("LB IP out of range, external", External, Proto::Tcp, at(LB_RANGED, 80), Drop),
        p("LB's NodePort ignores ranges, external", External, Proto::Tcp, at(n1, 30113), Answer("pod-1-2")),
        p("internal Local, pod with local endpoint", Pod(2, 1), Proto::Tcp, at(vip(37), 80), Answer("pod-2-2")),
        p("internal Local, pod without one", Pod(1, 1), Proto::Tcp, at(vip(37), 80), Drop),
        p("hairpin, the endpoint itself", Pod(1, 2), Proto::Tcp, at(vip(38), 80), Answer("pod-1-2")),
        Probe {
            what: "affinity, 6 connections, one backend",
            client: Pod(1, 1),
            proto: Proto::Tcp,
            target: at(vip(39), 80),
            expect: Answer("(sticky)"),
            repeat: 6,
        },
    ]
}

/// Names the addresses a backend may see, so verdicts read well and compare across families.
fn source_name(lab: &Lab, addr: IpAddr) -> String {
    if addr == EXTERNAL_IP || addr == EXTERNAL_IP6 {
        return "the external client".into();
    }
    for n in 1..=2 {
        if addr == node_ip(n) || addr == node_ip6(n) {
            return format!("node{n}");
        }
    }
    let pod = lab.pods().iter().find(|p| IpAddr::V4(p.ip) == addr || p.ip6.map(IpAddr::V6) == Some(addr));
    pod.map_or_else(|| addr.to_string(), |p| p.name.clone())
}

/// Asks `probe.repeat` times; all answers must be the same (session affinity).
fn repeated(probe: &Probe, once: impl Fn() -> Verdict) -> Verdict {
    let first = once();
    for _ in 1..probe.repeat {
        let next = once();
        if next != first {
            return Verdict::Failed(format!("answers differ: {first} then {next}"));
        }
    }
    match first {
        Verdict::Answered { source, .. } if probe.repeat > 1 => {
            Verdict::Answered { backend: "(sticky)".into(), source }
        }
        v => v,
    }
}

/// The probe over IPv6, to its target's IPv6 twin. The node's own client is a process of the node (its
/// namespace and cgroup), as for IPv4.
fn send6(lab: &Lab, client_bin: &Path, probe: &Probe) -> Verdict {
    let target = SocketAddrV6::new(v6(*probe.target.ip()), probe.target.port(), 0, 0);
    let ns = match probe.client {
        Client::Pod(n, k) => lab.pod(n, k).ns.clone(),
        Client::External => lab.external_ns(),
        Client::Node(n) => {
            let proto = if probe.proto == Proto::Udp { "udp" } else { "tcp" };
            return repeated(probe, || {
                let out = match lab.run_on_node(n, client_bin, &[proto, &target.to_string(), "2000"]) {
                    Ok(out) => out,
                    Err(e) => return Verdict::Failed(format!("{e:#}")),
                };
                let line = out.trim();
                if let Some(rest) = line.strip_prefix("OK ") {
                    let mut words = rest.split_whitespace();
                    let backend = words.next().unwrap_or_default().to_owned();
                    return match words.next().and_then(|w| w.parse::<SocketAddrV6>().ok()) {
                        Some(seen) => Verdict::Answered { backend, source: source_name(lab, IpAddr::V6(*seen.ip())) },
                        None => Verdict::Failed(format!("malformed answer {line:?}")),
                    };
                }
                match line {
                    "ERR refused" => Verdict::Refused,
                    "ERR timeout" => Verdict::Dropped,
                    other => Verdict::Failed(errno(other)),
                }
            });
        }
    };
    repeated(probe, || {
        let result = match probe.proto {
            Proto::Tcp => echo6::tcp(&ns, target, WAIT),
            Proto::Udp => echo6::udp(&ns, target, WAIT),
        };
        match result {
            Ok(r) => {
                Verdict::Answered { backend: r.backend, source: source_name(lab, IpAddr::V6(*r.seen_source.ip())) }
            }
            Err(e) if echo6::refused(&e) => Verdict::Refused,
            Err(e) if echo6::timed_out(&e) => Verdict::Dropped,
            Err(e) => Verdict::Failed(errno(&format!("{e:#}"))),
        }
    })
}

fn send(lab: &Lab, client_bin: &Path, probe: &Probe) -> Verdict {
    let once = || {
        let outcome = match probe.client {
            Client::Pod(n, k) => attempt(&lab.pod(n, k).ns.clone(), probe.proto, probe.target, WAIT),
            Client::External => attempt(&lab.external_ns(), probe.proto, probe.target, WAIT),
            Client::Node(n) => lab.request_from_node(n, client_bin, probe.proto, probe.target),
        };
        match outcome {
            Ok(Outcome::Answered(r)) => {
                Verdict::Answered { backend: r.backend, source: source_name(lab, IpAddr::V4(*r.seen_source.ip())) }
            }
            Ok(Outcome::Refused) => Verdict::Refused,
            Ok(Outcome::TimedOut) => Verdict::Dropped,
            Ok(Outcome::Failed(e)) => Verdict::Failed(errno(&e)),
            Err(e) => Verdict::Failed(format!("{e:#}")),
        }
    };
    repeated(probe, once)
}

fn meets(verdict: &Verdict, expect: Expect) -> bool {
    match (verdict, expect) {
        (Verdict::Answered { backend, .. }, Expect::Answer(wanted)) => backend == wanted,
        (Verdict::Refused, Expect::Refuse) | (Verdict::Dropped, Expect::Drop) => true,
        (Verdict::Failed(errno), Expect::Fail(wanted)) => errno == wanted,
        _ => false,
    }
}

#[test]
fn every_mode_gives_every_probe_the_same_verdict() {
    let client_bin = Path::new(env!("CARGO_BIN_EXE_lab-client"));
    let spec = LabSpec { agent_args: vec!["--mode".into(), MODES[0].into()], ..LabSpec::default() };
    let mut lab = Lab::start(spec).expect("lab");
    let mut echoes = Vec::new();
    for (n, k) in [(1, 2), (2, 2)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[5353]).unwrap();
        for port in [8080, 5353] {
            echoes.push(Echo6::start(&pod.ns, &pod.name, port).unwrap());
        }
    }
    write_table(&lab);
    for addr in [EXTERNAL_VIP, LB_OPEN, LB_RANGED] {
        lab.route_external_via(addr, 1).unwrap();
        lab.route_external6_via(v6(addr), 1).unwrap();
    }
    lab.start_agents().unwrap();

    let probes = probes();
    let mut verdicts: BTreeMap<&str, Vec<Verdict>> = BTreeMap::new();
    let mut verdicts_ipv6: BTreeMap<&str, Vec<Verdict>> = BTreeMap::new();
    for (i, mode) in MODES.iter().enumerate() {
        if i > 0 {
            for node in 1..=2 {
                lab.restart_agent_with(node, &["--mode", mode]).unwrap();
            }
        }
        verdicts.insert(mode, probes.iter().map(|p| send(&lab, client_bin, p)).collect());
        verdicts_ipv6.insert(mode, probes.iter().map(|p| send6(&lab, client_bin, p)).collect());
    }

    let mut report = format!("{:<42}", "probe");
    for mode in MODES {
        let _ = write!(report, " | {mode:<34}");
    }
    let mut wrong = Vec::new();
    for (i, probe) in probes.iter().enumerate() {
        let _ = write!(report, "\n{:<42}", probe.what);
        for mode in MODES {
            let verdict = &verdicts[mode][i];
            let _ = write!(report, " | {:<34}", verdict.to_string());
            if !meets(verdict, probe.expect) {
                wrong.push(format!("{mode}: {}: {verdict}, expected {:?}", probe.what, probe.expect));
            }
            if *verdict != verdicts[MODES[0]][i] {
                wrong.push(format!(
                    "{mode}: {}: {verdict}, but {} says {}",
                    probe.what, MODES[0], verdicts[MODES[0]][i]
                ));
            }
        }
        let _ = write!(report, "\n{:<42}", "  over IPv6");
        for mode in MODES {
            let over_ipv6 = &verdicts_ipv6[mode][i];
            let _ = write!(report, " | {:<34}", over_ipv6.to_string());
            if over_ipv6 != &verdicts[mode][i] {
                wrong.push(format!("{mode}: {} over IPv6: {over_ipv6}, over IPv4: {}", probe.what, verdicts[mode][i]));
            }
        }
    }
    drop(echoes);
    eprintln!("{report}");
    assert!(wrong.is_empty(), "modes disagree or break kube-proxy's behaviour:\n{}\n\n{report}", wrong.join("\n"));
}
