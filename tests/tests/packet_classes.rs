//! Packet classes real networks carry, through Services, with real traffic in the lab: IP fragments, ICMP
//! errors (port unreachable, fragmentation needed; in IPv6 too: port unreachable, Packet Too Big), IPv4
//! options, TTLs, and a node's own unconnected UDP socket.
//!
//! Each test first proves that its situation really happened — from the kernel's own SNMP counters
//! (`/proc/net/snmp`) in the namespaces concerned, a packet capture, or the data path's counters — and only
//! then judges what the client got: a test of fragments in which nothing fragmented proves nothing.
//!
//! Lab addresses: node N is 10.240.0.1N, pod K of node N is 10.200.N.(10+K) (its host end is `vpK`), the
//! external client is 10.240.0.100. Every route or sysctl changed here lives in a lab namespace and goes
//! with it.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec, PodRef, bulk,
    cmd::{ip_in, run, sysctl_in},
    echo::{self, Outcome, Proto},
    echo6,
    lab::{EXTERNAL_IP, EXTERNAL_IP6, node_ip, node_ip6, node_name},
    manifests::{Endpoint, Port, Svc},
    rawtcp::Capture,
    snmp::{self, Snapshot},
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// A UDP payload bigger than the lab's 1500-byte MTU: 4008 bytes of UDP make three fragments of at most
/// 1480 bytes of IP payload.
const BIG: usize = 4000;
/// At least this many fragments per `BIG` datagram.
const BIG_FRAGMENTS: u64 = 3;
/// One path-MTU transfer: 2 MiB is about 1500 full-size segments, more than any socket buffer here holds,
/// so it cannot finish unless the sender learns the lower MTU.
const TRANSFER: u64 = 2 << 20;
/// Generous: a working path moves 2 MiB in well under a second here; a path whose big segments vanish
/// never finishes.
const TRANSFER_WITHIN: Duration = Duration::from_secs(20);
/// The MTU of the lower hop: below the lab's 1500, so full-size segments no longer fit.
const LOW_MTU: &str = "1400";
const UDP_PORT: u16 = 5353;
const BULK_PORT: u16 = 9000;

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 32, 0, last)
}

fn vip6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, u16::from(last))
}

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

fn eps(lab: &Lab, pods: &[(usize, usize)]) -> Vec<Endpoint> {
    pods.iter().map(|&(n, k)| Endpoint::ready(lab.pod(n, k).ip, node_name(n))).collect()
}

fn dns() -> Vec<Port> {
    vec![Port { name: "dns", port: 53, protocol: "UDP", target_port: UDP_PORT }]
}

fn rose(snapshot: &Snapshot, key: &str) -> u64 {
    snapshot.rise(key).unwrap()
}

/// Lab fact: a node forwarding a packet back out `eth0` sends the sender an ICMP redirect unless that
/// interface's own `send_redirects` is off (`all` is not enough). A redirect would move the external
/// client's direct route off node 1 (changing the hops a TTL counts) and use up the ICMP rate-limit token
/// that the "fragmentation needed" right after it needs.
fn no_redirects(lab: &Lab) {
    for n in 1..=2 {
        sysctl_in(&lab.node_ns(n), "net.ipv4.conf.eth0.send_redirects", "0").unwrap();
    }
}

/// A lab serving UDP on `UDP_PORT` in `serving`, with ClusterIP Services `udp-remote` at `vip(remote)`
/// backed by pod 2-2 and `udp-local` at `vip(local)` backed by pod 1-2, each with its IPv6 ClusterIP
/// `vip6(..)` where the lab is dual-stack.
fn two_udp_services(serving: &[(usize, usize)], remote: u8, local: u8) -> Lab {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    for &(n, k) in serving {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[], &[UDP_PORT]).unwrap();
        if lab.dual_stack() {
            lab.serve6(&pod, &[UDP_PORT]).unwrap();
        }
    }
    for (name, last, pod) in [("udp-remote", remote, (2, 2)), ("udp-local", local, (1, 2))] {
        let mut svc = Svc::new(name, vip(last), dns());
        let manifest = match lab.pod(pod.0, pod.1).ip6 {
            Some(ip6) => {
                svc.cluster_ip6 = Some(vip6(last));
                svc.with_endpoints_of_both_families(&eps(&lab, &[pod]), &[Endpoint::ready(ip6, node_name(pod.0))])
            }
            None => svc.with_endpoints(&eps(&lab, &[pod])),
        };
        lab.write_manifest(&format!("{name}.yaml"), &manifest).unwrap();
    }
    lab.start_agents().unwrap();
    lab
}

/// A datagram bigger than the MTU leaves the client as IP fragments, and only the first carries the UDP
/// header. Through a ClusterIP it must still arrive whole, at a backend on another node and at one on the
/// client's own node: every fragment translated to the same backend, and the answer from the ClusterIP.
#[test]
fn a_datagram_fragmented_by_the_client_arrives_whole_at_remote_and_local_backends() {
    let lab = two_udp_services(&[(2, 2), (1, 2)], 100, 101);
    let client = lab.pod(1, 1).clone();
    for (service, backend) in [(vip(100), lab.pod(2, 2).clone()), (vip(101), lab.pod(1, 2).clone())] {
        let (sender, receiver) = (Snapshot::take(&client.ns).unwrap(), Snapshot::take(&backend.ns).unwrap());
        let result = echo::udp_exchange(&client.ns, at(service, 53), echo::udp_payload(BIG, None), TIMEOUT);

        let (fragmented, fragments) = (rose(&sender, "Ip:FragOKs"), rose(&sender, "Ip:FragCreates"));
        assert!(
            fragmented >= 1 && fragments >= BIG_FRAGMENTS,
            "{service}: the client's kernel did not fragment ({fragmented} datagrams, {fragments} fragments)"
        );
        let (reply, _) =
            result.unwrap_or_else(|e| panic!("{service} → {}: a {BIG}-byte datagram: {e:#}", backend.name));
        assert_eq!(reply.backend, backend.name, "{service}");
        assert_eq!(reply.len, Some(BIG), "{service}: the backend must receive the datagram whole");
        assert!(rose(&receiver, "Ip:ReasmOKs") >= 1, "{service}: the backend reassembled no datagram");
    }
    if proxy_lab::lab::mode() == "ebpf" {
        // A later fragment arriving before its first is dropped if it is bound for a Service address, so
        // it never leaves untranslated: the agent keeps those addresses (ClusterIPs, not the node's own).
        let map = lab.pinned_map(1, proxy_common::maps::FRONTEND_ADDRS).unwrap();
        let addrs: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::try_from(map).unwrap();
        let held: BTreeSet<Ipv4Addr> = addrs.keys().map(|k| Ipv4Addr::from(k.unwrap().to_ne_bytes())).collect();
        assert_eq!(held, [vip(100), vip(101)].into(), "the Service addresses the data path knows");
    }
}

/// A datagram whose later fragment arrives before its first: without the first there are no ports to
/// translate it by. Netfilter reassembles before NAT, so the datagram still arrives; the eBPF data path
/// drops such a fragment when it is bound for a Service address (counted as `frag_without_first`), so the
/// datagram is lost. In no mode may a fragment leave by the node's default route untranslated (it would
/// reach the external namespace, addressed to the ClusterIP).
#[test]
fn a_later_fragment_before_its_first_never_leaves_the_node_untranslated() {
    use proxy_lab::fuzz::wire::{Datagram, L4};
    let lab = two_udp_services(&[(2, 2)], 104, 105);
    let client = lab.pod(1, 1).clone();
    let (service, sport) = (vip(104), 40_104);
    let datagram = Datagram {
        src: client.ip,
        dst: service,
        ttl: 64,
        id: 0x1234,
        tos: 0,
        dont_fragment: false,
        options: Vec::new(),
        l4: L4::Udp { sport, dport: 53, payload: echo::udp_payload(3000, None), no_csum: false },
    };
    let mut fragments = datagram.fragments(1480);
    assert_eq!(fragments.len(), 3, "three fragments of at most 1480 bytes of payload");
    // The second fragment first, then the first, then the last.
    fragments.swap(0, 1);
    let answers = proxy_lab::netns::in_netns(&client.ns, move || {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, sport))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        anyhow::Ok(socket)
    })
    .unwrap()
    .unwrap();
    let sent = Capture::start(&client.ns).unwrap();
    let outside = Capture::start(&lab.external_ns()).unwrap();
    let drops_before = drops(&lab, "frag_without_first");
    proxy_lab::rawtcp::send_ipv4(&client.ns, fragments, Duration::from_millis(20)).unwrap();
    let mut buf = [0u8; 2048];
    let answer = echo::recv_from_retrying(&answers, &mut buf);

    let to_service: Vec<Vec<u8>> = sent
        .packets(Duration::from_millis(300))
        .into_iter()
        .filter(|p| p.len() >= 20 && p[16..20] == service.octets())
        .collect();
    let offsets: Vec<u16> = to_service.iter().map(|p| u16::from_be_bytes([p[6], p[7]]) & 0x1fff).collect();
    // What left by the default route: nothing addressed to the ClusterIP.
    let leaked = outside
        .packets(Duration::from_millis(300))
        .into_iter()
        .filter(|p| p.len() >= 20 && p[16..20] == service.octets())
        .count();
    assert_eq!(leaked, 0, "{leaked} packets to {service} left the node by its default route");
    if proxy_lab::lab::mode() == "ebpf" {
        // The situation: the client's fragments left it as sent, a later one first.
        assert!(offsets.len() >= 3 && offsets[0] > 0, "the client's fragments, in the order sent: offsets {offsets:?}");
        assert_eq!(
            drops(&lab, "frag_without_first"),
            Some(drops_before.expect("the agent's drop counters at /metrics") + 1),
            "the early fragment, dropped by name"
        );
    } else {
        // Observed here: with the netfilter modes' rules on the nodes, the client pod's own kernel
        // reassembles the raw fragments before they leave it (one packet at offset 0 left the pod), so the
        // reordering never reaches the node; only the outcome is checked.
        assert!(!offsets.is_empty(), "the client sent nothing to {service}");
        let (n, from) = answer.unwrap_or_else(|e| panic!("netfilter reassembles first, so the datagram arrives: {e}"));
        assert_eq!(from, SocketAddr::V4(at(service, 53)), "answered from the ClusterIP ({n} bytes)");
    }
    if lab.dual_stack() {
        a_later_ipv6_fragment_first(&lab, &client);
    }
}

/// The IPv6 turn of [`a_later_fragment_before_its_first_never_leaves_the_node_untranslated`]: the same
/// datagram to the IPv6 ClusterIP, its fragments (Fragment headers) sent second, first, third.
fn a_later_ipv6_fragment_first(lab: &Lab, client: &PodRef) {
    let (service, sport) = (SocketAddrV6::new(vip6(104), 53, 0, 0), 40_106);
    let source = client.ip6.expect("a dual-stack pod");
    let payload = echo::udp_payload(3000, None);
    let mut fragments =
        proxy_lab::fuzz::wire::udp6_fragments((source, sport), (*service.ip(), 53), &payload, 0x0bad_f00d, 1448);
    assert_eq!(fragments.len(), 3, "three fragments of at most 1448 bytes");
    fragments.swap(0, 1);
    let answers = proxy_lab::netns::in_netns(&client.ns, move || {
        let socket = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, sport))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        anyhow::Ok(socket)
    })
    .unwrap()
    .unwrap();
    let sent = Capture::start(&client.ns).unwrap();
    let outside = Capture::start(&lab.external_ns()).unwrap();
    let drops_before = drops(lab, "frag_without_first");
    proxy_lab::rawtcp::send_ipv6(&client.ns, fragments, Duration::from_millis(20)).unwrap();
    let mut buf = [0u8; 2048];
    let answer = echo::recv_from_retrying(&answers, &mut buf);

    let to_service = |p: &Vec<u8>| p.len() >= 40 && p[0] >> 4 == 6 && p[24..40] == service.ip().octets();
    let captured: Vec<Vec<u8>> = sent.packets(Duration::from_millis(300)).into_iter().filter(to_service).collect();
    // A Fragment header right after the fixed header: its offset field, in bytes.
    let offsets: Vec<u16> = captured
        .iter()
        .map(|p| if p[6] == 44 && p.len() >= 48 { u16::from_be_bytes([p[42], p[43]]) & 0xfff8 } else { 0 })
        .collect();
    let leaked = outside.packets(Duration::from_millis(300)).iter().filter(|p| to_service(p)).count();
    assert_eq!(leaked, 0, "{leaked} IPv6 packets to {service} left the node by its default route");
    if proxy_lab::lab::mode() == "ebpf" {
        assert!(
            offsets.len() >= 3 && offsets[0] > 0,
            "the client's IPv6 fragments, in the order sent: offsets {offsets:?}"
        );
        assert_eq!(
            drops(lab, "frag_without_first"),
            Some(drops_before.expect("the agent's drop counters at /metrics") + 1),
            "the early IPv6 fragment, dropped by name"
        );
    } else {
        assert!(!offsets.is_empty(), "the client sent nothing to {service}");
        let (n, from) =
            answer.unwrap_or_else(|e| panic!("netfilter reassembles first, so the IPv6 datagram arrives: {e}"));
        assert_eq!(from, SocketAddr::V6(service), "answered from the IPv6 ClusterIP ({n} bytes)");
    }
}

/// The data path's count of drops for `reason` on node 1, from `/metrics` (eBPF mode only).
fn drops(lab: &Lab, reason: &str) -> Option<u64> {
    let (_, text) = echo::http_get_path(&lab.node_ns(1), at(Ipv4Addr::LOCALHOST, 10249), "/metrics", TIMEOUT).ok()?;
    let name = format!("proxy_agent_packet_drops_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&name)?.trim().parse::<u64>().ok())
}

/// The other way: a small request whose answer is bigger than the MTU, so the backend's kernel fragments
/// it. The client must get the whole answer, from the ClusterIP (every fragment reverse-translated).
#[test]
fn an_answer_fragmented_by_the_backend_arrives_whole_from_the_cluster_ip() {
    let lab = two_udp_services(&[(2, 2), (1, 2)], 102, 103);
    let client = lab.pod(1, 1).clone();
    for (service, backend) in [(vip(102), lab.pod(2, 2).clone()), (vip(103), lab.pod(1, 2).clone())] {
        let (sender, receiver) = (Snapshot::take(&backend.ns).unwrap(), Snapshot::take(&client.ns).unwrap());
        // `udp_exchange` accepts the answer only from the ClusterIP itself.
        let result = echo::udp_exchange(&client.ns, at(service, 53), echo::udp_payload(0, Some(BIG)), TIMEOUT);

        let fragments = rose(&sender, "Ip:FragCreates");
        assert!(
            fragments >= BIG_FRAGMENTS,
            "{service}: the backend's kernel did not fragment its answer ({fragments} fragments); was the request received?"
        );
        let (reply, size) =
            result.unwrap_or_else(|e| panic!("{service} → {}: a {BIG}-byte answer: {e:#}", backend.name));
        assert_eq!(reply.backend, backend.name, "{service}");
        assert_eq!(size, BIG, "{service}: the client must receive the answer whole");
        assert!(rose(&receiver, "Ip:ReasmOKs") >= 1, "{service}: the client reassembled no datagram");
    }
    // The same over IPv6, where only the backend's kernel may fragment (no router does): every fragment
    // of its answer, behind a Fragment header, reverse-translated to the IPv6 ClusterIP.
    if !lab.dual_stack() {
        return;
    }
    for (last, backend) in [(102, lab.pod(2, 2).clone()), (103, lab.pod(1, 2).clone())] {
        let service = SocketAddrV6::new(vip6(last), 53, 0, 0);
        let (sender, receiver) = (Snapshot::take(&backend.ns).unwrap(), Snapshot::take(&client.ns).unwrap());
        let result = echo6::udp_exchange(&client.ns, service, echo::udp_payload(0, Some(BIG)), TIMEOUT);

        let fragments = rose(&sender, "Ip6FragCreates");
        assert!(
            fragments >= BIG_FRAGMENTS,
            "{service}: the backend's kernel did not fragment its answer ({fragments} fragments); was the request received?"
        );
        let (reply, size) =
            result.unwrap_or_else(|e| panic!("{service} → {}: a {BIG}-byte answer: {e:#}", backend.name));
        assert_eq!(reply.backend, backend.name, "{service}");
        assert_eq!(size, BIG, "{service}: the client must receive the answer whole");
        assert!(rose(&receiver, "Ip6ReasmOKs") >= 1, "{service}: the client reassembled no datagram");
    }
}

/// A backend pod with nothing listening on the target port answers a datagram with an ICMP port
/// unreachable. Through a ClusterIP that error must reach the client as an error about the ClusterIP (its
/// outer source, and the datagram quoted inside it, translated back), so a connected socket reports
/// ECONNREFUSED at once, as it would with no Service in between.
#[test]
fn a_backend_without_a_listener_refuses_a_udp_client_through_its_icmp_error() {
    let lab = two_udp_services(&[], 110, 111);
    let client = lab.pod(1, 1).clone();
    for (service, backend) in [(vip(110), lab.pod(2, 2).clone()), (vip(111), lab.pod(1, 2).clone())] {
        let (backend_counters, client_counters) =
            (Snapshot::take(&backend.ns).unwrap(), Snapshot::take(&client.ns).unwrap());
        let outcome = echo::attempt(&client.ns, Proto::Udp, at(service, 53), TIMEOUT).unwrap();

        assert!(
            rose(&backend_counters, "Icmp:OutDestUnreachs") >= 1,
            "{service}: {} sent no port unreachable (did the datagram reach it?); the client got {outcome:?}",
            backend.name
        );
        assert!(matches!(outcome, Outcome::Refused), "{service}: expected ECONNREFUSED, got {outcome:?}");
        assert!(
            rose(&client_counters, "Icmp:InDestUnreachs") >= 1,
            "{service}: the ICMP error never reached the client"
        );
    }
    if !lab.dual_stack() {
        return;
    }
    // IPv6: the backend's ICMPv6 destination unreachable (port unreachable), translated the same way.
    for (service, backend) in [(vip6(110), lab.pod(2, 2).clone()), (vip6(111), lab.pod(1, 2).clone())] {
        let (backend_counters, client_counters) =
            (Snapshot::take(&backend.ns).unwrap(), Snapshot::take(&client.ns).unwrap());
        let result = echo6::udp(&client.ns, SocketAddrV6::new(service, 53, 0, 0), TIMEOUT);
        assert!(
            rose(&backend_counters, "Icmp6OutDestUnreachs") >= 1,
            "{service}: {} sent no port unreachable (did the datagram reach it?); the client got {result:?}",
            backend.name
        );
        let error = result.expect_err("nothing listens: no answer can come");
        assert!(echo6::refused(&error), "{service}: expected ECONNREFUSED, got {error:#}");
        assert!(
            rose(&client_counters, "Icmp6InDestUnreachs") >= 1,
            "{service}: the ICMPv6 error never reached the client"
        );
    }
}

/// A lab whose pod 2-2 runs a bulk TCP server on `BULK_PORT` behind Service `bulk`: ClusterIP
/// 10.32.0.120:80 (and `fd00:32::120` where the lab is dual-stack) and NodePort 30120 with
/// externalTrafficPolicy Cluster (so NodePort clients are masqueraded to the node's address). No node sends
/// redirects (see [`no_redirects`]).
fn bulk_lab() -> (Lab, PodRef) {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    no_redirects(&lab);
    let backend = lab.pod(2, 2).clone();
    lab.serve_bulk(&backend, BULK_PORT).unwrap();
    let mut svc =
        Svc::new("bulk", vip(120), vec![Port { name: "bulk", port: 80, protocol: "TCP", target_port: BULK_PORT }]);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30120];
    let v4 = eps(&lab, &[(2, 2)]);
    let manifest = match backend.ip6 {
        Some(ip6) => {
            svc.cluster_ip6 = Some(VIP6);
            svc.with_endpoints_of_both_families(&v4, &[Endpoint::ready(ip6, node_name(2))])
        }
        None => svc.with_endpoints(&v4),
    };
    lab.write_manifest("bulk.yaml", &manifest).unwrap();
    lab.start_agents().unwrap();
    (lab, backend)
}

/// The bulk Service's IPv6 ClusterIP.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x120);

/// How a route's lower MTU is set. IPv4 forwarding honours both; the FIB lookup XDP asks before
/// forwarding a packet itself (`bpf_fib_lookup` with the packet's length) honours a route's MTU only when
/// it is locked (or with `net.ipv4.ip_forward_use_pmtu`), besides device MTUs and learnt path MTUs: a
/// documented limit of the eBPF mode's XDP path (docs/semantics.md). The IPv4 NodePort tests, whose packets
/// XDP forwards, lock it; the ClusterIP tests, whose packets the kernel forwards, do not. IPv6 forwarding
/// itself honours only a locked route MTU (the kernel's `ip6_dst_mtu_maybe_forward`), so every IPv6 case
/// locks it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Metric {
    Plain,
    Locked,
}

/// The family a path-MTU case runs in: its addresses and the SNMP counters that prove the error.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The families this lab has: IPv6 too unless the topology is IPv4-only (VXLAN).
    fn of(lab: &Lab) -> Vec<Self> {
        if lab.dual_stack() { vec![Self::V4, Self::V6] } else { vec![Self::V4] }
    }

    fn vip(self) -> IpAddr {
        match self {
            Self::V4 => vip(120).into(),
            Self::V6 => VIP6.into(),
        }
    }

    fn node(self, n: usize) -> IpAddr {
        match self {
            Self::V4 => node_ip(n).into(),
            Self::V6 => node_ip6(n).into(),
        }
    }

    fn external(self) -> IpAddr {
        match self {
            Self::V4 => EXTERNAL_IP.into(),
            Self::V6 => EXTERNAL_IP6.into(),
        }
    }

    fn pod(self, pod: &PodRef) -> IpAddr {
        match self {
            Self::V4 => pod.ip.into(),
            Self::V6 => pod.ip6.expect("a dual-stack lab's pod has an IPv6 address").into(),
        }
    }

    /// Node 2's pod prefix.
    fn node2_pods(self) -> &'static str {
        match self {
            Self::V4 => "10.200.2.0/24",
            Self::V6 => "fd00:200:2::/64",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// The counters of the error the hop sends and the sender receives: "fragmentation needed" is one of
    /// IPv4's destination-unreachable errors; IPv6 has Packet Too Big of its own.
    fn error_counters(self) -> (&'static str, &'static str) {
        match self {
            Self::V4 => ("Icmp:OutDestUnreachs", "Icmp:InDestUnreachs"),
            Self::V6 => ("Icmp6OutPktTooBigs", "Icmp6InPktTooBigs"),
        }
    }

    fn metric(self, v4: Metric) -> Metric {
        match self {
            Self::V4 => v4,
            Self::V6 => Metric::Locked,
        }
    }

    fn ip_args(self, args: &[&str]) -> Vec<String> {
        let family = match self {
            Self::V4 => "-4",
            Self::V6 => "-6",
        };
        std::iter::once(family).chain(args.iter().copied()).map(str::to_owned).collect()
    }
}

/// Gives node 1's route `route` (as `ip route` arguments, the same route the lab made, or a new more
/// specific one) the lower MTU, then flushes the route caches of node 1 and of `sender`, so that no MTU
/// learnt earlier hides the ICMP.
fn lower_mtu(lab: &Lab, family: Family, route: &[String], sender: &str, metric: Metric) {
    let node = lab.node_ns(1);
    let mut args: Vec<String> = family.ip_args(&["route", "replace"]);
    args.extend_from_slice(route);
    args.push("mtu".into());
    if family.metric(metric) == Metric::Locked {
        args.push("lock".into());
    }
    args.push(LOW_MTU.into());
    ip_in(&node, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    for ns in [node.as_str(), sender] {
        let flush = family.ip_args(&["route", "flush", "cache"]);
        ip_in(ns, &flush.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    }
}

/// What one transfer over the lower-MTU hop must show, in order: node 1 (the hop) sent the error
/// ("fragmentation needed", or IPv6's Packet Too Big), the sender of the big segments received an ICMP
/// error, and then every byte arrived, at (or from) `backend`. `peer` is the address the sender sends to;
/// its learnt route is printed on failure.
fn assert_pmtu_transfer(
    lab: &Lab,
    family: Family,
    (hop, sender): (&Snapshot, &Snapshot),
    (sender_ns, peer): (&str, IpAddr),
    result: anyhow::Result<bulk::Transfer>,
    backend: &PodRef,
) {
    let learnt = ip_in(sender_ns, &["route", "get", &peer.to_string()]).unwrap_or_else(|e| format!("{e:#}"));
    let node1 = snmp::read(&lab.node_ns(1)).unwrap();
    let limited = (node1.get("Icmp:OutRateLimitHost"), node1.get("Icmp:OutRateLimitGlobal"));
    let (sent, received) = family.error_counters();
    assert!(
        rose(hop, sent) >= 1,
        "node 1 sent no {sent}: the big segments to {peer} did not meet its {LOW_MTU}-byte route (rate-limited: {limited:?}); the transfer: {result:?}"
    );
    assert!(
        rose(sender, received) >= 1,
        "the sender of the big segments to {peer} never got node 1's ICMP error; its route: {learnt}; the transfer: {result:?}"
    );
    let transfer = result
        .unwrap_or_else(|e| panic!("the transfer to {peer} did not complete: {e:#}; the sender's route: {learnt}"));
    assert_eq!(transfer.backend, backend.name, "{peer}");
    assert_eq!(transfer.bytes, TRANSFER, "{peer}: every byte must arrive");
}

/// Path MTU discovery through a ClusterIP, client to backend: node 1's route to node 2's pods has a lower
/// MTU, so node 1 answers the client pod's full-size segments with "fragmentation needed" (IPv6: Packet Too
/// Big, the only way an IPv6 sender learns a path MTU). That ICMP quotes the translated segment (to the
/// backend's address); the client's socket only recognises it if it quotes the ClusterIP. Without PMTU
/// the upload stalls. Both families, one after the other.
#[test]
fn a_tcp_upload_through_a_cluster_ip_completes_over_a_hop_with_a_lower_mtu() {
    let (lab, backend) = bulk_lab();
    let client = lab.pod(1, 1).clone();
    for family in Family::of(&lab) {
        let route = [family.node2_pods().to_owned(), "via".into(), family.node(2).to_string()];
        lower_mtu(&lab, family, &route, &client.ns, Metric::Plain);
        let (hop, sender) = (Snapshot::take(&lab.node_ns(1)).unwrap(), Snapshot::take(&client.ns).unwrap());
        let target = SocketAddr::new(family.vip(), 80);
        let result = bulk::upload(&client.ns, target, TRANSFER, TRANSFER_WITHIN);
        assert_pmtu_transfer(&lab, family, (&hop, &sender), (&client.ns, family.vip()), result, &backend);
    }
}

/// The same, backend to client: node 1's route to the client pod has the lower MTU, so the backend's
/// segments (the replies of a translated flow) draw the error, which must reach the backend quoting the
/// segment as the backend sent it.
#[test]
fn a_tcp_download_through_a_cluster_ip_completes_over_a_hop_with_a_lower_mtu() {
    let (lab, backend) = bulk_lab();
    let client = lab.pod(1, 1).clone();
    for family in Family::of(&lab) {
        let to_client = format!("{}/{}", family.pod(&client), family.host_prefix());
        let route = [to_client, "dev".into(), client.host_end.clone(), "src".into(), family.node(1).to_string()];
        lower_mtu(&lab, family, &route, &backend.ns, Metric::Plain);
        let (hop, sender) = (Snapshot::take(&lab.node_ns(1)).unwrap(), Snapshot::take(&backend.ns).unwrap());
        let result = bulk::download(&client.ns, SocketAddr::new(family.vip(), 80), TRANSFER, TRANSFER_WITHIN);
        let peer = family.pod(&client);
        assert_pmtu_transfer(&lab, family, (&hop, &sender), (&backend.ns, peer), result, &backend);
    }
}

/// Path MTU discovery for an external client's upload to a NodePort (DNAT to a backend on another node,
/// SNAT to node 1's address): node 1's route to that backend has the lower MTU. The ICMP must reach the
/// external client quoting its segment as sent, to node 1's NodePort.
#[test]
fn a_tcp_upload_to_a_node_port_completes_over_a_hop_with_a_lower_mtu() {
    let (lab, backend) = bulk_lab();
    let external = lab.external_ns();
    for family in Family::of(&lab) {
        let route = [family.node2_pods().to_owned(), "via".into(), family.node(2).to_string()];
        lower_mtu(&lab, family, &route, &external, Metric::Locked);
        let (hop, sender) = (Snapshot::take(&lab.node_ns(1)).unwrap(), Snapshot::take(&external).unwrap());
        let result = bulk::upload(&external, SocketAddr::new(family.node(1), 30120), TRANSFER, TRANSFER_WITHIN);
        assert_pmtu_transfer(&lab, family, (&hop, &sender), (&external, family.node(1)), result, &backend);
    }
}

/// A NodePort download to the external client: node 1's route to the client has the lower MTU, so the
/// backend's segments (after reverse NAT, on their way out) draw the error, which must reach the backend
/// quoting the segment as the backend sent it (to node 1's address).
#[test]
fn a_tcp_download_from_a_node_port_completes_over_a_hop_with_a_lower_mtu() {
    let (lab, backend) = bulk_lab();
    for family in Family::of(&lab) {
        let to_external = format!("{}/{}", family.external(), family.host_prefix());
        let route = [to_external, "dev".into(), "eth0".into(), "src".into(), family.node(1).to_string()];
        lower_mtu(&lab, family, &route, &backend.ns, Metric::Locked);
        let (hop, sender) = (Snapshot::take(&lab.node_ns(1)).unwrap(), Snapshot::take(&backend.ns).unwrap());
        let target = SocketAddr::new(family.node(1), 30120);
        let result = bulk::download(&lab.external_ns(), target, TRANSFER, TRANSFER_WITHIN);
        assert_pmtu_transfer(&lab, family, (&hop, &sender), (&backend.ns, family.node(1)), result, &backend);
    }
}

/// IPv4 options move the TCP header: a dataplane that takes the IP header to be 20 bytes reads ports and
/// checksums from the wrong place. Here every packet of the client's connection carries Record Route,
/// which fills the header's 40 option bytes (and which routers, and the server's replies, carry on). The
/// connection must work through a ClusterIP, and the options must reach the backend.
#[test]
fn tcp_with_ipv4_options_works_through_a_cluster_ip() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backend = lab.pod(2, 2).clone();
    lab.serve(&backend, &[8080], &[]).unwrap();
    let http = vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }];
    lab.write_manifest("svc.yaml", &Svc::new("options", vip(130), http).with_endpoints(&eps(&lab, &[(2, 2)]))).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).clone();

    let (sent, received) = (Capture::start(&client.ns).unwrap(), Capture::start(&backend.ns).unwrap());
    let result = echo::tcp_request_with_ip_options(&client.ns, at(vip(130), 80), echo::RECORD_ROUTE, TIMEOUT);
    let with_options = |capture: &Capture, to: SocketAddrV4| {
        let segments = capture.segments(Duration::from_millis(300));
        let n = segments.iter().filter(|s| s.to == SocketAddr::V4(to) && s.ip_header_len > 20).count();
        (n, segments)
    };
    let (n, segments) = with_options(&sent, at(vip(130), 80));
    assert!(n >= 1, "the client sent no segment with IP options to the ClusterIP: {segments:?}");
    let reply = result.unwrap_or_else(|e| panic!("a TCP request with IP options: {e:#}"));
    assert_eq!(reply.backend, backend.name);
    assert_eq!(*reply.seen_source.ip(), client.ip);
    let (n, segments) = with_options(&received, at(backend.ip, 8080));
    assert!(n >= 1, "no segment with IP options reached the backend's port 8080: {segments:?}");
}

/// IPv6's counterpart of IP options: extension headers between the fixed header and the transport header.
/// Every packet of the client's TCP connection and UDP exchange carries a Hop-by-Hop Options and a
/// Destination Options header (which the forwarding node and the backend process and skip). Through an IPv6
/// ClusterIP both must work, and the headers must reach the backend.
#[test]
fn tcp_and_udp_with_ipv6_extension_headers_work_through_a_cluster_ip() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backend = lab.pod(2, 2).clone();
    lab.serve6(&backend, &[8080]).unwrap();
    let ports = vec![
        Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
        Port { name: "dns", port: 53, protocol: "UDP", target_port: 8080 },
    ];
    let mut svc = Svc::new("ext-headers", vip(131), ports);
    svc.cluster_ip6 = Some(vip6(131));
    let v6 = [Endpoint::ready(backend.ip6.unwrap(), node_name(2))];
    lab.write_manifest("svc.yaml", &svc.with_endpoints_of_both_families(&eps(&lab, &[(2, 2)]), &v6)).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).clone();
    // IPv6 packets to `to` whose first extension header is Hop-by-Hop (next header 0 in the fixed header).
    let with_headers = |capture: &Capture, to: Ipv6Addr| {
        let packets = capture.packets(Duration::from_millis(300));
        packets.iter().filter(|p| p.len() > 40 && p[0] >> 4 == 6 && p[6] == 0 && p[24..40] == to.octets()).count()
    };
    for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
        let (sent, received) = (Capture::start(&client.ns).unwrap(), Capture::start(&backend.ns).unwrap());
        let target = SocketAddrV6::new(vip6(131), port, 0, 0);
        let result = echo6::request_with_extension_headers(&client.ns, proto, target, TIMEOUT);
        let n = with_headers(&sent, vip6(131));
        assert!(n >= 1, "{proto:?}: the client sent no packet with extension headers to the ClusterIP");
        let reply = result.unwrap_or_else(|e| panic!("{proto:?} with extension headers to {target}: {e:#}"));
        assert_eq!(reply.backend, backend.name, "{proto:?}");
        assert_eq!(Some(*reply.seen_source.ip()), client.ip6, "{proto:?}");
        let n = with_headers(&received, backend.ip6.unwrap());
        assert!(n >= 1, "{proto:?}: no packet with extension headers reached the backend");
    }
}

/// The TTL a datagram from pod 1-1 arrives with at `target`, through a UDP echo server that reads it.
fn ttl_at(ns: &str, target: SocketAddrV4) -> u8 {
    let reply = echo::request(ns, Proto::Udp, target, TIMEOUT).unwrap_or_else(|e| panic!("{target}: {e:#}"));
    reply.ttl.unwrap_or_else(|| panic!("{target}: the server reported no TTL: {reply:?}"))
}

/// The TTL every datagram from namespace `ns` starts with.
fn default_ttl(ns: &str) -> u8 {
    let counters = snmp::read(ns).unwrap();
    u8::try_from(counters["Ip:DefaultTTL"]).unwrap()
}

/// A lab serving UDP on pod 2-2 behind Service `ttl` (ClusterIP 10.32.0.140:53, NodePort 30140,
/// externalTrafficPolicy Cluster), sending no redirects; dual-stack where the lab is (the IPv6 server
/// returned).
fn ttl_lab() -> (Lab, PodRef, Option<echo6::Echo6>) {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    no_redirects(&lab);
    let backend = lab.pod(2, 2).clone();
    lab.serve(&backend, &[], &[UDP_PORT]).unwrap();
    let mut svc = Svc::new("ttl", vip(140), dns());
    svc.type_ = "NodePort";
    svc.node_ports = vec![30140];
    let (manifest, server6) = match backend.ip6 {
        Some(ip6) => {
            svc.cluster_ip6 = Some(vip6(140));
            let v6 = [Endpoint::ready(ip6, node_name(2))];
            let server = echo6::Echo6::start(&backend.ns, &backend.name, UDP_PORT).unwrap();
            (svc.with_endpoints_of_both_families(&eps(&lab, &[(2, 2)]), &v6), Some(server))
        }
        None => (svc.with_endpoints(&eps(&lab, &[(2, 2)])), None),
    };
    lab.write_manifest("ttl.yaml", &manifest).unwrap();
    lab.start_agents().unwrap();
    (lab, backend, server6)
}

/// The hop limit a UDP request to `target` from namespace `ns` arrived with, as the server reports it.
fn hop_limit_at(ns: &str, target: SocketAddrV6) -> u8 {
    let reply = echo6::udp(ns, target, TIMEOUT).unwrap_or_else(|e| panic!("{target}: {e:#}"));
    reply.hop_limit.unwrap_or_else(|| panic!("{target}: the server reported no hop limit: {reply:?}"))
}

/// Every router on the way decrements the TTL, and a Service adds no router and removes none: a datagram
/// through a ClusterIP must arrive with the TTL it has on the direct path to the same pod. (A node that
/// forwards without decrementing hides itself from traceroute and lets a routing loop run for ever.)
#[test]
fn a_datagram_through_a_cluster_ip_arrives_with_the_ttl_of_the_direct_path() {
    let (lab, backend, _server6) = ttl_lab();
    let client = lab.pod(1, 1).clone();
    let direct = ttl_at(&client.ns, at(backend.ip, UDP_PORT));
    // The direct path crosses two routers, node 1 and node 2.
    assert_eq!(direct, default_ttl(&client.ns) - 2, "pod 1-1 → pod 2-2 directly crosses two routers");
    assert_eq!(ttl_at(&client.ns, at(vip(140), 53)), direct, "through the ClusterIP");
}

/// The same for an external client at a NodePort (policy Cluster, backend on node 2), compared with the
/// external client's direct path to the pod over node 1. In the eBPF mode the NodePort datagrams must have
/// taken the XDP path, which forwards them itself.
#[test]
fn a_datagram_through_a_node_port_arrives_with_the_ttl_of_the_direct_path() {
    let (lab, backend, _server6) = ttl_lab();
    let external = lab.external_ns();
    ip_in(&external, &["route", "replace", "10.200.2.0/24", "via", &node_ip(1).to_string()]).unwrap();
    let direct = ttl_at(&external, at(backend.ip, UDP_PORT));
    assert_eq!(direct, default_ttl(&external) - 2, "the external client → pod 2-2 over node 1 crosses two routers");

    let xdp = proxy_lab::lab::mode() == "ebpf";
    let before = if xdp { lab.stats(1).unwrap() } else { Vec::new() };
    let via_node_port = ttl_at(&external, at(node_ip(1), 30140));
    if xdp {
        let forwarded = proxy_common::stats::XDP_TX_FORWARD as usize;
        let after = lab.stats(1).unwrap();
        assert!(
            after[forwarded] > before[forwarded],
            "the NodePort datagram did not take the XDP path: {before:?} → {after:?}"
        );
    }
    assert_eq!(via_node_port, direct, "through the NodePort");

    // IPv6: the hop limit, which XDP decrements as it forwards (`xdp_host6_snat`).
    let Some(ip6) = backend.ip6 else { return };
    ip_in(&external, &["-6", "route", "replace", "fd00:200:2::/64", "via", &node_ip6(1).to_string()]).unwrap();
    let direct = hop_limit_at(&external, SocketAddrV6::new(ip6, UDP_PORT, 0, 0));
    let initial: u8 = run("ip", &["netns", "exec", &external, "cat", "/proc/sys/net/ipv6/conf/eth0/hop_limit"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(direct, initial - 2, "IPv6: the external client → pod 2-2 over node 1 crosses two routers");
    let before = if xdp { lab.stats(1).unwrap() } else { Vec::new() };
    let via_node_port = hop_limit_at(&external, SocketAddrV6::new(node_ip6(1), 30140, 0, 0));
    if xdp {
        let forwarded = proxy_common::stats::XDP_TX_FORWARD as usize;
        let after = lab.stats(1).unwrap();
        assert!(after[forwarded] > before[forwarded], "the IPv6 NodePort datagram did not take the XDP path");
    }
    assert_eq!(via_node_port, direct, "IPv6: through the NodePort");
}

/// A process on a node sends datagram after datagram from one unconnected UDP socket (`sendto` each time)
/// to a ClusterIP, as a resolver does: one socket to one address is one flow, so every answer must come
/// from the same backend, and from the ClusterIP. Were each datagram balanced afresh, 20 answers from 3
/// backends would all agree with probability 3·(1/3)^20 < 1e-9.
#[test]
fn a_nodes_unconnected_udp_socket_keeps_one_backend_for_all_its_datagrams() {
    const DATAGRAMS: usize = 20;
    let client = std::path::Path::new(env!("CARGO_BIN_EXE_lab-client"));
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let backends = [(1, 2), (2, 1), (2, 2)];
    let mut servers6 = Vec::new();
    for &(n, k) in &backends {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[], &[UDP_PORT]).unwrap();
        if lab.dual_stack() {
            servers6.push(echo6::Echo6::start(&pod.ns, &pod.name, UDP_PORT).unwrap());
        }
    }
    let mut svc = Svc::new("flow", vip(150), dns());
    let manifest = if lab.dual_stack() {
        svc.cluster_ip6 = Some(vip6(150));
        let v6: Vec<Endpoint> =
            backends.iter().map(|&(n, k)| Endpoint::ready(lab.pod(n, k).ip6.unwrap(), node_name(n))).collect();
        svc.with_endpoints_of_both_families(&eps(&lab, &backends), &v6)
    } else {
        svc.with_endpoints(&eps(&lab, &backends))
    };
    lab.write_manifest("dns.yaml", &manifest).unwrap();
    lab.start_agents().unwrap();

    // IPv6 first: the same through the IPv6 ClusterIP (`sock_sendmsg6`, `sock_recvmsg6`, `SOCK_FLOWS6`).
    if lab.dual_stack() {
        let target = SocketAddrV6::new(vip6(150), 53, 0, 0).to_string();
        let out = lab.run_on_node(1, client, &["udp-flow", &target, "2000", &DATAGRAMS.to_string()]).unwrap();
        let answers: Vec<(&str, &str)> = out
            .lines()
            .map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["OK", backend, source] => (backend, source),
                _ => panic!("a datagram from node 1's IPv6 socket got {line:?}; all output:\n{out}"),
            })
            .collect();
        assert_eq!(answers.len(), DATAGRAMS, "{out}");
        let sources: BTreeSet<&str> = answers.iter().map(|a| a.1).collect();
        assert_eq!(sources.len(), 1, "the IPv6 datagrams came from more than one socket: {sources:?}");
        let answered_by: BTreeSet<&str> = answers.iter().map(|a| a.0).collect();
        assert_eq!(answered_by.len(), 1, "IPv6: one flow, one backend: {answered_by:?}");
    }

    let target = at(vip(150), 53).to_string();
    let out = lab.run_on_node(1, client, &["udp-flow", &target, "2000", &DATAGRAMS.to_string()]).unwrap();
    let replies: Vec<echo::Reply> = out
        .lines()
        .map(|line| match Outcome::from_client_output(line) {
            Outcome::Answered(reply) => reply,
            other => panic!("a datagram from node 1's socket got {other:?}; all output:\n{out}"),
        })
        .collect();
    assert_eq!(replies.len(), DATAGRAMS, "{out}");
    // The situation: one socket of node 1 itself (one source address and port, as every backend saw it).
    let sources: BTreeSet<SocketAddrV4> = replies.iter().map(|r| r.seen_source).collect();
    assert_eq!(sources.len(), 1, "the datagrams came from more than one socket: {sources:?}");
    assert!(sources.iter().all(|s| *s.ip() == node_ip(1)), "not node 1's own socket: {sources:?}");
    let answered_by: BTreeSet<&str> = replies.iter().map(|r| r.backend.as_str()).collect();
    assert_eq!(answered_by.len(), 1, "one flow, one backend: {answered_by:?}");
    drop(servers6);
}
