//! Reading and writing packets from TC and XDP alike, and parsing the headers the service path needs:
//! Ethernet, IPv4, and the ports of TCP, UDP and SCTP.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
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

/// What the L4 checksum of a packet is, for incremental updates.
#[derive(Clone, Copy)]
pub struct L4Csum {
    pub off: usize,
    /// UDP: zero means "no checksum" and must stay zero; a computed zero is written as 0xffff.
    pub udp: bool,
}

/// A packet the service path can read and rewrite: a TC `__sk_buff` or an XDP buffer.
pub trait Packet {
    fn load<T: Copy>(&self, off: usize) -> Result<T, i64>;
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<(), i64>;
    /// Updates the IPv4 header checksum for a 4-byte field changing from `from` to `to`.
    fn l3_csum_replace(&self, off: usize, from: u32, to: u32) -> Result<(), i64>;
    /// Updates the L4 checksum for a field of `size` (2 or 4) bytes; `pseudo` if the field is an address,
    /// which the checksum covers through the pseudo-header.
    fn l4_csum_replace(&self, csum: L4Csum, from: u32, to: u32, size: u8, pseudo: bool) -> Result<(), i64>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, i64> {
        TcContext::load(self, off)
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<(), i64> {
        TcContext::store(self, off, value, 0)
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u32, to: u32) -> Result<(), i64> {
        TcContext::l3_csum_replace(self, off, u64::from(from), u64::from(to), 4)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, csum: L4Csum, from: u32, to: u32, size: u8, pseudo: bool) -> Result<(), i64> {
        // The helper also handles CHECKSUM_PARTIAL packets, whose field holds only the pseudo-header sum.
        let mut flags = u64::from(size);
        if pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if csum.udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        TcContext::l4_csum_replace(self, csum.off, u64::from(from), u64::from(to), flags)
    }
}

/// A bounds-checked pointer into an XDP packet, the form the verifier accepts for direct access.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, i64> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return Err(-1);
    }
    Ok((start + off) as *mut T)
}

/// One's-complement incremental update (RFC 1624, eqn. 3) of a checksum for a value changing from `from`
/// to `to`, all taken as native-order 16-bit words as they sit in memory.
#[inline(always)]
pub fn csum_update(csum: u16, from: u32, to: u32) -> u16 {
    let [f0, f1, f2, f3] = from.to_ne_bytes();
    let mut sum = u32::from(!csum);
    sum += u32::from(!u16::from_ne_bytes([f0, f1])) + u32::from(!u16::from_ne_bytes([f2, f3]));
    sum += (to & 0xffff) + (to >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let [s0, s1, _, _] = sum.to_ne_bytes();
    !u16::from_ne_bytes([s0, s1])
}

impl Packet for XdpContext {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, i64> {
        // SAFETY: `ptr_at` checked the whole value lies inside the packet; it may be unaligned.
        Ok(unsafe { ptr_at::<T>(self, off)?.read_unaligned() })
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<(), i64> {
        // SAFETY: as in `load`; XDP packet data is writable.
        unsafe { ptr_at::<T>(self, off)?.write_unaligned(*value) };
        Ok(())
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u32, to: u32) -> Result<(), i64> {
        let csum: u16 = self.load(off)?;
        self.store(off, &csum_update(csum, from, to))
    }

    #[inline(always)]
    fn l4_csum_replace(&self, csum: L4Csum, from: u32, to: u32, size: u8, _pseudo: bool) -> Result<(), i64> {
        // XDP sees whole frames with complete checksums, so the pseudo-header needs no special case.
        let current: u16 = self.load(csum.off)?;
        if csum.udp && current == 0 {
            return Ok(());
        }
        let (from, to) = if size == 2 { (from & 0xffff, to & 0xffff) } else { (from, to) };
        let mut updated = csum_update(current, from, to);
        if csum.udp && updated == 0 {
            updated = 0xffff;
        }
        self.store(csum.off, &updated)
    }
}

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

impl Flow {
    /// Where this flow's L4 checksum is, if it has one that covers addresses and ports. SCTP's `CRC32c`
    /// covers neither address, and a port change would need a full recompute.
    #[inline(always)]
    pub fn l4_csum(&self) -> Option<L4Csum> {
        match self.proto {
            proto::TCP => Some(L4Csum { off: self.l4_off + 16, udp: false }),
            proto::UDP => Some(L4Csum { off: self.l4_off + 6, udp: true }),
            _ => None,
        }
    }
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
pub fn parse<P: Packet>(pkt: &P) -> Option<Flow> {
    let ethertype = u16::from_be(pkt.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let l3_off = ETH_HLEN;
    let ip: Ipv4Head = pkt.load(l3_off).ok()?;
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
    let ports: [u16; 2] = pkt.load(l4_off).ok()?;
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

/// The TCP flags byte of a packet (0 for other protocols or if unreadable).
#[inline(always)]
pub fn tcp_flags<P: Packet>(pkt: &P, flow: &Flow) -> u8 {
    const TCP_FLAGS_OFF: usize = 13;
    if flow.proto != proto::TCP {
        return 0;
    }
    pkt.load::<u8>(flow.l4_off + TCP_FLAGS_OFF).unwrap_or(0)
}
