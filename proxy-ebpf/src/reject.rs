//! Refusing a client at once (a Service without usable endpoints, a ClusterIP's undefined port): the packet
//! is turned, in place, into an ICMP "port unreachable" (`ICMPv6` destination unreachable, code 4, for IPv6)
//! from the address it was sent to and sent back to the sender. This is what kube-proxy's REJECT rule does
//! (`icmp-port-unreachable`, `icmp6-port-unreachable`); TCP clients see ECONNREFUSED, connected UDP
//! sockets too.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_csum_diff, helpers::bpf_redirect, programs::TcContext};

use proxy_common::addr::In6;

use crate::{
    drop::{REJECT_FAILED, Result},
    packet::{ETH_HLEN, Flow, IP6_HLEN},
    skb,
};

const IP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// An ICMP error quotes the offending IP header and the first 8 bytes of its payload.
const QUOTE_LEN: usize = IP_HLEN + 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const IPPROTO_ICMP: u8 = 1;
/// The IPv4 total length of the reply, and its length on the wire with the Ethernet header.
const REPLY_IP_LEN: u16 = 56;
const REPLY_FRAME_LEN: u32 = 70;
const _: () = assert!(REPLY_IP_LEN as usize == IP_HLEN + ICMP_HLEN + QUOTE_LEN);
const _: () = assert!(REPLY_FRAME_LEN as usize == ETH_HLEN + REPLY_IP_LEN as usize);

/// `ICMPv6` (RFC 4443): destination unreachable, code 4 "port unreachable". The quote is the offending IPv6
/// header and the first 8 bytes of its payload, which name the socket (a receiver needs no more).
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const IPPROTO_ICMPV6: u8 = 58;
const QUOTE6_LEN: usize = IP6_HLEN + 8;
/// The helper's forms of where the quote starts and how long it is.
const QUOTE6_OFF: u32 = 14;
const QUOTE6_BYTES: u32 = 48;
const _: () = assert!(QUOTE6_OFF as usize == ETH_HLEN && QUOTE6_BYTES as usize == QUOTE6_LEN);
/// The reply's IPv6 payload length, and its length on the wire.
const REPLY6_PAYLOAD_LEN: u16 = 56;
const REPLY6_FRAME_LEN: u32 = 110;
const _: () = assert!(REPLY6_PAYLOAD_LEN as usize == ICMP_HLEN + QUOTE6_LEN);
const _: () = assert!(REPLY6_FRAME_LEN as usize == ETH_HLEN + IP6_HLEN + REPLY6_PAYLOAD_LEN as usize);

/// One's-complement sum of `words`, folded to 16 bits and inverted: the Internet checksum.
#[inline(always)]
fn checksum(words: &mut [u32]) -> u16 {
    fold(partial_sum(words, 0))
}

/// One's-complement sum of `words` added to `seed` (another such sum), not yet folded.
#[inline(always)]
fn partial_sum(words: &mut [u32], seed: u32) -> u32 {
    let len = u32::try_from(words.len() * 4).unwrap_or(0);
    // SAFETY: the buffer is on the stack and `len` is its exact size in bytes.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words.as_mut_ptr(), len, seed) };
    // A 32-bit sum (a negative value, an error, cannot happen for a stack buffer of a multiple of 4 bytes).
    u32::try_from(sum).unwrap_or(0)
}

/// A one's-complement sum folded to 16 bits and inverted.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !u16::try_from(sum & 0xffff).unwrap_or(0)
}

/// Which way the refusal goes back to the sender.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Back {
    /// Out of the interface the packet came in on (a TC ingress hook: the sender is on that link).
    Out,
    /// Into the node through the interface the packet was leaving by (a TC egress hook: the sender is a
    /// process of this node).
    In,
}

/// Rewrites the packet into an ICMP port unreachable for `flow` and redirects it back to the sender.
#[inline(always)]
pub fn reject4(ctx: &TcContext, flow: &Flow, back: Back) -> Result<i32> {
    // IP options would change the quote's length, and a later fragment has no L4 header to quote; such
    // packets are only dropped.
    if flow.l4() != ETH_HLEN + IP_HLEN || !flow.has_l4_header() {
        return Err(REJECT_FAILED);
    }
    // Fixed-size loads: the verifier refuses a read whose length might be zero.
    let macs: [u8; 12] = ctx.load(0).map_err(|_| REJECT_FAILED)?;
    let quote: [u32; QUOTE_LEN / 4] = ctx.load(ETH_HLEN).map_err(|_| REJECT_FAILED)?;

    // Words are built from their bytes in packet order (`from_ne_bytes`), and a checksum folded from
    // them is stored back in native order: the one's-complement sum does not care about byte order.
    let [len_hi, len_lo] = REPLY_IP_LEN.to_be_bytes();
    let mut ip = [0u32; IP_HLEN / 4];
    ip[0] = u32::from_ne_bytes([0x45, 0, len_hi, len_lo]);
    // id 0, don't fragment
    ip[1] = u32::from_ne_bytes([0, 0, 0x40, 0]);
    ip[2] = u32::from_ne_bytes([64, IPPROTO_ICMP, 0, 0]);
    ip[3] = flow.dst_addr;
    ip[4] = flow.src_addr;
    let [c0, c1] = checksum(&mut ip).to_ne_bytes();
    ip[2] = u32::from_ne_bytes([64, IPPROTO_ICMP, c0, c1]);

    let mut icmp = [0u32; (ICMP_HLEN + QUOTE_LEN) / 4];
    icmp[0] = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0]);
    icmp[2..].copy_from_slice(&quote);
    let [c0, c1] = checksum(&mut icmp).to_ne_bytes();
    icmp[0] = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, c0, c1]);

    ctx.change_tail(REPLY_FRAME_LEN, 0).map_err(|_| REJECT_FAILED)?;
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| REJECT_FAILED)?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0).map_err(|_| REJECT_FAILED)?;
    send_back(ctx, &macs, back)
}

/// Rewrites the packet into an `ICMPv6` port unreachable for `flow` and redirects it back to the sender.
/// A packet with extension headers, or a later fragment, is only dropped (as for IPv4 options).
#[inline(always)]
pub fn reject6(ctx: &TcContext, flow: &Flow<In6>, back: Back) -> Result<i32> {
    if flow.l4() != ETH_HLEN + IP6_HLEN || !flow.has_l4_header() {
        return Err(REJECT_FAILED);
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| REJECT_FAILED)?;
    // The quote is read straight into the ICMPv6 message that carries it (the stack is tight here).
    let mut icmp = [0u32; (ICMP_HLEN + QUOTE6_LEN) / 4];
    // SAFETY: `icmp[2..]` is `QUOTE6_LEN` bytes of stack, the exact (constant) length read into it.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            aya_ebpf::EbpfContext::as_ptr(ctx),
            QUOTE6_OFF,
            icmp.as_mut_ptr().add(ICMP_HLEN / 4).cast(),
            QUOTE6_BYTES,
        )
    };
    if rc != 0 {
        return Err(REJECT_FAILED);
    }

    let [len_hi, len_lo] = REPLY6_PAYLOAD_LEN.to_be_bytes();
    let mut ip = [0u32; IP6_HLEN / 4];
    ip[0] = u32::from_ne_bytes([0x60, 0, 0, 0]);
    ip[1] = u32::from_ne_bytes([len_hi, len_lo, IPPROTO_ICMPV6, 64]);
    ip[2..6].copy_from_slice(&flow.dst_addr.0);
    ip[6..10].copy_from_slice(&flow.src_addr.0);

    // The ICMPv6 checksum covers a pseudo-header (RFC 8200 section 8.1): both addresses (the header's
    // words 2..10), the upper-layer length and the next header.
    let mut pseudo_tail = [u32::from_ne_bytes([0, 0, len_hi, len_lo]), u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6])];
    icmp[0] = u32::from_ne_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, 0]);
    let pseudo = partial_sum(&mut pseudo_tail, partial_sum(&mut ip[2..10], 0));
    let [c0, c1] = fold(partial_sum(&mut icmp, pseudo)).to_ne_bytes();
    icmp[0] = u32::from_ne_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, c0, c1]);

    ctx.change_tail(REPLY6_FRAME_LEN, 0).map_err(|_| REJECT_FAILED)?;
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| REJECT_FAILED)?;
    ctx.store(ETH_HLEN + IP6_HLEN, &icmp, 0).map_err(|_| REJECT_FAILED)?;
    send_back(ctx, &macs, back)
}

/// Swaps the frame's MACs (`macs` as the packet had them: the sender's becomes the destination) and
/// redirects it back to its sender.
#[inline(always)]
fn send_back(ctx: &TcContext, macs: &[u8; 12], back: Back) -> Result<i32> {
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| REJECT_FAILED)?;
    let flags = match back {
        Back::Out => 0,
        Back::In => u64::from(aya_ebpf::bindings::BPF_F_INGRESS),
    };
    // SAFETY: the helper has no preconditions; flags 0 sends it out of (egress) the given interface,
    // BPF_F_INGRESS hands it to the interface's receive path.
    unsafe { bpf_redirect(skb::ifindex(ctx), flags) };
    Ok(TC_ACT_REDIRECT)
}
