//! Raw TCP inside a pod: watch a connection's segments to learn its sequence numbers, then inject a
//! segment of its own into that connection. The lab uses it for the failure kube-proxy users know as
//! "Connection reset by peer due to invalid conntrack packets" (kubernetes/kubernetes#74839): a segment the
//! node's conntrack finds out of window is marked INVALID, skips reverse NAT, reaches the client from the
//! backend's own address, and the client's RST for it kills the backend's side of the connection.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::in_netns;

const TCP: u8 = 6;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// One TCP segment as seen on a pod's interface, either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The IP header's length in bytes: IPv4's 20, more when it carries options; IPv6's 40.
    pub ip_header_len: usize,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload_len: u32,
}

impl Segment {
    /// Parses an IPv4 packet carrying TCP, or an IPv6 one whose TCP header follows the fixed header;
    /// anything else is `None`.
    fn parse(packet: &[u8]) -> Option<Self> {
        let (ihl, src, dst, total): (usize, IpAddr, IpAddr, usize) = match packet.first()? >> 4 {
            4 => {
                let ihl = usize::from(packet.first()? & 0x0f) * 4;
                if *packet.get(9)? != TCP || ihl < 20 {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?])).min(packet.len());
                let addr = |at: usize| -> Option<IpAddr> {
                    Some(Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(at..at + 4)?).ok()?).into())
                };
                (ihl, addr(12)?, addr(16)?, total)
            }
            6 => {
                if *packet.get(6)? != TCP {
                    return None;
                }
                let total =
                    (40 + usize::from(u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]))).min(packet.len());
                let addr = |at: usize| -> Option<IpAddr> {
                    Some(Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(at..at + 16)?).ok()?).into())
                };
                (40, addr(8)?, addr(24)?, total)
            }
            _ => return None,
        };
        let tcp = packet.get(ihl..total)?;
        let word = |at: usize| Some(u32::from_be_bytes(tcp.get(at..at + 4)?.try_into().ok()?));
        let port = |at: usize| Some(u16::from_be_bytes(tcp.get(at..at + 2)?.try_into().ok()?));
        let header = usize::from(tcp.get(12)? >> 4) * 4;
        Some(Self {
            ip_header_len: ihl,
            from: SocketAddr::new(src, port(0)?),
            to: SocketAddr::new(dst, port(2)?),
            seq: word(4)?,
            ack: word(8)?,
            flags: *tcp.get(13)?,
            payload_len: u32::try_from(tcp.len().checked_sub(header)?).ok()?,
        })
    }

    /// The sequence number just after this segment's data: what the receiver acknowledges next.
    #[must_use]
    pub fn end(&self) -> u32 {
        self.seq.wrapping_add(self.payload_len)
    }
}

/// Every IPv4 packet into and out of one namespace, as TCP segments.
pub struct Capture {
    socket: Socket,
}

impl Capture {
    /// Starts capturing in namespace `ns` (a packet socket without link headers: both directions, every
    /// interface).
    pub fn start(ns: &str) -> anyhow::Result<Self> {
        // All protocols: the kernel hands outgoing packets only to such taps. `parse` keeps the TCP ones.
        let all = i32::from((u16::try_from(libc::ETH_P_ALL).expect("16-bit ethertype")).to_be());
        let socket = in_netns(ns, move || Socket::new(Domain::PACKET, Type::DGRAM, Some(Protocol::from(all))))?
            .with_context(|| format!("opening a packet socket in {ns}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self { socket })
    }

    /// The TCP segments captured so far, reading for at most `within`.
    #[must_use]
    pub fn segments(&self, within: Duration) -> Vec<Segment> {
        self.packets(within).iter().filter_map(|p| Segment::parse(p)).collect()
    }

    /// Every packet captured so far (from its network header), reading for at most `within`.
    #[must_use]
    pub fn packets(&self, within: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            match (&self.socket).read(&mut buf) {
                Ok(n) => out.push(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The read timeout: nothing more queued.
                Err(_) => break,
            }
        }
        out
    }
}

/// Sends IPv4 packets exactly as given (headers included: `IP_HDRINCL`) out of namespace `ns`, in order.
pub fn send_ipv4(ns: &str, packets: Vec<Vec<u8>>, gap: Duration) -> anyhow::Result<()> {
    let socket = in_netns(ns, || Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))))?
        .with_context(|| format!("opening a raw socket in {ns}"))?;
    for packet in packets {
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let sent = socket.send_to(&packet, &SockAddr::from(SocketAddrV4::new(dst, 0)))?;
        anyhow::ensure!(sent == packet.len(), "sent {sent} of {} bytes", packet.len());
        std::thread::sleep(gap);
    }
    Ok(())
}

/// Sends IPv6 packets exactly as given (headers included: an IPv6 raw socket of protocol `IPPROTO_RAW`)
/// out of namespace `ns`, in order.
pub fn send_ipv6(ns: &str, packets: Vec<Vec<u8>>, gap: Duration) -> anyhow::Result<()> {
    let socket = in_netns(ns, || Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))))?
        .with_context(|| format!("opening an IPv6 raw socket in {ns}"))?;
    for packet in packets {
        anyhow::ensure!(packet.len() >= 40 && packet[0] >> 4 == 6, "not an IPv6 packet");
        let dst: [u8; 16] = packet[24..40].try_into().expect("16 bytes");
        let sent = socket.send_to(&packet, &SockAddr::from(SocketAddrV6::new(Ipv6Addr::from(dst), 0, 0, 0)))?;
        anyhow::ensure!(sent == packet.len(), "sent {sent} of {} bytes", packet.len());
        std::thread::sleep(gap);
    }
    Ok(())
}

/// Sends one TCP segment with ACK and PSH set, from `from` to `to` (one family), out of namespace `ns` with
/// a raw socket: the pod's own TCP stack does not see it, the network does. `from` must be an address of
/// `ns`.
pub fn inject(
    ns: &str,
    from: impl Into<SocketAddr>,
    to: impl Into<SocketAddr>,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> anyhow::Result<()> {
    let (from, to) = (from.into(), to.into());
    let segment = tcp_segment(from, to, seq, ack, payload);
    let domain = if to.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let socket = in_netns(ns, move || Socket::new(domain, Type::RAW, Some(Protocol::TCP)))?
        .with_context(|| format!("opening a raw socket in {ns}"))?;
    // A raw socket's address has no port: the TCP header carries it.
    let sent = socket.send_to(&segment, &SockAddr::from(SocketAddr::new(to.ip(), 0)))?;
    anyhow::ensure!(sent == segment.len(), "sent {sent} of {} bytes", segment.len());
    Ok(())
}

/// A TCP header (20 bytes, no options) and payload, with its checksum over the pseudo-header of the
/// addresses' family.
fn tcp_segment(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(20 + payload.len());
    s.extend(from.port().to_be_bytes());
    s.extend(to.port().to_be_bytes());
    s.extend(seq.to_be_bytes());
    s.extend(ack.to_be_bytes());
    s.push(5 << 4);
    s.push(ACK | PSH);
    s.extend(512u16.to_be_bytes());
    s.extend([0, 0, 0, 0]);
    s.extend(payload);
    let checksum = internet_checksum(&with_pseudo_header(from.ip(), to.ip(), &s));
    s[16..18].copy_from_slice(&checksum.to_be_bytes());
    s
}

/// What a TCP checksum covers: the pseudo-header (IPv4's or IPv6's), then the segment.
fn with_pseudo_header(from: IpAddr, to: IpAddr, segment: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + segment.len());
    match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            out.extend(from.octets());
            out.extend(to.octets());
            out.extend([0, TCP]);
            out.extend(u16::try_from(segment.len()).expect("a small segment").to_be_bytes());
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            out.extend(from.octets());
            out.extend(to.octets());
            out.extend(u32::try_from(segment.len()).expect("a small segment").to_be_bytes());
            out.extend([0, 0, 0, TCP]);
        }
        _ => panic!("a segment from {from} to {to} mixes families"),
    }
    out.extend(segment);
    out
}

/// RFC 1071: the one's complement of the one's-complement sum of 16-bit words.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn octets(addr: IpAddr) -> Vec<u8> {
        match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    #[test]
    fn a_built_segment_parses_back_and_its_checksum_verifies() {
        let (from, to): (SocketAddr, SocketAddr) =
            ("10.200.2.12:8080".parse().unwrap(), "10.200.1.11:40000".parse().unwrap());
        let tcp = tcp_segment(from, to, 7, 9, b"boom\n");
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, TCP, 0, 0];
        packet.extend(octets(from.ip()));
        packet.extend(octets(to.ip()));
        packet.extend(&tcp);
        let total = u16::try_from(packet.len()).unwrap();
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        let parsed = Segment::parse(&packet).unwrap();
        assert_eq!((parsed.from, parsed.to, parsed.seq, parsed.ack, parsed.payload_len), (from, to, 7, 9, 5));
        assert_eq!(parsed.flags, ACK | PSH);
        assert_eq!(parsed.ip_header_len, 20);
        // Summed with its checksum in place, a correct segment gives all ones (complemented: zero).
        assert_eq!(internet_checksum(&with_pseudo_header(from.ip(), to.ip(), &tcp)), 0);
    }

    #[test]
    fn an_ipv6_segment_parses_back_and_its_checksum_verifies() {
        let (from, to): (SocketAddr, SocketAddr) =
            ("[fd00:200:2::2]:8080".parse().unwrap(), "[fd00:200:1::1]:40000".parse().unwrap());
        let tcp = tcp_segment(from, to, 7, 9, b"boom\n");
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend(u16::try_from(tcp.len()).unwrap().to_be_bytes());
        packet.extend([TCP, 64]);
        packet.extend(octets(from.ip()));
        packet.extend(octets(to.ip()));
        packet.extend(&tcp);
        let parsed = Segment::parse(&packet).unwrap();
        assert_eq!((parsed.from, parsed.to, parsed.seq, parsed.ack, parsed.payload_len), (from, to, 7, 9, 5));
        assert_eq!(parsed.ip_header_len, 40);
        assert_eq!(internet_checksum(&with_pseudo_header(from.ip(), to.ip(), &tcp)), 0);
    }
}
