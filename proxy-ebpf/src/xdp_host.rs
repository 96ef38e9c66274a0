//! XDP on host interfaces: NodePort and external traffic translated before the kernel allocates an skb.
//!
//! The fast cases are done here, with results identical to the TC path:
//! - a flow that keeps its source (externalTrafficPolicy Local, local backend): DNAT, then on to the stack;
//! - a flow SNATed to a backend on another node: DNAT and SNAT, and straight back out (`XDP_TX`), both ways.
//!
//! Everything else (a local backend that must be SNATed, a reject, a next hop not yet in the neighbour table,
//! another interface, IPv4 fragments, ICMP errors, a TTL that would expire here) passes untouched, and the
//! TC programs on the same interface handle it, finding the conntrack and SNAT entries recorded here if this
//! program already decided. A packet sent back out with `XDP_TX` was forwarded by this node, so its TTL is
//! decremented as a router would.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    macros::xdp,
    programs::XdpContext,
};
use proxy_common::{backend::FLAG_LOCAL, stats};

use crate::{
    conntrack,
    drop::{self, Result},
    nat::{self, Side},
    packet::{self, Flow, Fragment, IP_CSUM_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF, Packet as _, Parsed},
    service_path::{Origin, Verdict, decide},
    snat,
    stats::count,
};

const AF_INET: u8 = 2;
/// `sizeof(struct bpf_fib_lookup)`
const FIB_PARAMS_LEN: i32 = 64;
const _: () = assert!(size_of::<FibParams>() == FIB_PARAMS_LEN as usize);

#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "#[xdp] fixes the signature")]
pub fn xdp_host(ctx: XdpContext) -> u32 {
    // An error after the packet was changed cannot be undone; drop rather than send it on half-rewritten.
    try_xdp_host(&ctx).unwrap_or_else(|reason| {
        drop::count(reason);
        xdp_action::XDP_DROP
    })
}

/// Decrements the TTL of a packet this node forwards itself, as a router does (RFC 1812), fixing the IPv4
/// checksum. Only for a TTL above 1: the caller hands a packet whose TTL would expire to the stack.
#[inline(always)]
fn forward_hop(ctx: &XdpContext, flow: &Flow) -> Result<()> {
    // TTL and protocol share one 16-bit word of the checksummed header.
    let off = flow.l3() + IP_TTL_OFF;
    let before: [u8; 2] = ctx.load(off)?;
    let after = [before[0].saturating_sub(1), before[1]];
    ctx.store(off, &after)?;
    packet::csum_replace(
        ctx,
        flow.l3() + IP_CSUM_OFF,
        u32::from(u16::from_ne_bytes(before)),
        u32::from(u16::from_ne_bytes(after)),
        2,
        false,
    )
}

/// The next hop's MACs towards `dst`, if it leaves through the interface the packet came in on and fits
/// the route's MTU. A packet too big for the route goes to the stack, which sends the sender the
/// "fragmentation needed" error a router owes it (TC then translates the error): path MTU discovery
/// through a NodePort depends on it.
#[inline(always)]
fn same_interface_next_hop(ctx: &XdpContext, flow: &Flow, src: u32, dst: u32) -> Option<([u8; 6], [u8; 6])> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid value of this plain C struct.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = flow.proto;
    // SAFETY: the context points at the kernel's xdp_md for the whole run.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    // The packet's IPv4 total length (host order), which the lookup checks against the route's MTU.
    params.__bindgen_anon_1.tot_len = u16::from_be(ctx.load::<u16>(flow.l3() + IP_TOT_LEN_OFF).ok()?);
    // SAFETY: `params` is a valid bpf_fib_lookup on the stack and its size is passed.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &raw mut params, FIB_PARAMS_LEN, 0) };
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        count(stats::XDP_FRAG_NEEDED);
        return None;
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || params.ifindex != ifindex {
        return None;
    }
    // SAFETY: on success the kernel filled in the MAC addresses.
    let macs = unsafe { params.__bindgen_anon_6.__bindgen_anon_2 };
    Some((macs.dmac, macs.smac))
}

#[inline(always)]
fn set_macs(ctx: &XdpContext, (dmac, smac): ([u8; 6], [u8; 6])) -> Result<()> {
    ctx.store(0, &dmac)?;
    ctx.store(6, &smac)
}

#[inline(always)]
fn try_xdp_host(ctx: &XdpContext) -> Result<u32> {
    // ICMP errors and fragments need the TC programs' two halves (or their fragment records, which the
    // first fragment writes there).
    let Parsed::Flow(mut flow) = packet::parse4(ctx) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if flow.fragment != Fragment::Whole {
        return Ok(xdp_action::XDP_PASS);
    }
    // The stack's forwarding sends the time-exceeded error a router owes the sender.
    if flow.ttl <= 1 {
        count(stats::XDP_TTL_EXPIRED);
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(cfg) = snat::config() else { return Ok(xdp_action::XDP_PASS) };
    let tcp_flags = packet::tcp_flags(ctx, &flow);

    // A reply to a flow SNATed here: back to the client, from the frontend, in one go.
    if let Some(client) = snat::client_of(&flow, cfg, tcp_flags) {
        let reply = Flow { dst_addr: client.addr, dst_port: client.port, ..flow };
        let Some(original) = conntrack::lookup_reply(&reply, tcp_flags, cfg) else {
            return Ok(xdp_action::XDP_PASS);
        };
        let Some(macs) = same_interface_next_hop(ctx, &flow, original.nat_addr, client.addr) else {
            count(stats::XDP_FALLBACK);
            return Ok(xdp_action::XDP_PASS);
        };
        nat::rewrite(ctx, &mut flow, Side::Destination, client.addr, original.client_port)?;
        nat::rewrite(ctx, &mut flow, Side::Source, original.nat_addr, original.nat_port)?;
        forward_hop(ctx, &flow)?;
        set_macs(ctx, macs)?;
        count(stats::XDP_TX_REPLY);
        return Ok(xdp_action::XDP_TX);
    }

    let (backend, snat, client_port) = match decide(&flow, Origin::Host, cfg, tcp_flags)? {
        Verdict::NotService | Verdict::LeftToKernel => return Ok(xdp_action::XDP_PASS),
        Verdict::Drop(reason) => {
            drop::count(reason);
            return Ok(xdp_action::XDP_DROP);
        }
        // TC builds the ICMP answer; it reaches the same verdict (and counts the refusal).
        Verdict::Reject => {
            count(stats::XDP_FALLBACK);
            return Ok(xdp_action::XDP_PASS);
        }
        Verdict::Forward { backend, snat, client_port } => (backend, snat, client_port),
    };
    if !snat {
        nat::rewrite(ctx, &mut flow, Side::Destination, backend.addr, backend.port)?;
        if client_port != flow.src_port {
            let src = flow.src_addr;
            nat::rewrite(ctx, &mut flow, Side::Source, src, client_port)?;
        }
        count(stats::XDP_DNAT_PASS);
        return Ok(xdp_action::XDP_PASS);
    }
    if backend.flags & FLAG_LOCAL != 0 {
        count(stats::XDP_FALLBACK);
        return Ok(xdp_action::XDP_PASS);
    }
    // Sent back out of the interface it came in by: that interface's SNAT address.
    // SAFETY: the context points at the kernel's xdp_md for the whole run.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let addr = snat::addr_for(ifindex, cfg);
    let Some(macs) = same_interface_next_hop(ctx, &flow, addr, backend.addr) else {
        count(stats::XDP_FALLBACK);
        return Ok(xdp_action::XDP_PASS);
    };
    let after_dnat = Flow { dst_addr: backend.addr, dst_port: backend.port, src_port: client_port, ..flow };
    let (addr, port) = snat::port_for(&after_dnat, addr, cfg, tcp_flags)?;
    nat::rewrite(ctx, &mut flow, Side::Destination, backend.addr, backend.port)?;
    nat::rewrite(ctx, &mut flow, Side::Source, addr, port)?;
    forward_hop(ctx, &flow)?;
    set_macs(ctx, macs)?;
    count(stats::XDP_TX_FORWARD);
    Ok(xdp_action::XDP_TX)
}

/// Passes every frame. A veth only wakes its receiving side for frames its peer sends with `XDP_TX` when that
/// side has an XDP program of its own, so a node whose uplink is a veth (a lab, a container) needs this on
/// the far end for native-mode `XDP_TX` to deliver. Physical NICs need nothing of the kind.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
