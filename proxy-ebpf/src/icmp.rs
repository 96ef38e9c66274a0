//! ICMP errors about translated flows, translated back the way netfilter's NAT does (`nf_nat_icmp`): the
//! packet an error quotes is rewritten to what its sender sent, and the error's own header as the flow's
//! packets in the same direction are. Without it a client never learns a path MTU through a Service (its
//! TCP stalls), a connected UDP socket never sees ECONNREFUSED, and traceroute shows backends.
//!
//! An error travels against the packet it quotes, so its translation mirrors that packet's, and keeps the
//! TC split of the service path: ingress (before routing) rewrites the error's destination and the quote's
//! source, egress (after routing) the error's source and the quote's destination.
//! - ingress, the quote's reversed tuple is a SNAT reply entry: the quote left with the node's address
//!   (an error about the client → backend leg, after SNAT); it becomes the client's again.
//! - ingress, the reversed tuple is a flow's forward entry: the quote is a reply that left with the frontend
//!   as source (an error about the backend → client leg, on its way to the backend); the backend again.
//! - egress, the reversed tuple is a flow's reply entry: the quote was DNATed to a backend (an error about
//!   the client → backend leg, on its way to the client); it shows the frontend again.
//! - egress, the reversed tuple is a SNAT forward entry: the quote is a reply already un-SNATed here (an
//!   error about the backend → client leg, on its way to the backend); it shows the node's address again.
//!
//! Both families alike: IPv4's ICMP and `ICMPv6`, whose Packet Too Big is the only way an IPv6 sender learns
//! a path MTU (IPv6 routers never fragment). What differs is which checksums cover the rewritten addresses
//! ([`Quoted`]): IPv4's header checksums, and `ICMPv6`'s pseudo-header.
//!
//! Errors about anything else pass bit-identical. XDP leaves every ICMP error to these TC programs.

use crate::{
    conntrack,
    drop::Result,
    family::Family,
    packet::{
        ICMP_CSUM_OFF, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF, L4_DST_OFF, L4_SRC_OFF, Packet,
        Quote, csum_replace, csum_replace6,
    },
    snat,
};
use proxy_common::{addr::In6, config::Config, proto};

/// Which end of the quoted packet a translation rewrites. The error's header changes at the other end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QuotedEnd {
    Source,
    Destination,
}

/// At ingress: an error on its way to a client or a backend whose quote carries a translated address.
#[inline(always)]
pub fn ingress<A: Family, P: Packet>(pkt: &P, quote: &Quote<A>, cfg: &Config) -> Result<bool> {
    let replies = quote.inner.reversed();
    if let Some(client) = snat::lookup_in(&replies, cfg) {
        translate(pkt, quote, QuotedEnd::Source, client.addr, client.port)?;
        return Ok(true);
    }
    if let Some(ct) = conntrack::peek_forward(&replies) {
        // The quote shows the frontend as source and the client's own port as destination; the backend
        // sent it from itself to the client port it saw.
        translate(pkt, quote, QuotedEnd::Source, ct.nat_addr, ct.nat_port)?;
        translate_port(pkt, quote, QuotedEnd::Destination, ct.client_port)?;
        return Ok(true);
    }
    Ok(false)
}

/// At egress: an error on its way to a client or a backend whose quote must show the address the flow has
/// on that side.
#[inline(always)]
pub fn egress<A: Family, P: Packet>(pkt: &P, quote: &Quote<A>) -> Result<bool> {
    let replies = quote.inner.reversed();
    if let Some(original) = conntrack::peek_reply(&replies) {
        translate(pkt, quote, QuotedEnd::Destination, original.nat_addr, original.nat_port)?;
        translate_port(pkt, quote, QuotedEnd::Source, original.client_port)?;
        return Ok(true);
    }
    if let Some(out) = snat::lookup_out(&replies) {
        translate(pkt, quote, QuotedEnd::Destination, out.addr, out.port)?;
        return Ok(true);
    }
    Ok(false)
}

/// The quoted L4 checksum's offset (and whether it is UDP's), if the quote is long enough to hold it (a
/// router may quote only 8 bytes of an IPv4 packet).
#[inline(always)]
fn quoted_l4_csum<A: Copy, P: Packet>(pkt: &P, quote: &Quote<A>) -> Option<(usize, bool, u16)> {
    let inner = &quote.inner;
    let (off, udp) = match inner.proto {
        proto::UDP => (inner.l4() + 6, true),
        proto::TCP => (inner.l4() + 16, false),
        _ => return None,
    };
    pkt.load::<u16>(off).ok().map(|before| (off, udp, before))
}

/// Rewrites only the port at one end of the quoted packet (a client port remapped by `conntrack`), with the
/// quoted L4 checksum and the ICMP checksum kept valid. Nothing when the port is already `port`.
#[inline(always)]
fn translate_port<A: Copy, P: Packet>(pkt: &P, quote: &Quote<A>, end: QuotedEnd, port: u16) -> Result<()> {
    let inner = &quote.inner;
    let (old_port, port_off) = match end {
        QuotedEnd::Source => (inner.src_port, L4_SRC_OFF),
        QuotedEnd::Destination => (inner.dst_port, L4_DST_OFF),
    };
    if old_port == port {
        return Ok(());
    }
    if inner.proto == proto::SCTP {
        return Err(crate::drop::SCTP_PORT_CHANGE);
    }
    let icmp_csum = quote.icmp_off + ICMP_CSUM_OFF;
    pkt.store(inner.l4() + port_off, &port)?;
    csum_replace(pkt, icmp_csum, u32::from(old_port), u32::from(port), 2, false)?;
    if let Some((off, udp, before)) = quoted_l4_csum(pkt, quote) {
        csum_replace(pkt, off, u32::from(old_port), u32::from(port), 2, udp)?;
        let after: u16 = pkt.load(off)?;
        csum_replace(pkt, icmp_csum, u32::from(before), u32::from(after), 2, false)?;
    }
    Ok(())
}

/// Rewrites one end of the quoted packet to `addr:port`, and the other end of the error's own header to
/// `addr`, with every checksum kept valid: the family's (see [`Quoted`]), the quoted L4 checksum where the
/// quote holds it, and the ICMP checksum over the whole rewritten quote.
#[inline(always)]
fn translate<A: Family, P: Packet>(pkt: &P, quote: &Quote<A>, end: QuotedEnd, addr: A, port: u16) -> Result<()> {
    let inner = &quote.inner;
    let quoted_port = if end == QuotedEnd::Source { inner.src_port } else { inner.dst_port };
    if quoted_port != port && inner.proto == proto::SCTP {
        // As for SCTP's packets themselves: the port cannot change under its CRC32c. Checked before any
        // write, so nothing is left half-rewritten.
        return Err(crate::drop::SCTP_PORT_CHANGE);
    }
    let (old_addr, old_port, addr_off, port_off, outer_old, outer_off) = match end {
        QuotedEnd::Source => (inner.src_addr, inner.src_port, A::SRC_OFF, L4_SRC_OFF, quote.outer_dst, A::DST_OFF),
        QuotedEnd::Destination => (inner.dst_addr, inner.dst_port, A::DST_OFF, L4_DST_OFF, quote.outer_src, A::SRC_OFF),
    };
    let icmp_csum = quote.icmp_off + ICMP_CSUM_OFF;
    let l4_csum = quoted_l4_csum(pkt, quote);

    if old_addr != addr {
        A::rewrite_quoted_addr(pkt, quote, addr_off, old_addr, addr, l4_csum.map(|(off, udp, _)| (off, udp)))?;
    }
    if old_port != port {
        pkt.store(inner.l4() + port_off, &port)?;
        if let Some((off, udp, _)) = l4_csum {
            csum_replace(pkt, off, u32::from(old_port), u32::from(port), 2, udp)?;
        }
        csum_replace(pkt, icmp_csum, u32::from(old_port), u32::from(port), 2, false)?;
    }
    if let Some((off, _, before)) = l4_csum {
        let after: u16 = pkt.load(off)?;
        csum_replace(pkt, icmp_csum, u32::from(before), u32::from(after), 2, false)?;
    }
    if outer_old != addr {
        A::rewrite_error_addr(pkt, quote, outer_off, outer_old, addr)?;
    }
    crate::stats::count(proxy_common::stats::ICMP_TRANSLATED);
    Ok(())
}

/// What differs between the families' errors: where the addresses sit in the IP header, and which
/// checksums cover them.
pub trait Quoted: Sized + Copy {
    const SRC_OFF: usize;
    const DST_OFF: usize;

    /// Writes `to` over the quoted packet's address at `addr_off` (holding `from`), with the checksums that
    /// cover it in the quote (`l4_csum`: the quoted L4 checksum's offset and whether it is UDP's) and the
    /// ICMP checksum over the quote. The quoted L4 checksum's own change is the caller's to carry into the
    /// ICMP checksum.
    fn rewrite_quoted_addr<P: Packet>(
        pkt: &P,
        quote: &Quote<Self>,
        addr_off: usize,
        from: Self,
        to: Self,
        l4_csum: Option<(usize, bool)>,
    ) -> Result<()>;
    /// Writes `to` over the error's own address at `addr_off` (holding `from`), with the checksum that
    /// covers it.
    fn rewrite_error_addr<P: Packet>(pkt: &P, quote: &Quote<Self>, addr_off: usize, from: Self, to: Self)
    -> Result<()>;
}

impl Quoted for u32 {
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;

    #[inline(always)]
    fn rewrite_quoted_addr<P: Packet>(
        pkt: &P,
        quote: &Quote<Self>,
        addr_off: usize,
        from: Self,
        to: Self,
        l4_csum: Option<(usize, bool)>,
    ) -> Result<()> {
        let icmp_csum = quote.icmp_off + ICMP_CSUM_OFF;
        let ip_csum_off = quote.inner.l3() + IP_CSUM_OFF;
        let ip_csum_before: u16 = pkt.load(ip_csum_off)?;
        csum_replace(pkt, ip_csum_off, from, to, 4, false)?;
        let ip_csum_after: u16 = pkt.load(ip_csum_off)?;
        pkt.store(quote.inner.l3() + addr_off, &to)?;
        if let Some((off, udp)) = l4_csum {
            csum_replace(pkt, off, from, to, 4, udp)?;
        }
        // The ICMP checksum covers the quote: every changed word of it moves it.
        csum_replace(pkt, icmp_csum, from, to, 4, false)?;
        csum_replace(pkt, icmp_csum, u32::from(ip_csum_before), u32::from(ip_csum_after), 2, false)
    }

    #[inline(always)]
    fn rewrite_error_addr<P: Packet>(
        pkt: &P,
        quote: &Quote<Self>,
        addr_off: usize,
        from: Self,
        to: Self,
    ) -> Result<()> {
        // Only the error's IPv4 header checksum covers its addresses (ICMP has no pseudo-header).
        pkt.l3_csum_replace(quote.outer_l3_off + IP_CSUM_OFF, from, to)?;
        pkt.store(quote.outer_l3_off + addr_off, &to)
    }
}

impl Quoted for In6 {
    const SRC_OFF: usize = IP6_SRC_OFF;
    const DST_OFF: usize = IP6_DST_OFF;

    #[inline(always)]
    fn rewrite_quoted_addr<P: Packet>(
        pkt: &P,
        quote: &Quote<Self>,
        addr_off: usize,
        from: Self,
        to: Self,
        l4_csum: Option<(usize, bool)>,
    ) -> Result<()> {
        // No IPv6 header checksum: the quoted L4 checksum (its pseudo-header) and the ICMPv6 checksum over
        // the quote's bytes, a word at a time.
        pkt.store(quote.inner.l3() + addr_off, &to)?;
        if let Some((off, udp)) = l4_csum {
            csum_replace6(pkt, off, &from, &to, udp)?;
        }
        csum_replace6(pkt, quote.icmp_off + ICMP_CSUM_OFF, &from, &to, false)
    }

    #[inline(always)]
    fn rewrite_error_addr<P: Packet>(
        pkt: &P,
        quote: &Quote<Self>,
        addr_off: usize,
        from: Self,
        to: Self,
    ) -> Result<()> {
        // The ICMPv6 checksum covers the error's addresses through its pseudo-header (RFC 4443 2.3).
        pkt.store(quote.outer_l3_off + addr_off, &to)?;
        csum_replace6(pkt, quote.icmp_off + ICMP_CSUM_OFF, &from, &to, false)
    }
}
