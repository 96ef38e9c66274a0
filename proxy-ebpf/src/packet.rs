//! Parsing the headers the service path needs: Ethernet, IPv4, and the ports of TCP, UDP and SCTP.

use aya_ebpf::programs::TcContext;
use proxy_common::proto;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offset of the IPv4 header checksum from the start of the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
/// Offsets of the source and destination ports; the same in TCP, UDP and SCTP.
pub const L4_SRC_OFF: usize = 0;
pub const L4_DST_OFF: usize = 2;
/// Fragment offset and "more fragments" bits of the IPv4 flags/fragment-offset field.
const IP_FRAG_MASK: u16 = 0x3fff;

/// The parts of an IPv4 packet the proxy reads and rewrites. Addresses and ports stay in network byte order.
#[derive(Clone, Copy)]
pub struct Flow {
    pub l3_off: usize,
    pub l4_off: usize,
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Head {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    src: u32,
    dst: u32,
}

/// Parses an Ethernet frame carrying IPv4 with TCP, UDP or SCTP.
///
/// Returns `None` for anything the proxy does not translate (other ethertypes, other protocols, and
/// non-first fragments, which carry no ports); those packets pass untouched.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Flow> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let l3_off = ETH_HLEN;
    let ip: Ipv4Head = ctx.load(l3_off).ok()?;
    if ip.version_ihl >> 4 != 4 {
        return None;
    }
    if u16::from_be(ip.frag_off) & IP_FRAG_MASK != 0 {
        return None;
    }
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    if !matches!(ip.proto, proto::TCP | proto::UDP | proto::SCTP) {
        return None;
    }
    let l4_off = l3_off + ihl;
    let ports: [u16; 2] = ctx.load(l4_off).ok()?;
    Some(Flow {
        l3_off,
        l4_off,
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: ports[0],
        dst_port: ports[1],
        proto: ip.proto,
    })
}
