//! SCTP Services with real packets in the lab, in every mode and both families. This kernel has no SCTP
//! sockets, so the two ends are raw sockets of protocol 132 that speak the first two packets of an
//! association themselves: the client's INIT to a ClusterIP, and the backend's INIT ACK back. The INIT must
//! reach the backend's own address (DNAT) with its `CRC32c` still valid (it covers the ports, which stay,
//! and neither address), and the INIT ACK must reach the client from the ClusterIP (reverse NAT, which the
//! netfilter modes' conntrack does only for a reply its SCTP state machine accepts: the right verification
//! tag). (`sctp_prog_run.rs` holds the eBPF programs to the same on crafted frames.)

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use proxy_lab::{
    Lab, LabSpec,
    bpf::crc32c,
    lab::{Family, node_name},
    manifests::{Endpoint, Port, Svc},
    netns::in_netns,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const SCTP: i32 = 132;
const PORT: u16 = 9132;
const CLIENT_PORT: u16 = 40_132;
const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
/// The client's and the backend's initiate tags: each side's packets carry the other's as their
/// verification tag.
const CLIENT_TAG: u32 = 0x1122_3344;
const BACKEND_TAG: u32 = 0x5566_7788;
const WAIT: Duration = Duration::from_secs(2);

/// An SCTP packet: the common header (verification tag `vtag`) and one INIT or INIT ACK chunk carrying
/// `initiate_tag` (an INIT ACK with the State Cookie parameter it must have), `CRC32c` in place.
fn sctp_packet(sport: u16, dport: u16, vtag: u32, kind: u8, initiate_tag: u32) -> Vec<u8> {
    let mut chunk = vec![kind, 0, 0, 0];
    chunk.extend_from_slice(&initiate_tag.to_be_bytes());
    chunk.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    chunk.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    chunk.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    chunk.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    if kind == INIT_ACK {
        chunk.extend_from_slice(&[0, 7, 0, 8, 0xc0, 0x0c, 0x1e, 0x55]); // State Cookie, 4 bytes
    }
    let len = u16::try_from(chunk.len()).expect("a small chunk");
    chunk[2..4].copy_from_slice(&len.to_be_bytes());
    let mut p = Vec::with_capacity(12 + chunk.len());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&chunk);
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// An SCTP packet as received: from whom, its ports, verification tag, first chunk type and initiate tag,
/// and whether its `CRC32c` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Received {
    from: IpAddr,
    sport: u16,
    dport: u16,
    vtag: u32,
    kind: u8,
    initiate_tag: u32,
    crc_ok: bool,
}

impl Received {
    fn parse(from: IpAddr, sctp: &[u8]) -> Option<Self> {
        let word = |at: usize| Some(u32::from_be_bytes(sctp.get(at..at + 4)?.try_into().ok()?));
        let half = |at: usize| Some(u16::from_be_bytes(sctp.get(at..at + 2)?.try_into().ok()?));
        let mut zeroed = sctp.to_vec();
        zeroed.get_mut(8..12)?.fill(0);
        let crc_ok = crc32c(&zeroed).to_le_bytes() == sctp[8..12];
        Some(Self {
            from,
            sport: half(0)?,
            dport: half(2)?,
            vtag: word(4)?,
            kind: *sctp.get(12)?,
            initiate_tag: word(16)?,
            crc_ok,
        })
    }
}

/// A raw SCTP socket in namespace `ns`, of `family`.
fn raw_socket(ns: &str, family: Family) -> Socket {
    let domain = if family == Family::V4 { Domain::IPV4 } else { Domain::IPV6 };
    let socket = in_netns(ns, move || Socket::new(domain, Type::RAW, Some(Protocol::from(SCTP)))).unwrap().unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    socket
}

/// The first SCTP packet `socket` receives within [`WAIT`] that `wanted` accepts. An IPv4 raw socket
/// hands over the IP header too; an IPv6 one only the payload.
fn receive(socket: &Socket, wanted: impl Fn(&Received) -> bool) -> Option<Received> {
    let deadline = Instant::now() + WAIT;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    while Instant::now() < deadline {
        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
        // SAFETY: `recv_from` initialised the first `n` bytes.
        let bytes: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        let Some(from) = from.as_socket().map(|a| a.ip()) else { continue };
        let sctp = if from.is_ipv4() { bytes.get(usize::from(bytes[0] & 0x0f) * 4..) } else { Some(&bytes[..]) };
        if let Some(received) = sctp.and_then(|s| Received::parse(from, s)).filter(|r| wanted(r)) {
            return Some(received);
        }
    }
    None
}

fn send(socket: &Socket, to: IpAddr, packet: &[u8]) {
    let sent = socket.send_to(packet, &SockAddr::from(SocketAddr::new(to, 0))).unwrap();
    assert_eq!(sent, packet.len());
}

#[test]
fn an_sctp_init_through_a_cluster_ip_reaches_the_backend_and_its_answer_comes_from_the_service() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    let (client, backend) = (lab.pod(1, 1).clone(), lab.pod(2, 2).clone());
    let mut svc = Svc::new(
        "sctp",
        Ipv4Addr::new(10, 32, 0, 132),
        vec![Port { name: "sctp", port: PORT, protocol: "SCTP", target_port: PORT }],
    );
    svc.cluster_ip6 = Some(Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x132));
    let v4 = [Endpoint::ready(backend.ip, node_name(2))];
    let v6 = [Endpoint::ready(backend.ip6.expect("a dual-stack pod"), node_name(2))];
    lab.write_manifest("sctp.yaml", &svc.with_endpoints_of_both_families(&v4, &v6)).unwrap();
    lab.start_agents().unwrap();

    for family in Family::of(&lab) {
        let name = family.name();
        let vip: IpAddr = match family {
            Family::V4 => svc.cluster_ip.into(),
            Family::V6 => svc.cluster_ip6.expect("dual-stack").into(),
        };
        let client_addr = family.pod(&client);
        let (at_client, at_backend) = (raw_socket(&client.ns, family), raw_socket(&backend.ns, family));

        send(&at_client, vip, &sctp_packet(CLIENT_PORT, PORT, 0, INIT, CLIENT_TAG));
        let init = receive(&at_backend, |r| r.kind == INIT && r.dport == PORT)
            .unwrap_or_else(|| panic!("{name}: no INIT reached the backend through {vip}"));
        assert_eq!(
            (init.from, init.sport, init.initiate_tag, init.crc_ok),
            (client_addr, CLIENT_PORT, CLIENT_TAG, true),
            "{name}: the INIT arrives from the client, its CRC32c valid"
        );

        send(&at_backend, client_addr, &sctp_packet(PORT, CLIENT_PORT, CLIENT_TAG, INIT_ACK, BACKEND_TAG));
        let ack = receive(&at_client, |r| r.kind == INIT_ACK && r.dport == CLIENT_PORT)
            .unwrap_or_else(|| panic!("{name}: the backend's INIT ACK never reached the client"));
        assert_eq!(
            (ack.from, ack.sport, ack.vtag, ack.initiate_tag, ack.crc_ok),
            (vip, PORT, CLIENT_TAG, BACKEND_TAG, true),
            "{name}: the INIT ACK comes from the ClusterIP, whole"
        );
    }
}
