//! ICMP and `ICMPv6` errors about a Service flow, translated by the real programs on crafted frames
//! (`BPF_PROG_TEST_RUN`), with every checksum recomputed here from scratch: the error's own (`ICMPv6`'s
//! with its pseudo-header), the quoted IP header's (IPv4), and the quoted TCP segment's, which no kernel on
//! the way checks, so only a test that recomputes it can tell a wrong incremental update.
//!
//! Both directions of both families: an error on its way to the client about the client → backend leg
//! (egress: the quote's destination becomes the ClusterIP again) and one on its way to the backend about
//! the backend → client leg (ingress: the quote's source becomes the backend again); the lab's PMTU tests
//! cover only the first with real sockets. The Service's port and the backend's differ, so ports change
//! with the addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{maps::HashMap, programs::SchedClassifier};
use proxy_common::{
    addr::In6,
    backend::Backend,
    pod::MapAddress,
    proto,
    revnat::RevNat,
    service::{SCOPE_EXTERNAL, ServiceKey, ServiceValue},
};
use proxy_lab::bpf::{inet_checksum, load_tc, run_once};

const PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40_000;
const TC_ACT_OK: u32 = 0;
const REV_NAT_ID: u32 = 7;
const BACKEND_ID: u32 = 3;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// One family's addresses: the client, the ClusterIP, the backend, and a router beyond the node that
/// sends the errors.
struct Addrs {
    client: IpAddr,
    vip: IpAddr,
    backend: IpAddr,
    router: IpAddr,
}

fn v4() -> Addrs {
    Addrs {
        client: Ipv4Addr::new(10, 200, 1, 11).into(),
        vip: Ipv4Addr::new(10, 32, 0, 31).into(),
        backend: Ipv4Addr::new(10, 200, 2, 12).into(),
        router: Ipv4Addr::new(10, 240, 0, 99).into(),
    }
}

fn v6() -> Addrs {
    Addrs {
        client: Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 1).into(),
        vip: Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x31).into(),
        backend: Ipv6Addr::new(0xfd00, 0x200, 2, 0, 0, 0, 0, 2).into(),
        router: Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0x99).into(),
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The checksum of an upper-layer `segment` of protocol `next` between `src` and `dst`, its own checksum
/// field counted as it is (zero it first to compute one; a valid segment sums to zero). `ICMP` (IPv4) has
/// no pseudo-header; every other protocol here has its family's.
fn l4_checksum(src: IpAddr, dst: IpAddr, next: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::new();
    let len = u32::try_from(segment.len()).unwrap();
    match (src, next) {
        (IpAddr::V4(_), 1) => {}
        (IpAddr::V4(_), _) => {
            data.extend(octets(src));
            data.extend(octets(dst));
            data.extend([0, next]);
            data.extend(u16::try_from(len).unwrap().to_be_bytes());
        }
        (IpAddr::V6(_), _) => {
            data.extend(octets(src));
            data.extend(octets(dst));
            data.extend(len.to_be_bytes());
            data.extend([0, 0, 0, next]);
        }
    }
    data.extend_from_slice(segment);
    inet_checksum(&data)
}

/// A TCP segment (20-byte header, no payload) with a valid checksum.
fn tcp(src: (IpAddr, u16), dst: (IpAddr, u16), flags: u8) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend(src.1.to_be_bytes());
    seg.extend(dst.1.to_be_bytes());
    seg.extend(0x1000_0000u32.to_be_bytes()); // sequence
    seg.extend(0u32.to_be_bytes()); // acknowledgment
    seg.extend([0x50, flags]); // data offset 5 words
    seg.extend(64_240u16.to_be_bytes()); // window
    seg.extend([0, 0, 0, 0]); // checksum, urgent pointer
    let csum = l4_checksum(src.0, dst.0, proto::TCP, &seg);
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    seg
}

/// An IP packet of `src`'s family around `payload` of protocol `next` (IPv4 with a valid header
/// checksum).
fn ip(src: IpAddr, dst: IpAddr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = match src {
        IpAddr::V4(_) => {
            let total = u16::try_from(20 + payload.len()).unwrap();
            let mut h = vec![0x45, 0];
            h.extend(total.to_be_bytes());
            h.extend([0, 1, 0x40, 0, 64, next, 0, 0]);
            h.extend(octets(src));
            h.extend(octets(dst));
            let csum = inet_checksum(&h);
            h[10..12].copy_from_slice(&csum.to_be_bytes());
            h
        }
        IpAddr::V6(_) => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
            h.extend([next, 64]);
            h.extend(octets(src));
            h.extend(octets(dst));
            h
        }
    };
    packet.extend_from_slice(payload);
    packet
}

fn frame(packet: &[u8]) -> Vec<u8> {
    let ethertype: [u8; 2] = if packet[0] >> 4 == 6 { [0x86, 0xdd] } else { [0x08, 0x00] };
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    f.extend(ethertype);
    f.extend_from_slice(packet);
    f
}

/// An error from `from` to `to` quoting `quoted` whole: IPv4's "fragmentation needed" (MTU 1400), IPv6's
/// Packet Too Big (MTU 1400), with a valid checksum.
fn path_mtu_error(from: IpAddr, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let (next, head) = match from {
        IpAddr::V4(_) => (1, [3, 4, 0, 0, 0, 0, 0x05, 0x78]),
        IpAddr::V6(_) => (58, [2, 0, 0, 0, 0, 0, 0x05, 0x78]),
    };
    let mut msg = head.to_vec();
    msg.extend_from_slice(quoted);
    let csum = l4_checksum(from, to, next, &msg);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    frame(&ip(from, to, next, &msg))
}

/// An IP header as read back: its addresses, where its payload starts, and (IPv4) whether its checksum holds.
struct IpHeader {
    src: IpAddr,
    dst: IpAddr,
    payload: usize,
    checksum_ok: bool,
}

fn read_ip(bytes: &[u8], at: usize) -> IpHeader {
    let b = &bytes[at..];
    if b[0] >> 4 == 6 {
        let addr = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&b[o..o + 16]).unwrap());
        IpHeader { src: addr(8), dst: addr(24), payload: at + 40, checksum_ok: true }
    } else {
        let addr = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&b[o..o + 4]).unwrap());
        IpHeader { src: addr(12), dst: addr(16), payload: at + 20, checksum_ok: inet_checksum(&b[..20]) == 0 }
    }
}

/// What a translated error says: its own addresses, the quoted segment's ends, and whether each checksum
/// holds.
#[derive(Debug, PartialEq, Eq)]
struct Error {
    outer: (IpAddr, IpAddr),
    quoted_from: (IpAddr, u16),
    quoted_to: (IpAddr, u16),
    checksums_ok: [bool; 4],
}

fn read_error(f: &[u8]) -> Error {
    let outer = read_ip(f, 14);
    let icmp = &f[outer.payload..];
    let next = if outer.src.is_ipv6() { 58 } else { 1 };
    let inner = read_ip(f, outer.payload + 8);
    let seg = &f[inner.payload..];
    let port = |o: usize| u16::from_be_bytes([seg[o], seg[o + 1]]);
    Error {
        outer: (outer.src, outer.dst),
        quoted_from: (inner.src, port(0)),
        quoted_to: (inner.dst, port(2)),
        checksums_ok: [
            outer.checksum_ok,
            l4_checksum(outer.src, outer.dst, next, icmp) == 0,
            inner.checksum_ok,
            l4_checksum(inner.src, inner.dst, proto::TCP, seg) == 0,
        ],
    }
}

/// Slot 0 then slot 1 of a frontend with one backend, as the agent writes them (slot 0 last).
fn slots() -> [(u16, ServiceValue); 2] {
    let slot =
        |backend_id, count| ServiceValue { backend_id, rev_nat_id: REV_NAT_ID, count, flags: 0, affinity_timeout: 0 };
    [(1, slot(BACKEND_ID, 0)), (0, slot(0, 1))]
}

/// Writes the ClusterIP `vip:PORT` → `backend:BACKEND_PORT` (TCP) into one family's maps.
fn write_service<A: MapAddress + Copy>(ebpf: &mut aya::Ebpf, names: [&str; 3], vip: A, backend: A) {
    let mut services: HashMap<_, ServiceKey<A>, ServiceValue> =
        HashMap::try_from(ebpf.map_mut(names[0]).unwrap()).unwrap();
    for (slot, value) in slots() {
        let key = ServiceKey::new(vip, PORT.to_be(), proto::TCP, SCOPE_EXTERNAL, slot);
        services.insert(&key, &value, 0).unwrap();
    }
    let mut backends: HashMap<_, u32, Backend<A>> = HashMap::try_from(ebpf.map_mut(names[1]).unwrap()).unwrap();
    let value = Backend { addr: backend, port: BACKEND_PORT.to_be(), proto: proto::TCP, flags: 0 };
    backends.insert(&BACKEND_ID, &value, 0).unwrap();
    let mut revnat: HashMap<_, u32, RevNat<A>> = HashMap::try_from(ebpf.map_mut(names[2]).unwrap()).unwrap();
    revnat.insert(&REV_NAT_ID, &RevNat { addr: vip, port: PORT.to_be(), pad: 0 }, 0).unwrap();
}

fn errors_about_a_cluster_ip_flow_are_translated_back(a: &Addrs) {
    let (mut ebpf, _pins) =
        load_tc(&["tc_pod_ingress", "tc_pod_egress", "tc_pod_ingress6", "tc_pod_egress6"]).expect("object");
    match (a.vip, a.backend) {
        (IpAddr::V4(vip), IpAddr::V4(backend)) => {
            let be = |x: Ipv4Addr| u32::from_ne_bytes(x.octets());
            write_service::<u32>(&mut ebpf, ["SERVICES", "BACKENDS", "REVNAT"], be(vip), be(backend));
        }
        (IpAddr::V6(vip), IpAddr::V6(backend)) => {
            let in6 = |x: Ipv6Addr| In6::from_octets(x.octets());
            write_service::<In6>(&mut ebpf, ["SERVICES6", "BACKENDS6", "REVNAT6"], in6(vip), in6(backend));
        }
        _ => unreachable!("one family"),
    }
    let ingress: &SchedClassifier = ebpf.program("tc_pod_ingress").unwrap().try_into().unwrap();
    let egress: &SchedClassifier = ebpf.program("tc_pod_egress").unwrap().try_into().unwrap();
    let client = (a.client, CLIENT_PORT);

    // The situation: the client's SYN is DNATed, so the flow has its conntrack entries.
    let syn = frame(&ip(a.client, a.vip, proto::TCP, &tcp(client, (a.vip, PORT), TCP_SYN)));
    let (verdict, out) = run_once(ingress, &syn).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let dnat = read_ip(&out, 14);
    assert_eq!((dnat.src, dnat.dst), (a.client, a.backend), "the SYN is DNATed to the backend");

    // Towards the client, about the client → backend leg (as a router past the node sends it): the quote
    // shows the ClusterIP again, and the error comes from it, as netfilter's NAT rewrites it.
    let segment = ip(a.client, a.backend, proto::TCP, &tcp(client, (a.backend, BACKEND_PORT), TCP_ACK));
    let error = path_mtu_error(a.router, a.client, &segment);
    assert_eq!(read_error(&error).checksums_ok, [true; 4], "the crafted error itself is valid");
    let (verdict, out) = run_once(egress, &error).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let got = read_error(&out);
    assert_eq!(
        got,
        Error { outer: (a.vip, a.client), quoted_from: client, quoted_to: (a.vip, PORT), checksums_ok: [true; 4] },
        "egress: an error to the client about its segment to the backend"
    );

    // Towards the backend, about the backend → client leg (the reply left the node from the ClusterIP):
    // the quote shows the backend again, and the error goes to it.
    let reply = ip(a.vip, a.client, proto::TCP, &tcp((a.vip, PORT), client, TCP_SYN | TCP_ACK));
    let error = path_mtu_error(a.router, a.vip, &reply);
    let (verdict, out) = run_once(ingress, &error).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let got = read_error(&out);
    assert_eq!(
        got,
        Error {
            outer: (a.router, a.backend),
            quoted_from: (a.backend, BACKEND_PORT),
            quoted_to: client,
            checksums_ok: [true; 4],
        },
        "ingress: an error to the backend about its reply to the client"
    );

    // An error about a flow no Service translated passes bit-identical.
    let other = ip(a.client, a.router, proto::TCP, &tcp(client, (a.router, PORT), TCP_ACK));
    let error = path_mtu_error(a.router, a.client, &other);
    assert_eq!(run_once(egress, &error).unwrap(), (TC_ACT_OK, error));
}

#[test]
fn icmp_errors_about_an_ipv4_cluster_ip_flow_are_translated_back_with_valid_checksums() {
    errors_about_a_cluster_ip_flow_are_translated_back(&v4());
}

#[test]
fn icmpv6_errors_about_an_ipv6_cluster_ip_flow_are_translated_back_with_valid_checksums() {
    errors_about_a_cluster_ip_flow_are_translated_back(&v6());
}
