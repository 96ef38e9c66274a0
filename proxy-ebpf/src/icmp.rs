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
//! Errors about anything else pass bit-identical. XDP leaves every ICMP error to these TC programs.

use crate::{
    conntrack,
    drop::Result,
    packet::{ICMP_CSUM_OFF, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_OFF, L4_SRC_OFF, Packet, Quote, csum_replace},
    snat,
};
use proxy_common::{config::Config, proto};

/// Which end of the quoted packet a translation rewrites. The error's header changes at the other end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QuotedEnd {
    Source,
    Destination,
}

/// At ingress: an error on its way to a client or a backend whose quote carries a translated address.
#[inline(always)]
pub fn ingress<P: Packet>(pkt: &P, quote: &Quote, cfg: &Config) -> Result<bool> {
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
pub fn egress<P: Packet>(pkt: &P, quote: &Quote) -> Result<bool> {
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

/// Rewrites only the port at one end of the quoted packet (a client port remapped by `conntrack`), with the
/// quoted L4 checksum and the ICMP checksum kept valid. Nothing when the port is already `port`.
#[inline(always)]
fn translate_port<P: Packet>(pkt: &P, quote: &Quote, end: QuotedEnd, port: u16) -> Result<()> {
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
    let l4_csum = match inner.proto {
        proto::UDP => Some((inner.l4() + 6, true)),
        proto::TCP => Some((inner.l4() + 16, false)),
        _ => None,
    };
    if let Some((off, udp)) = l4_csum
        && let Ok(before) = pkt.load::<u16>(off)
    {
        csum_replace(pkt, off, u32::from(old_port), u32::from(port), 2, udp)?;
        let after: u16 = pkt.load(off)?;
        csum_replace(pkt, icmp_csum, u32::from(before), u32::from(after), 2, false)?;
    }
    Ok(())
}

/// Rewrites one end of the quoted packet to `addr:port`, and the other end of the error's own header to
/// `addr`, with every checksum kept valid: the error's IPv4 header, the quoted IPv4 header, the quoted L4
/// checksum where the quote holds it, and the ICMP checksum over the whole rewritten quote.
#[inline(always)]
fn translate<P: Packet>(pkt: &P, quote: &Quote, end: QuotedEnd, addr: u32, port: u16) -> Result<()> {
    let inner = &quote.inner;
    let quoted_port = if end == QuotedEnd::Source { inner.src_port } else { inner.dst_port };
    if quoted_port != port && inner.proto == proto::SCTP {
        // As for SCTP's packets themselves: the port cannot change under its CRC32c. Checked before any
        // write, so nothing is left half-rewritten.
        return Err(crate::drop::SCTP_PORT_CHANGE);
    }
    let (old_addr, old_port, addr_off, port_off, outer_old, outer_off) = match end {
        QuotedEnd::Source => (inner.src_addr, inner.src_port, IP_SRC_OFF, L4_SRC_OFF, quote.outer_dst, IP_DST_OFF),
        QuotedEnd::Destination => (inner.dst_addr, inner.dst_port, IP_DST_OFF, L4_DST_OFF, quote.outer_src, IP_SRC_OFF),
    };
    let icmp_csum = quote.icmp_off + ICMP_CSUM_OFF;
    // The quoted L4 checksum, if the quote is long enough to hold it (a router may quote only 8 bytes).
    let l4_csum = match inner.proto {
        proto::UDP => Some((inner.l4() + 6, true)),
        proto::TCP => Some((inner.l4() + 16, false)),
        _ => None,
    };
    let (l4_csum, l4_before) = match l4_csum.map(|(off, udp)| (off, udp, pkt.load::<u16>(off))) {
        Some((off, udp, Ok(before))) => (Some((off, udp)), before),
        _ => (None, 0),
    };

    if old_addr != addr {
        let ip_csum_off = inner.l3() + IP_CSUM_OFF;
        let ip_csum_before: u16 = pkt.load(ip_csum_off)?;
        csum_replace(pkt, ip_csum_off, old_addr, addr, 4, false)?;
        let ip_csum_after: u16 = pkt.load(ip_csum_off)?;
        pkt.store(inner.l3() + addr_off, &addr)?;
        if let Some((off, udp)) = l4_csum {
            csum_replace(pkt, off, old_addr, addr, 4, udp)?;
        }
        // The ICMP checksum covers the quote: every changed word of it moves it.
        csum_replace(pkt, icmp_csum, old_addr, addr, 4, false)?;
        csum_replace(pkt, icmp_csum, u32::from(ip_csum_before), u32::from(ip_csum_after), 2, false)?;
    }
    if old_port != port {
        pkt.store(inner.l4() + port_off, &port)?;
        if let Some((off, udp)) = l4_csum {
            csum_replace(pkt, off, u32::from(old_port), u32::from(port), 2, udp)?;
        }
        csum_replace(pkt, icmp_csum, u32::from(old_port), u32::from(port), 2, false)?;
    }
    if let Some((off, _)) = l4_csum {
        let l4_after: u16 = pkt.load(off)?;
        csum_replace(pkt, icmp_csum, u32::from(l4_before), u32::from(l4_after), 2, false)?;
    }
    // The error's own header: only its IPv4 checksum covers its addresses (ICMP has no pseudo-header).
    if outer_old != addr {
        pkt.l3_csum_replace(quote.outer_l3_off + IP_CSUM_OFF, outer_old, addr)?;
        pkt.store(quote.outer_l3_off + outer_off, &addr)?;
    }
    crate::stats::count(proxy_common::stats::ICMP_TRANSLATED);
    Ok(())
}
