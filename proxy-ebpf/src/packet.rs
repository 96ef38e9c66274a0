//! Reading and writing packets from TC and XDP alike, and parsing the headers the service path needs:
//! Ethernet, IPv4 (with options and fragments), IPv6 (with its extension headers and fragments), the ports
//! of TCP, UDP and SCTP, and the packet an ICMP error quotes.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use proxy_common::{addr::In6, proto};

use crate::{
    drop::{PACKET_TOO_SHORT, REWRITE_FAILED, Result},
    frag,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// The fixed IPv6 header, and where its addresses sit in it.
pub const IP6_HLEN: usize = 40;
pub const IP6_SRC_OFF: usize = 8;
pub const IP6_DST_OFF: usize = 24;
/// IPv6 extension headers the parser walks (RFC 8200 section 4): hop-by-hop options, routing, fragment,
/// destination options, authentication. Any other next header ends the walk.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// How many extension headers are walked before giving up on a packet (passed untouched): the verifier
/// needs a bound, and real traffic carries one or two.
const MAX_EXT_HEADERS: usize = 4;

/// Where the walk over a packet's extension headers leaves its result (next header, L4 offset, fragment
/// kind, fragment id), to be read back at once. Read back from a map, those are values the verifier cannot
/// know, so every way through the walk joins into one state: verified with what it found, the rest of the
/// IPv6 path would be verified once per combination of headers, past the verifier's million instructions.
#[aya_ebpf::macros::map(name = "EXT_HEADERS6")]
static EXT_HEADERS6: aya_ebpf::maps::PerCpuArray<[u32; 4]> = aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
/// Offset of the IPv4 header checksum from the start of the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
/// Offsets of the source and destination ports; the same in TCP, UDP and SCTP.
pub const L4_SRC_OFF: usize = 0;
pub const L4_DST_OFF: usize = 2;
pub const IP_TOT_LEN_OFF: usize = 2;
pub const IP_TTL_OFF: usize = 8;
/// The "more fragments" bit and the fragment offset of the IPv4 flags/fragment-offset field.
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const IPPROTO_ICMP: u8 = 1;
/// ICMP errors that quote the packet they are about (RFC 792): destination unreachable (incl.
/// fragmentation needed), time exceeded, parameter problem.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
pub const ICMP_HLEN: usize = 8;
/// Offset of the ICMP checksum from the start of the ICMP header (the same in `ICMPv6`).
pub const ICMP_CSUM_OFF: usize = 2;
const NEXTHDR_ICMP6: u8 = 58;
/// `ICMPv6` errors (RFC 4443): destination unreachable, packet too big, time exceeded, parameter problem.
/// Their types are 1 to 4; informational messages (echo, neighbour discovery) are 128 and up.
const ICMP6_ERROR_TYPES: core::ops::RangeInclusive<u8> = 1..=4;

/// What the L4 checksum of a packet is, for incremental updates.
#[derive(Clone, Copy)]
pub struct L4Csum {
    pub off: usize,
    /// UDP: zero means "no checksum" and must stay zero; a computed zero is written as 0xffff.
    pub udp: bool,
}

/// A packet the service path can read and rewrite: a TC `__sk_buff` or an XDP buffer.
pub trait Packet {
    /// Reads a value; a packet too short for it is [`PACKET_TOO_SHORT`].
    fn load<T: Copy>(&self, off: usize) -> Result<T>;
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<()>;
    /// Updates the IPv4 header checksum for a 4-byte field changing from `from` to `to`.
    fn l3_csum_replace(&self, off: usize, from: u32, to: u32) -> Result<()>;
    /// Updates the L4 checksum for a field of `size` (2 or 4) bytes; `pseudo` if the field is an address,
    /// which the checksum covers through the pseudo-header.
    fn l4_csum_replace(&self, csum: L4Csum, from: u32, to: u32, size: u8, pseudo: bool) -> Result<()>;
}

/// Updates, in software, the Internet checksum at `off` for a field of `size` (2 or 4) bytes changing from
/// `from` to `to` (as they sit in memory). For checksums the kernel's helpers know nothing of: those
/// inside the packet an ICMP error quotes, and the ICMP checksum over them. `udp`: a zero checksum means
/// "none" and stays zero, and a computed zero is written as 0xffff.
#[inline(always)]
pub fn csum_replace<P: Packet>(pkt: &P, off: usize, from: u32, to: u32, size: u8, udp: bool) -> Result<()> {
    let current: u16 = pkt.load(off)?;
    if udp && current == 0 {
        return Ok(());
    }
    let (from, to) = if size == 2 { (from & 0xffff, to & 0xffff) } else { (from, to) };
    let mut updated = csum_update(current, from, to);
    if udp && updated == 0 {
        updated = 0xffff;
    }
    pkt.store(off, &updated)
}

/// [`csum_replace`] for a 16-byte IPv6 address: one load and one store of the checksum, every word folded
/// in between, with no branch per word (an unchanged word changes nothing), so the verifier has one path.
#[inline(always)]
pub fn csum_replace6<P: Packet>(pkt: &P, off: usize, from: &In6, to: &In6, udp: bool) -> Result<()> {
    let current: u16 = pkt.load(off)?;
    if udp && current == 0 {
        return Ok(());
    }
    let mut updated = current;
    for i in 0..4 {
        updated = csum_update(updated, from.0[i], to.0[i]);
    }
    if udp && updated == 0 {
        updated = 0xffff;
    }
    pkt.store(off, &updated)
}

impl Packet for TcContext {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T> {
        TcContext::load(self, off).map_err(|_| PACKET_TOO_SHORT)
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<()> {
        TcContext::store(self, off, value, 0).map_err(|_| REWRITE_FAILED)
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u32, to: u32) -> Result<()> {
        TcContext::l3_csum_replace(self, off, u64::from(from), u64::from(to), 4).map_err(|_| REWRITE_FAILED)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, csum: L4Csum, from: u32, to: u32, size: u8, pseudo: bool) -> Result<()> {
        // The helper also handles CHECKSUM_PARTIAL packets, whose field holds only the pseudo-header sum.
        let mut flags = u64::from(size);
        if pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if csum.udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        TcContext::l4_csum_replace(self, csum.off, u64::from(from), u64::from(to), flags).map_err(|_| REWRITE_FAILED)
    }
}

/// Above the furthest into a frame XDP reads: the Ethernet and IPv6 headers, 4 extension headers of the
/// largest size (2 KiB each), and the L4 header. A mask (all ones).
const MAX_XDP_OFF: usize = 0x3fff;

/// A bounds-checked pointer into an XDP packet, the form the verifier accepts for direct access.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T> {
    // The verifier grants a packet pointer a range only if its variable offset, with the access's own, is
    // known to stay within 64 KiB (`MAX_PACKET_OFF`); an IPv6 flow's offsets come through a map round trip
    // (`EXT_HEADERS6`), so nothing bounds them. A mask does, on the very register the pointer is made
    // from (a comparison is not enough: LLVM tests a transformed copy of the value, which tells the
    // verifier nothing). No offset XDP reads reaches it (see `MAX_XDP_OFF`), so it changes none.
    let off = off & MAX_XDP_OFF;
    let start = ctx.data() as *mut u8;
    let end = ctx.data_end() as *const u8;
    // Pointers, not integers: compared as integers, LLVM reassociates the test into arithmetic on the end
    // pointer, which the verifier refuses.
    let ptr = start.wrapping_add(off);
    if ptr.wrapping_add(size_of::<T>()).cast_const() > end {
        return Err(PACKET_TOO_SHORT);
    }
    Ok(ptr.cast())
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
    fn load<T: Copy>(&self, off: usize) -> Result<T> {
        // SAFETY: `ptr_at` checked the whole value lies inside the packet; it may be unaligned.
        Ok(unsafe { ptr_at::<T>(self, off)?.read_unaligned() })
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<()> {
        // SAFETY: as in `load`; XDP packet data is writable.
        unsafe { ptr_at::<T>(self, off)?.write_unaligned(*value) };
        Ok(())
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u32, to: u32) -> Result<()> {
        csum_replace(self, off, from, to, 4, false)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, csum: L4Csum, from: u32, to: u32, size: u8, _pseudo: bool) -> Result<()> {
        // XDP sees whole frames with complete checksums, so the pseudo-header needs no special case.
        csum_replace(self, csum.off, from, to, size, csum.udp)
    }
}

/// How a packet's L4 header relates to its IPv4 fragments.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the L4 header, more fragments follow.
    First,
    /// A later fragment: no L4 header; its ports come from the first fragment's record.
    Later,
}

/// The parts of an IP packet the proxy reads and rewrites, of either family (`A`: `u32` for IPv4, `In6`
/// for IPv6, see `family`). Addresses and ports stay in network byte order.
#[derive(Clone, Copy)]
pub struct Flow<A = u32> {
    /// Where the IP and L4 headers start (see [`Flow::l3`]): 16 bits, as every offset in a packet the
    /// service path reads fits, so an IPv6 flow's copies cost less of the 512-byte stack.
    pub l3_off: u16,
    pub l4_off: u16,
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// IPv4's TTL, IPv6's hop limit.
    pub ttl: u8,
    /// What ties fragments together (network byte order): IPv4's 16-bit identification, or the IPv6
    /// Fragment header's 32-bit one.
    pub ip_id: u32,
    pub fragment: Fragment,
}

impl<A: Copy> Flow<A> {
    /// The offset of the IP header.
    #[inline(always)]
    pub fn l3(&self) -> usize {
        usize::from(self.l3_off)
    }

    /// The offset of the L4 header.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        usize::from(self.l4_off)
    }

    /// Where this flow's L4 checksum is, if this packet has one that covers addresses and ports. SCTP's
    /// `CRC32c` covers neither address, and a port change would need a full recompute; a later fragment
    /// has no L4 header at all (the first fragment's checksum covers the whole datagram).
    #[inline(always)]
    pub fn l4_csum(&self) -> Option<L4Csum> {
        if self.fragment == Fragment::Later {
            return None;
        }
        match self.proto {
            proto::TCP => Some(L4Csum { off: self.l4() + 16, udp: false }),
            proto::UDP => Some(L4Csum { off: self.l4() + 6, udp: true }),
            _ => None,
        }
    }

    /// Whether the packet itself carries the ports (not a later fragment).
    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        self.fragment != Fragment::Later
    }

    /// The flow as its replies carry it: source and destination swapped.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ..*self
        }
    }
}

/// An ICMP (or `ICMPv6`) error about a TCP, UDP or SCTP packet, and where the packet it quotes sits.
#[derive(Clone, Copy)]
pub struct Quote<A = u32> {
    /// The error's own IP header and ICMP header.
    pub outer_l3_off: usize,
    pub icmp_off: usize,
    pub outer_src: A,
    pub outer_dst: A,
    /// The quoted packet, as its sender sent it (`l3_off`/`l4_off` point into the quote).
    pub inner: Flow<A>,
}

/// What a packet is to the service path.
pub enum Parsed<A = u32> {
    /// Not something the proxy translates: other ethertypes and protocols, ICMP and `ICMPv6` other than
    /// errors about TCP/UDP/SCTP (neighbour discovery, echo, ...), malformed headers. Passes untouched.
    Other,
    Flow(Flow<A>),
    /// An ICMP or `ICMPv6` error about a flow.
    IcmpError(Quote<A>),
    /// A later fragment whose datagram's first fragment was not recorded here (see [`frag`]): no ports to
    /// translate it by. Its addresses, network byte order.
    UntrackedFragment {
        src: A,
        dst: A,
    },
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

/// An offset into the packet as [`Flow`] holds it (headers past 64 KiB are not parsed).
#[inline(always)]
fn offset(off: usize) -> Option<u16> {
    u16::try_from(off).ok()
}

#[inline(always)]
fn is_translated_proto(p: u8) -> bool {
    matches!(p, proto::TCP | proto::UDP | proto::SCTP)
}

/// The IPv4 header at `l3_off`, if it is one: version 4, header length at least 20 bytes.
#[inline(always)]
fn ipv4_at<P: Packet>(pkt: &P, l3_off: usize) -> Option<(Ipv4Head, usize)> {
    let ip: Ipv4Head = pkt.load(l3_off).ok()?;
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    Some((ip, ihl))
}

/// The frame's ethertype (host order), 0 if unreadable.
#[inline(always)]
pub fn ethertype<P: Packet>(pkt: &P) -> u16 {
    pkt.load::<u16>(12).map_or(0, u16::from_be)
}

/// Parses an Ethernet frame carrying IPv4 (anything else is [`Parsed::Other`]).
///
/// A later fragment is a [`Parsed::Flow`] with the ports its first fragment recorded (see [`frag`]), or
/// [`Parsed::UntrackedFragment`] when there is no record.
#[inline(always)]
pub fn parse4<P: Packet>(pkt: &P) -> Parsed {
    parse_ipv4(pkt).unwrap_or(Parsed::Other)
}

/// Parses an Ethernet frame carrying IPv6 (the caller checked the ethertype; the version is checked here):
/// the fixed header, then the
/// extension headers up to the upper-layer header, at most [`MAX_EXT_HEADERS`] of them. Fragments as for
/// [`parse4`].
#[inline(always)]
pub fn parse6<P: Packet>(pkt: &P) -> Parsed<In6> {
    parse_ipv6(pkt).unwrap_or(Parsed::Other)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P) -> Option<Parsed<In6>> {
    let l3_off = ETH_HLEN;
    let [version, _, _, _, _, _, mut next, hop_limit]: [u8; 8] = pkt.load(l3_off).ok()?;
    if version >> 4 != 6 {
        return None;
    }
    let src_addr = In6(pkt.load(l3_off + IP6_SRC_OFF).ok()?);
    let dst_addr = In6(pkt.load(l3_off + IP6_DST_OFF).ok()?);
    let mut off = l3_off + IP6_HLEN;
    let mut fragment = Fragment::Whole;
    let mut ip_id = 0;
    if !is_translated_proto(next) {
        (next, off, fragment, ip_id) = ext_headers(pkt, next, off)?;
    }
    // Every packet, with extension headers or without, goes on from one verifier state (`EXT_HEADERS6`).
    (next, off, fragment, ip_id) = launder(next, off, fragment, ip_id)?;
    if next == NEXTHDR_ICMP6 {
        // The fragment check only on this path: made before the branch, it would split every flow's
        // verifier state by fragment kind, and the IPv6 egress programs past the verifier's limit.
        // (An error that carries a Routing header of its own is not told apart: its checksum's pseudo-header
        // holds the final destination, not the address in the header (RFC 8200 8.1), so translating it
        // leaves a wrong checksum. Checking for it here takes the IPv6 egress programs past the verifier's
        // limit; routers do not source-route the errors they send.)
        if fragment != Fragment::Whole {
            return None;
        }
        return parse_icmp6_error(pkt, l3_off, off, src_addr, dst_addr).map(Parsed::IcmpError);
    }
    if !is_translated_proto(next) {
        return None;
    }
    let flow = Flow {
        l3_off: offset(l3_off)?,
        l4_off: offset(off)?,
        src_addr,
        dst_addr,
        src_port: 0,
        dst_port: 0,
        proto: next,
        ttl: hop_limit,
        ip_id,
        fragment,
    };
    with_ports(pkt, flow)
}

/// Walks the extension headers from `next` at `off` (see [`MAX_EXT_HEADERS`]): the upper-layer protocol,
/// its offset, and the Fragment header's kind and id if there is one.
#[inline(always)]
fn ext_headers<P: Packet>(pkt: &P, mut next: u8, mut off: usize) -> Option<(u8, usize, Fragment, u32)> {
    let mut fragment = Fragment::Whole;
    let mut ip_id = 0;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let [nh, len]: [u8; 2] = pkt.load(off).ok()?;
                next = nh;
                off += (usize::from(len) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let [nh, len]: [u8; 2] = pkt.load(off).ok()?;
                next = nh;
                off += (usize::from(len) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let [nh, _, off_hi, off_lo]: [u8; 4] = pkt.load(off).ok()?;
                let id: u32 = pkt.load(off + 4).ok()?;
                let offset_flags = u16::from_be_bytes([off_hi, off_lo]);
                fragment = if offset_flags & 0xfff8 != 0 {
                    Fragment::Later
                } else if offset_flags & 1 != 0 {
                    Fragment::First
                } else {
                    // An atomic fragment (RFC 6946): a whole datagram.
                    Fragment::Whole
                };
                ip_id = id;
                next = nh;
                off += 8;
                // A later fragment carries payload, not headers, after its Fragment header.
                if fragment == Fragment::Later {
                    break;
                }
            }
            _ => break,
        }
    }
    Some((next, off, fragment, ip_id))
}

/// The parse's result through [`EXT_HEADERS6`] and back.
#[inline(always)]
fn launder(next: u8, off: usize, fragment: Fragment, ip_id: u32) -> Option<(u8, usize, Fragment, u32)> {
    let kind = match fragment {
        Fragment::Whole => 0,
        Fragment::First => 1,
        Fragment::Later => 2,
    };
    let slot = EXT_HEADERS6.get_ptr_mut(0)?;
    // SAFETY: `slot` is this CPU's entry of the map, valid for the program run; volatile, so the compiler
    // keeps the round trip that hides the values from the verifier.
    let [next, off, kind, ip_id] = unsafe {
        core::ptr::write_volatile(slot, [u32::from(next), u32::try_from(off).ok()?, kind, ip_id]);
        core::ptr::read_volatile(slot)
    };
    let fragment = match kind {
        0 => Fragment::Whole,
        1 => Fragment::First,
        _ => Fragment::Later,
    };
    Some((u8::try_from(next).ok()?, usize::try_from(off).ok()?, fragment, ip_id))
}

#[inline(always)]
fn parse_ipv4<P: Packet>(pkt: &P) -> Option<Parsed> {
    if ethertype(pkt) != ETH_P_IP {
        return None;
    }
    let l3_off = ETH_HLEN;
    let (ip, ihl) = ipv4_at(pkt, l3_off)?;
    let l4_off = l3_off + ihl;
    let frag_off = u16::from_be(ip.frag_off);
    let fragment = if frag_off & IP_OFFSET_MASK != 0 {
        Fragment::Later
    } else if frag_off & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    if ip.proto == IPPROTO_ICMP && fragment == Fragment::Whole {
        return parse_icmp_error(pkt, l3_off, l4_off, &ip).map(Parsed::IcmpError);
    }
    if !is_translated_proto(ip.proto) {
        return None;
    }
    let flow = Flow {
        l3_off: offset(l3_off)?,
        l4_off: offset(l4_off)?,
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: 0,
        dst_port: 0,
        proto: ip.proto,
        ttl: ip.ttl,
        ip_id: u32::from(ip.id),
        fragment,
    };
    with_ports(pkt, flow)
}

/// The flow with its ports: from the L4 header, or for a later fragment from its first fragment's record
/// ([`Parsed::UntrackedFragment`] when there is none).
#[inline(always)]
fn with_ports<P: Packet, A: frag::Maps + Copy>(pkt: &P, mut flow: Flow<A>) -> Option<Parsed<A>> {
    if flow.fragment == Fragment::Later {
        let Some((src_port, dst_port)) = frag::ports(&flow) else {
            return Some(Parsed::UntrackedFragment { src: flow.src_addr, dst: flow.dst_addr });
        };
        (flow.src_port, flow.dst_port) = (src_port, dst_port);
    } else {
        let ports: [u16; 2] = pkt.load(flow.l4()).ok()?;
        (flow.src_port, flow.dst_port) = (ports[0], ports[1]);
    }
    Some(Parsed::Flow(flow))
}

/// An ICMP error whose quote holds an IPv4 header and at least the ports of a TCP, UDP or SCTP packet (an
/// unfragmented one, or a first fragment: a later fragment's quote has no ports).
#[inline(always)]
fn parse_icmp_error<P: Packet>(pkt: &P, l3_off: usize, icmp_off: usize, ip: &Ipv4Head) -> Option<Quote> {
    let icmp_type: u8 = pkt.load(icmp_off).ok()?;
    if !matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
        return None;
    }
    let inner_l3 = icmp_off + ICMP_HLEN;
    let (inner, ihl) = ipv4_at(pkt, inner_l3)?;
    if u16::from_be(inner.frag_off) & IP_OFFSET_MASK != 0 || !is_translated_proto(inner.proto) {
        return None;
    }
    let inner_l4 = inner_l3 + ihl;
    let ports: [u16; 2] = pkt.load(inner_l4).ok()?;
    Some(Quote {
        outer_l3_off: l3_off,
        icmp_off,
        outer_src: ip.src,
        outer_dst: ip.dst,
        inner: Flow {
            l3_off: offset(inner_l3)?,
            l4_off: offset(inner_l4)?,
            src_addr: inner.src,
            dst_addr: inner.dst,
            src_port: ports[0],
            dst_port: ports[1],
            proto: inner.proto,
            ttl: inner.ttl,
            ip_id: u32::from(inner.id),
            fragment: Fragment::Whole,
        },
    })
}

/// An `ICMPv6` error whose quote holds an IPv6 header followed at once by at least the ports of a TCP, UDP
/// or SCTP packet. A quote with extension headers is not walked (it passes untranslated): the errors that
/// matter here quote what a pod or a node sent, which carries none.
#[inline(always)]
fn parse_icmp6_error<P: Packet>(pkt: &P, l3_off: usize, icmp_off: usize, src: In6, dst: In6) -> Option<Quote<In6>> {
    let icmp_type: u8 = pkt.load(icmp_off).ok()?;
    if !ICMP6_ERROR_TYPES.contains(&icmp_type) {
        return None;
    }
    let inner_l3 = icmp_off + ICMP_HLEN;
    let [version, _, _, _, _, _, next, hop_limit]: [u8; 8] = pkt.load(inner_l3).ok()?;
    if version >> 4 != 6 || !is_translated_proto(next) {
        return None;
    }
    let inner_l4 = inner_l3 + IP6_HLEN;
    let ports: [u16; 2] = pkt.load(inner_l4).ok()?;
    Some(Quote {
        outer_l3_off: l3_off,
        icmp_off,
        outer_src: src,
        outer_dst: dst,
        inner: Flow {
            l3_off: offset(inner_l3)?,
            l4_off: offset(inner_l4)?,
            src_addr: In6(pkt.load(inner_l3 + IP6_SRC_OFF).ok()?),
            dst_addr: In6(pkt.load(inner_l3 + IP6_DST_OFF).ok()?),
            src_port: ports[0],
            dst_port: ports[1],
            proto: next,
            ttl: hop_limit,
            ip_id: 0,
            fragment: Fragment::Whole,
        },
    })
}

/// The TCP flags byte of a packet (0 for other protocols, later fragments, or if unreadable).
#[inline(always)]
pub fn tcp_flags<P: Packet, A: Copy>(pkt: &P, flow: &Flow<A>) -> u8 {
    const TCP_FLAGS_OFF: usize = 13;
    if flow.proto != proto::TCP || !flow.has_l4_header() {
        return 0;
    }
    pkt.load::<u8>(flow.l4() + TCP_FLAGS_OFF).unwrap_or(0)
}
