//! Connection state, tried with real clients and servers nobody here wrote: dnsmasq answered through a
//! kube-dns-like Service and queried with `dig` and `dnsperf`, nginx queried with `curl` and `wrk`. Each test
//! runs in every mode (`cargo xtask test` runs this file once per dataplane), and over each family the lab
//! has: every Service is dual-stack there (one EndpointSlice per family) and every client asks over IPv4
//! and IPv6 alike.
//!
//! Every dnsmasq answers `who.lab` with its own pod's address in the family asked (`A`, `AAAA`), so a
//! client learns which pod answered.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec, PodRef,
    daemon::{DnsperfReport, WrkReport, dig_who, dnsmasq_args, nginx_conf, wait_until},
    lab::{Family, node_name},
    manifests::{Endpoint, Port, Svc},
};

const DNS_PORT: u16 = 5353;
const HTTP_PORT: u16 = 8080;

fn vip4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 32, 0, last)
}

fn vip6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, u16::from(last))
}

/// The Service address ending in `last`, in `family`'s service CIDR.
fn vip(family: Family, last: u8) -> IpAddr {
    match family {
        Family::V4 => vip4(last).into(),
        Family::V6 => vip6(last).into(),
    }
}

fn dns_ports() -> Vec<Port> {
    vec![Port { name: "dns", port: 53, protocol: "UDP", target_port: DNS_PORT }]
}

fn http_ports() -> Vec<Port> {
    vec![Port { name: "http", port: 80, protocol: "TCP", target_port: HTTP_PORT }]
}

/// `svc` at `vip(_, last)` with `pods` as its ready endpoints: `RequireDualStack` with one slice per
/// family where the lab has IPv6, IPv4 only where it has not (the VXLAN overlay).
fn manifest(lab: &Lab, svc: &Svc, last: u8, pods: &[&PodRef]) -> String {
    let ready =
        |f: Family| -> Vec<Endpoint> { pods.iter().map(|p| Endpoint::ready(f.pod(p), node_name(p.node))).collect() };
    let mut svc = svc.clone();
    svc.cluster_ip = vip4(last);
    if !lab.dual_stack() {
        return svc.with_endpoints(&ready(Family::V4));
    }
    svc.cluster_ip6 = Some(vip6(last));
    svc.with_endpoints_of_both_families(&ready(Family::V4), &ready(Family::V6))
}

/// `pod`'s addresses, one per family the lab has.
fn addrs(lab: &Lab, pod: &PodRef) -> Vec<IpAddr> {
    Family::of(lab).into_iter().map(|f| f.pod(pod)).collect()
}

/// Starts dnsmasq in `pod`, named after it, on each of its addresses, and waits until it answers there
/// directly.
fn serve_dns(lab: &mut Lab, pod: &PodRef) {
    let addrs = addrs(lab, pod);
    let args = dnsmasq_args(&addrs, DNS_PORT);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.start_daemon(pod, &format!("dns-{}", pod.name), "dnsmasq", &args).unwrap();
    let ns = pod.ns.clone();
    wait_until(&format!("dnsmasq in {}", pod.name), Duration::from_secs(5), || {
        addrs.iter().all(|&ip| dig_who(&ns, ip, DNS_PORT, None) == Ok(ip))
    })
    .unwrap_or_else(|e| panic!("{e:#}; {:?}", lab.check_daemons()));
}

/// Starts nginx in `pod` answering its pod name on [`HTTP_PORT`] of each of its addresses.
fn serve_http(lab: &mut Lab, pod: &PodRef) {
    let dir = lab.work_dir().join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    let addrs = addrs(lab, pod);
    std::fs::write(&conf, nginx_conf(&dir, &addrs, HTTP_PORT, &pod.name)).unwrap();
    let conf = conf.to_string_lossy().into_owned();
    lab.start_daemon(pod, &format!("nginx-{}", pod.name), "nginx", &["-c", &conf]).unwrap();
    let ns = pod.ns.clone();
    wait_until(&format!("nginx in {}", pod.name), Duration::from_secs(5), || {
        addrs.iter().all(|&ip| curl(&ns, &url(ip, HTTP_PORT), None).is_ok())
    })
    .unwrap_or_else(|e| panic!("{e:#}; {:?}", lab.check_daemons()));
}

/// `http://addr:port/`, the IPv6 address in brackets.
fn url(addr: IpAddr, port: u16) -> String {
    format!("http://{}/", SocketAddr::new(addr, port))
}

/// One `curl` of `url` from namespace `ns`, optionally from a fixed local port: the body, or why not.
/// HTTP/1.0, so the server closes first (see [`nginx_conf`]) and the client's port is not left in `TIME_WAIT`.
/// With a fixed local port, a bind refused because the previous connection on it is still closing (its
/// last ACK in flight) is retried for up to a second: that is the client's kernel, not the network.
fn curl(ns: &str, url: &str, local_port: Option<u16>) -> Result<String, String> {
    const BIND_FAILED: i32 = 45;
    let mut args = vec!["netns", "exec", ns, "curl", "--http1.0", "--silent", "--show-error", "--max-time", "3"];
    let port = local_port.map(|p| p.to_string());
    if let Some(p) = &port {
        args.extend(["--local-port", p.as_str()]);
    }
    args.push(url);
    for _ in 0..20 {
        let out = Command::new("ip").args(&args).output().map_err(|e| format!("running curl: {e}"))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        if out.status.code() != Some(BIND_FAILED) {
            return Err(format!("curl {url} exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("curl {url}: local port {local_port:?} stayed in use"))
}

/// `dnsperf` from `ns` to `server:53`, asking `who.lab` in the server's family: 2000 queries/s for 12 s from
/// 4 sockets; a query unanswered after 2 s counts as lost. Up to 5000 outstanding, so lost queries do not
/// slow the rate down.
fn spawn_dnsperf(ns: &str, server: IpAddr, work_dir: &Path) -> Child {
    let queries = work_dir.join(format!("queries-{}.txt", if server.is_ipv6() { 6 } else { 4 }));
    std::fs::write(&queries, if server.is_ipv6() { "who.lab AAAA\n" } else { "who.lab A\n" }).unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns, "dnsperf", "-s", &server.to_string(), "-p", "53"])
        .args(["-d", &queries.to_string_lossy(), "-c", "4", "-Q", "2000", "-q", "5000", "-l", "12", "-t", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dnsperf runs")
}

/// kube-dns behind a Service with a second Service (a canary, or a lagging one) selecting the same pods,
/// through a rolling update: each step adds a new pod to the DNS Service, takes an old one out, and stops
/// the old pod's server once the agents have applied that. The second Service still lists the old pods. A
/// `dnsperf` per family at a fixed rate runs through the whole update; its few fixed source ports are UDP
/// flows that must move off a pod when it leaves the DNS Service, as kube-proxy's conntrack cleanup moves
/// them.
#[test]
fn dns_through_a_rolling_update_loses_no_query() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let old = [lab.pod(1, 2).clone(), lab.pod(2, 1).clone()];
    let new = [lab.pod(1, 3).clone(), lab.pod(2, 2).clone()];
    for pod in old.iter().chain(&new) {
        serve_dns(&mut lab, pod);
    }
    let dns = Svc::new("kube-dns", Ipv4Addr::UNSPECIFIED, dns_ports());
    let canary = Svc::new("dns-canary", Ipv4Addr::UNSPECIFIED, dns_ports());
    let all: Vec<&PodRef> = old.iter().chain(&new).collect();
    lab.write_manifest("dns.yaml", &manifest(&lab, &dns, 10, &[&old[0], &old[1]])).unwrap();
    lab.write_manifest("canary.yaml", &manifest(&lab, &canary, 11, &all)).unwrap();
    lab.start_agents().unwrap();

    let client = lab.pod(1, 1).clone();
    let families = Family::of(&lab);
    let runs: Vec<(Family, Child)> =
        families.iter().map(|&f| (f, spawn_dnsperf(&client.ns, vip(f, 10), lab.work_dir()))).collect();

    // Let the flows settle on the old pods, then roll one pod at a time.
    std::thread::sleep(Duration::from_secs(2));
    let mut serving = vec![old[0].clone(), old[1].clone()];
    for (gone, added) in old.iter().zip(&new) {
        serving.push(added.clone());
        serving.retain(|p| p.name != gone.name);
        let seen = lab.sync_counts();
        let refs: Vec<&PodRef> = serving.iter().collect();
        lab.write_manifest("dns.yaml", &manifest(&lab, &dns, 10, &refs)).unwrap();
        lab.wait_for_sync(&seen).unwrap();
        // Queries already sent to the old pod get their answers before it goes.
        std::thread::sleep(Duration::from_millis(500));
        lab.stop_daemon(&format!("dns-{}", gone.name));
        std::thread::sleep(Duration::from_secs(2));
    }
    for (family, run) in runs {
        let out = run.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let report = DnsperfReport::parse(&text).unwrap();
        let name = family.name();
        // The situation happened: the rate was sustained through both steps.
        assert!(report.sent >= 20_000, "{name}: dnsperf sent {} queries, expected about 24000:\n{text}", report.sent);
        assert_eq!(report.lost, 0, "{name}: queries lost through the rolling update:\n{text}");
        // And the flows are answered by the new pods at the end, from the Service address.
        for sport in [47100, 47101, 47102] {
            let answer = dig_who(&client.ns, vip(family, 10), 53, Some((family.pod(&client), sport))).unwrap();
            assert!(
                new.iter().any(|p| family.pod(p) == answer),
                "{name}: answered by {answer}, not a pod of the DNS Service"
            );
        }
    }
}

/// One client source port asking Service A, then Service B (same backend pod), then A again: each query is
/// answered, from the address it was sent to (`dig` checks the reply's source).
#[test]
fn one_source_port_to_two_services_of_one_pod_and_back_is_answered() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backend = lab.pod(2, 1).clone();
    serve_dns(&mut lab, &backend);
    let a = Svc::new("dns-a", Ipv4Addr::UNSPECIFIED, dns_ports());
    let b = Svc::new("dns-b", Ipv4Addr::UNSPECIFIED, dns_ports());
    lab.write_manifest("a.yaml", &manifest(&lab, &a, 20, &[&backend])).unwrap();
    lab.write_manifest("b.yaml", &manifest(&lab, &b, 21, &[&backend])).unwrap();
    lab.start_agents().unwrap();

    let client = lab.pod(1, 1).clone();
    for family in Family::of(&lab) {
        for sport in [47000, 47001] {
            for (step, last) in [("A", 20), ("B", 21), ("A again", 20)] {
                let answer = dig_who(&client.ns, vip(family, last), 53, Some((family.pod(&client), sport)))
                    .unwrap_or_else(|e| panic!("{}: source port {sport}, Service {step}: {e}", family.name()));
                assert_eq!(answer, family.pod(&backend), "{}: source port {sport}, Service {step}", family.name());
            }
        }
    }
}

/// An external client with one source port: a NodePort, then the same pod directly (routed through the
/// node). Both answered by the pod, each from the address the client connected to — a stale reverse
/// translation would make the direct connection's SYN-ACK come from the NodePort address, and the client
/// would reset it.
#[test]
fn one_external_source_port_to_a_node_port_then_the_pod_directly_is_answered() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backend = lab.pod(1, 2).clone();
    serve_http(&mut lab, &backend);
    let mut web = Svc::new("web", Ipv4Addr::UNSPECIFIED, http_ports());
    web.type_ = "NodePort";
    web.node_ports = vec![30080];
    lab.write_manifest("web.yaml", &manifest(&lab, &web, 30, &[&backend])).unwrap();
    lab.start_agents().unwrap();
    lab.route_external_via(backend.ip, 1).unwrap();
    if let Some(ip6) = backend.ip6.filter(|_| lab.dual_stack()) {
        lab.route_external6_via(ip6, 1).unwrap();
    }

    let ext = lab.external_ns();
    for family in Family::of(&lab) {
        let name = family.name();
        for sport in [47010, 47011, 47012] {
            let via_node_port = curl(&ext, &url(family.node(1), 30080), Some(sport));
            assert_eq!(
                via_node_port.as_deref(),
                Ok(backend.name.as_str()),
                "{name}: port {sport} through the NodePort"
            );
            let direct = curl(&ext, &url(family.pod(&backend), HTTP_PORT), Some(sport));
            assert_eq!(
                direct.as_deref(),
                Ok(backend.name.as_str()),
                "{name}: port {sport} straight to the pod afterwards"
            );
        }
    }
}

/// `wrk` with a new connection per request (`Connection: close`) through a ClusterIP to nginx on both
/// nodes, over each family: thousands of short connections, source ports reused as fast as the client's
/// kernel allows — no socket error, every response a 200.
#[test]
fn wrk_with_a_connection_per_request_through_a_cluster_ip_has_no_errors() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backends = [lab.pod(1, 2).clone(), lab.pod(2, 1).clone()];
    for pod in &backends {
        serve_http(&mut lab, pod);
    }
    let web = Svc::new("web", Ipv4Addr::UNSPECIFIED, http_ports());
    lab.write_manifest("web.yaml", &manifest(&lab, &web, 40, &[&backends[0], &backends[1]])).unwrap();
    lab.start_agents().unwrap();

    let client = lab.pod(1, 1).clone();
    for family in Family::of(&lab) {
        let out = Command::new("ip")
            .args(["netns", "exec", &client.ns, "wrk", "-t", "1", "-c", "8", "-d", "4s", "--timeout", "2s"])
            .args(["-H", "Connection: close", &url(vip(family, 40), 80)])
            .output()
            .expect("wrk runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let name = family.name();
        let report = WrkReport::parse(&text).unwrap();
        assert!(report.requests >= 1000, "{name}: wrk made only {} requests:\n{text}", report.requests);
        assert_eq!(report.socket_errors, 0, "{name}: socket errors:\n{text}");
        assert_eq!(report.non_2xx, 0, "{name}: non-2xx responses:\n{text}");
    }
}
