//! SCTP Services, proven with crafted packets through the real programs (`BPF_PROG_TEST_RUN`): this kernel
//! has no SCTP sockets. A client's INIT to a ClusterIP is DNATed to the backend, the reply gets the
//! ClusterIP back as its source, the IPv4 checksum stays right, and the SCTP `CRC32c` (which covers neither
//! address) stays valid. In both families: IPv6 frames go in at the same programs, which hand them to the
//! IPv6 ones (`tc_pod_ingress6`, `tc_pod_egress6`) by a tail call.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{Ebpf, maps::HashMap, programs::SchedClassifier};
use proxy_common::{
    addr::In6,
    backend::{Backend, Backend6},
    proto,
    revnat::{RevNat, RevNat6},
    service::{SCOPE_EXTERNAL, ServiceKey, ServiceKey6, ServiceValue},
};
use proxy_lab::bpf::{crc32c, inet_checksum, load_tc, run_once};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 11);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 30);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 12);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x30);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 2, 0, 0, 0, 0, 2);
const PORT: u16 = 2905;
const CLIENT_PORT: u16 = 40_000;
const TC_ACT_OK: u32 = 0;
/// The frontend's reverse-NAT id and its backend's id in the maps.
const REV_NAT_ID: u32 = 7;
const BACKEND_ID: u32 = 3;

fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Ethernet + IPv4 or IPv6 + SCTP common header + an INIT chunk, with correct checksums.
fn sctp_init(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&sport.to_be_bytes());
    sctp.extend_from_slice(&dport.to_be_bytes());
    sctp.extend_from_slice(&0u32.to_be_bytes()); // verification tag: 0 in an INIT
    sctp.extend_from_slice(&[0; 4]); // checksum, filled below
    // INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, outbound/inbound streams, initial TSN
    sctp.extend_from_slice(&[1, 0, 0, 20]);
    sctp.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    sctp.extend_from_slice(&65_535u32.to_be_bytes());
    sctp.extend_from_slice(&[0, 10, 0, 10]);
    sctp.extend_from_slice(&1u32.to_be_bytes());
    let crc = crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());

    let (ethertype, ip) = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = u16::try_from(20 + sctp.len()).unwrap();
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto::SCTP, 0, 0]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            let csum = inet_checksum(&ip);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            ([0x08, 0x00], ip)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            // Version 6, no traffic class or flow label, payload length, next header SCTP, hop limit 64.
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&u16::try_from(sctp.len()).unwrap().to_be_bytes());
            ip.extend_from_slice(&[proto::SCTP, 64]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            ([0x86, 0xdd], ip)
        }
        _ => panic!("{src} and {dst} are of different families"),
    };
    let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    frame.extend(ethertype);
    frame.extend(ip);
    frame.extend(sctp);
    frame
}

struct Parsed {
    src: IpAddr,
    dst: IpAddr,
    /// IPv4's header checksum (IPv6 has none: always true).
    ip_checksum_ok: bool,
    sctp_checksum_ok: bool,
}

fn parse(frame: &[u8]) -> Parsed {
    let (src, dst, ip_checksum_ok, sctp) = if frame[12..14] == [0x86, 0xdd] {
        let ip = &frame[14..54];
        let addr = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
        (addr(8), addr(24), true, &frame[54..])
    } else {
        let ip = &frame[14..34];
        let addr = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&ip[o..o + 4]).unwrap());
        (addr(12), addr(16), inet_checksum(ip) == 0, &frame[34..])
    };
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    Parsed { src, dst, ip_checksum_ok, sctp_checksum_ok: crc32c(&zeroed).to_le_bytes() == sctp[8..12] }
}

fn run(prog: &SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    run_once(prog, frame).expect("BPF_PROG_TEST_RUN")
}

/// A ClusterIP's frontend with one backend (slot 1), as the agent writes slots: slot 0 last.
fn slots() -> [(u16, ServiceValue); 2] {
    let slot0 = ServiceValue { backend_id: 0, rev_nat_id: REV_NAT_ID, count: 1, flags: 0, affinity_timeout: 0 };
    let slot1 =
        ServiceValue { backend_id: BACKEND_ID, rev_nat_id: REV_NAT_ID, count: 0, flags: 0, affinity_timeout: 0 };
    [(1, slot1), (0, slot0)]
}

/// The client's INIT through `ingress` is DNATed to `backend`, the backend's reply through `egress` gets
/// `vip` back, with valid checksums both ways; a packet to another address passes untouched.
fn translated_both_ways(
    ebpf: &Ebpf,
    (ingress, egress): (&str, &str),
    client: IpAddr,
    vip: IpAddr,
    backend: IpAddr,
    other: IpAddr,
) {
    let ingress: &SchedClassifier = ebpf.program(ingress).unwrap().try_into().unwrap();
    let init = sctp_init(client, vip, CLIENT_PORT, PORT);
    assert!(parse(&init).sctp_checksum_ok && parse(&init).ip_checksum_ok, "the crafted packet itself is valid");
    let (verdict, out) = run(ingress, &init);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.dst), (client, backend), "DNAT to the backend");
    assert!(p.ip_checksum_ok, "IP checksum after DNAT");
    assert!(p.sctp_checksum_ok, "SCTP CRC32c after DNAT");

    let egress: &SchedClassifier = ebpf.program(egress).unwrap().try_into().unwrap();
    let reply = sctp_init(backend, client, PORT, CLIENT_PORT);
    let (verdict, out) = run(egress, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.dst), (vip, client), "reverse NAT to the ClusterIP");
    assert!(p.ip_checksum_ok && p.sctp_checksum_ok, "checksums after reverse NAT");

    // Traffic that is not to a frontend passes untouched.
    let other = sctp_init(client, other, CLIENT_PORT, PORT);
    let (verdict, out) = run(ingress, &other);
    assert_eq!((verdict, out), (TC_ACT_OK, other));
}

#[test]
fn sctp_to_a_cluster_ip_is_translated_both_ways_with_valid_checksums() {
    let (mut ebpf, _pins) = load_tc(&["tc_pod_ingress", "tc_pod_egress"]).expect("object");
    {
        let mut services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(ebpf.map_mut("SERVICES").unwrap()).unwrap();
        for (slot, value) in slots() {
            services
                .insert(&ServiceKey::new(be(VIP), PORT.to_be(), proto::SCTP, SCOPE_EXTERNAL, slot), &value, 0)
                .unwrap();
        }
        let mut backends: HashMap<_, u32, Backend> = HashMap::try_from(ebpf.map_mut("BACKENDS").unwrap()).unwrap();
        let backend = Backend { addr: be(BACKEND), port: PORT.to_be(), proto: proto::SCTP, flags: 0 };
        backends.insert(&BACKEND_ID, &backend, 0).unwrap();
        let mut revnat: HashMap<_, u32, RevNat> = HashMap::try_from(ebpf.map_mut("REVNAT").unwrap()).unwrap();
        revnat.insert(&REV_NAT_ID, &RevNat { addr: be(VIP), port: PORT.to_be(), pad: 0 }, 0).unwrap();
    }
    let other = Ipv4Addr::new(10, 200, 2, 99);
    translated_both_ways(
        &ebpf,
        ("tc_pod_ingress", "tc_pod_egress"),
        CLIENT.into(),
        VIP.into(),
        BACKEND.into(),
        other.into(),
    );
}

#[test]
fn sctp_to_an_ipv6_cluster_ip_is_translated_both_ways_with_a_valid_crc() {
    // `load_tc` fills the IPv6 programs' table as the agent does: the IPv4 programs hand IPv6 frames on to them.
    let (mut ebpf, _pins) =
        load_tc(&["tc_pod_ingress", "tc_pod_egress", "tc_pod_ingress6", "tc_pod_egress6"]).expect("object");
    let in6 = |a: Ipv6Addr| In6::from_octets(a.octets());
    {
        let mut services: HashMap<_, ServiceKey6, ServiceValue> =
            HashMap::try_from(ebpf.map_mut("SERVICES6").unwrap()).unwrap();
        for (slot, value) in slots() {
            services
                .insert(&ServiceKey::new(in6(VIP6), PORT.to_be(), proto::SCTP, SCOPE_EXTERNAL, slot), &value, 0)
                .unwrap();
        }
        let mut backends: HashMap<_, u32, Backend6> = HashMap::try_from(ebpf.map_mut("BACKENDS6").unwrap()).unwrap();
        let backend = Backend { addr: in6(BACKEND6), port: PORT.to_be(), proto: proto::SCTP, flags: 0 };
        backends.insert(&BACKEND_ID, &backend, 0).unwrap();
        let mut revnat: HashMap<_, u32, RevNat6> = HashMap::try_from(ebpf.map_mut("REVNAT6").unwrap()).unwrap();
        revnat.insert(&REV_NAT_ID, &RevNat { addr: in6(VIP6), port: PORT.to_be(), pad: 0 }, 0).unwrap();
    }
    let other = Ipv6Addr::new(0xfd00, 0x200, 2, 0, 0, 0, 0, 0x99);
    translated_both_ways(
        &ebpf,
        ("tc_pod_ingress", "tc_pod_egress"),
        CLIENT6.into(),
        VIP6.into(),
        BACKEND6.into(),
        other.into(),
    );
}
