//! SCTP Services, proven with crafted packets through the real programs (`BPF_PROG_TEST_RUN`): this kernel
//! has no SCTP sockets. A client's INIT to a ClusterIP is DNATed to the backend, the reply gets the
//! ClusterIP back as its source, the IPv4 checksum stays right, and the SCTP `CRC32c` (which covers neither
//! address) stays valid.

use std::net::Ipv4Addr;

use aya::{
    EbpfLoader,
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use proxy_common::{
    backend::Backend,
    proto,
    revnat::RevNat,
    service::{SCOPE_EXTERNAL, ServiceKey, ServiceValue},
};
use proxy_lab::bpf::{PrivateBpffs, crc32c, inet_checksum, object};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 11);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 30);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 12);
const PORT: u16 = 2905;
const CLIENT_PORT: u16 = 40_000;
const TC_ACT_OK: u32 = 0;

fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Ethernet + IPv4 + SCTP common header + an INIT chunk, with correct checksums.
fn sctp_init(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
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

    let total = u16::try_from(20 + sctp.len()).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto::SCTP, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());

    let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    frame.extend(ip);
    frame.extend(sctp);
    frame
}

struct Parsed {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ip_checksum_ok: bool,
    sctp_checksum_ok: bool,
}

fn parse(frame: &[u8]) -> Parsed {
    let ip = &frame[14..34];
    let sctp = &frame[34..];
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    Parsed {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ip_checksum_ok: inet_checksum(ip) == 0,
        sctp_checksum_ok: crc32c(&zeroed).to_le_bytes() == sctp[8..12],
    }
}

fn run(prog: &SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let result = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

#[test]
fn sctp_to_a_cluster_ip_is_translated_both_ways_with_valid_checksums() {
    let object = object().expect("eBPF object");
    let pins = PrivateBpffs::mount().expect("bpffs");
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins.path()).load_file(&object).expect("load object");
    for name in ["tc_pod_ingress", "tc_pod_egress"] {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
    }
    {
        let mut services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(ebpf.map_mut("SERVICES").unwrap()).unwrap();
        let slot0 = ServiceValue { backend_id: 0, rev_nat_id: 7, count: 1, flags: 0, affinity_timeout: 0 };
        let slot1 = ServiceValue { backend_id: 3, rev_nat_id: 7, count: 0, flags: 0, affinity_timeout: 0 };
        let key = |slot| ServiceKey::new(be(VIP), PORT.to_be(), proto::SCTP, SCOPE_EXTERNAL, slot);
        services.insert(&key(1), &slot1, 0).unwrap();
        services.insert(&key(0), &slot0, 0).unwrap();
        let mut backends: HashMap<_, u32, Backend> = HashMap::try_from(ebpf.map_mut("BACKENDS").unwrap()).unwrap();
        backends
            .insert(&3, &Backend { addr: be(BACKEND), port: PORT.to_be(), proto: proto::SCTP, flags: 0 }, 0)
            .unwrap();
        let mut revnat: HashMap<_, u32, RevNat> = HashMap::try_from(ebpf.map_mut("REVNAT").unwrap()).unwrap();
        revnat.insert(&7, &RevNat { addr: be(VIP), port: PORT.to_be(), pad: 0 }, 0).unwrap();
    }

    let ingress: &SchedClassifier = ebpf.program("tc_pod_ingress").unwrap().try_into().unwrap();
    let init = sctp_init(CLIENT, VIP, CLIENT_PORT, PORT);
    assert!(parse(&init).sctp_checksum_ok && parse(&init).ip_checksum_ok, "the crafted packet itself is valid");
    let (verdict, out) = run(ingress, &init);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.dst), (CLIENT, BACKEND), "DNAT to the backend");
    assert!(p.ip_checksum_ok, "IPv4 checksum after DNAT");
    assert!(p.sctp_checksum_ok, "SCTP CRC32c after DNAT");

    let egress: &SchedClassifier = ebpf.program("tc_pod_egress").unwrap().try_into().unwrap();
    let reply = sctp_init(BACKEND, CLIENT, PORT, CLIENT_PORT);
    let (verdict, out) = run(egress, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.dst), (VIP, CLIENT), "reverse NAT to the ClusterIP");
    assert!(p.ip_checksum_ok && p.sctp_checksum_ok, "checksums after reverse NAT");

    // Traffic that is not to a frontend passes untouched.
    let other = sctp_init(CLIENT, Ipv4Addr::new(10, 200, 2, 99), CLIENT_PORT, PORT);
    let (verdict, out) = run(ingress, &other);
    assert_eq!((verdict, out), (TC_ACT_OK, other));
}
