//! Refusing a client at once (a Service without usable endpoints, a ClusterIP's undefined port): the packet
//! is turned, in place, into an ICMP "port unreachable" from the address it was sent to and sent back to
//! the sender. This is what kube-proxy's REJECT rule does; TCP clients see ECONNREFUSED, connected UDP
//! sockets too.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_csum_diff, helpers::bpf_redirect, programs::TcContext};

use crate::{
    drop::{REJECT_FAILED, Result},
    packet::{ETH_HLEN, Flow},
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

/// One's-complement sum of `words`, folded to 16 bits and inverted: the Internet checksum.
#[inline(always)]
fn checksum(words: &mut [u32]) -> u16 {
    let len = u32::try_from(words.len() * 4).unwrap_or(0);
    // SAFETY: the buffer is on the stack and `len` is its exact size in bytes.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words.as_mut_ptr(), len, 0) };
    let mut sum = sum.cast_unsigned();
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
pub fn reject(ctx: &TcContext, flow: &Flow, back: Back) -> Result<i32> {
    // IP options would change the quote's length, and a later fragment has no L4 header to quote; such
    // packets are only dropped.
    if flow.l4_off != ETH_HLEN + IP_HLEN || !flow.has_l4_header() {
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
    // Back to where it came from: the sender's MAC becomes the destination.
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| REJECT_FAILED)?;
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| REJECT_FAILED)?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0).map_err(|_| REJECT_FAILED)?;
    let flags = match back {
        Back::Out => 0,
        Back::In => u64::from(aya_ebpf::bindings::BPF_F_INGRESS),
    };
    // SAFETY: the helper has no preconditions; flags 0 sends it out of (egress) the given interface,
    // BPF_F_INGRESS hands it to the interface's receive path.
    unsafe { bpf_redirect(skb::ifindex(ctx), flags) };
    Ok(TC_ACT_REDIRECT)
}
