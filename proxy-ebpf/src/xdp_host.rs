//! XDP on host interfaces: NodePort and external traffic translated before the kernel allocates an skb.
//!
//! The fast cases are done here, with results identical to the TC path:
//! - a flow that keeps its source (externalTrafficPolicy Local, local backend): DNAT, then on to the stack;
//! - a flow SNATed to a backend on another node: DNAT and SNAT, and straight back out (`XDP_TX`), both ways.
//!
//! Everything else (a local backend that must be SNATed, a reject, a next hop not yet in the neighbour table,
//! another interface, IP fragments, ICMP errors, a TTL that would expire here) passes untouched, and the
//! TC programs on the same interface handle it, finding the conntrack and SNAT entries recorded here if this
//! program already decided. A packet sent back out with `XDP_TX` was forwarded by this node, so its TTL
//! (IPv6: hop limit) is decremented as a router would.
//!
//! Both families, as on TC: IPv4 in `xdp_host`, IPv6 in `xdp_host6` and the two programs it hands steps on
//! to, by tail calls (`XDP_IPV6_PROGRAMS`): IPv6's addresses make its structures big, and the IPv6 path
//! in one program needs more than the 512-byte stack.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    macros::{map, xdp},
    maps::{PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use proxy_common::{
    addr::In6,
    backend::{Backend, FLAG_LOCAL},
    config::Config,
    conntrack::SnatValue,
    stats,
};

use crate::{
    conntrack,
    drop::{self, Result},
    family::Family,
    nat::{self, Side},
    packet::{
        self, ETH_P_IP, ETH_P_IPV6, Flow, Fragment, IP_CSUM_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF, IP6_HLEN, Packet as _,
        Parsed,
    },
    service_path::{Origin, Verdict, decide},
    snat,
    stats::count,
};

/// `sizeof(struct bpf_fib_lookup)`
const FIB_PARAMS_LEN: i32 = 64;
const _: () = assert!(size_of::<FibParams>() == FIB_PARAMS_LEN as usize);

/// The IPv6 programs: `xdp_host` hands IPv6 frames to `xdp_host6`, which hands SNAT replies and flows to
/// SNAT on to the other two (the whole IPv6 path in one program exceeds the 512-byte stack). The agent
/// fills the table as it loads the object; while a slot is empty the frame passes to TC, which gives the
/// same verdict.
pub mod ipv6 {
    pub const SERVICE: u32 = 0;
    pub const REPLY: u32 = 1;
    pub const SNAT: u32 = 2;
}

#[map(name = "XDP_IPV6_PROGRAMS")]
static XDP_IPV6_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(3, 0);

/// What `xdp_host6` decided for a flow that `xdp_host6_snat` sends on: read back at once, by the same
/// packet's run on the same CPU.
#[derive(Clone, Copy)]
struct SnatStep6 {
    backend: Backend<In6>,
    client_port: u16,
}

#[map(name = "XDP_SNAT_STEP6")]
static XDP_SNAT_STEP6: PerCpuArray<SnatStep6> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn to_ipv6(ctx: &XdpContext, slot: u32) -> u32 {
    // SAFETY: the tail call replaces this program with one of the same type on the same context; when
    // the slot is empty it returns, and the frame passes.
    unsafe { XDP_IPV6_PROGRAMS.tail_call(ctx, slot) };
    xdp_action::XDP_PASS
}

#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "#[xdp] fixes the signature")]
pub fn xdp_host(ctx: XdpContext) -> u32 {
    match packet::ethertype(&ctx) {
        ETH_P_IP => verdict(try_xdp_host4(&ctx)),
        ETH_P_IPV6 => to_ipv6(&ctx, ipv6::SERVICE),
        _ => xdp_action::XDP_PASS,
    }
}

/// IPv6: the service decision (and a flow that keeps its source, DNATed and passed on); SNAT replies and
/// flows to SNAT go on to the next two programs.
#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "#[xdp] fixes the signature")]
pub fn xdp_host6(ctx: XdpContext) -> u32 {
    verdict(try_xdp_host6(&ctx))
}

/// IPv6: a reply to a flow SNATed here, back out in one go.
#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "#[xdp] fixes the signature")]
pub fn xdp_host6_reply(ctx: XdpContext) -> u32 {
    verdict(try_xdp_host6_reply(&ctx))
}

/// IPv6: a flow `xdp_host6` sent to a backend on another node, SNATed and sent back out.
#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "#[xdp] fixes the signature")]
pub fn xdp_host6_snat(ctx: XdpContext) -> u32 {
    verdict(try_xdp_host6_snat(&ctx))
}

/// An error after the packet was changed cannot be undone; drop rather than send it on half-rewritten.
#[inline(always)]
fn verdict(result: Result<u32>) -> u32 {
    result.unwrap_or_else(|reason| {
        drop::count(reason);
        xdp_action::XDP_DROP
    })
}

/// What forwarding a packet itself takes, per family.
pub trait Forwarded: Family {
    /// Decrements the TTL (IPv6: hop limit) of a packet this node forwards itself, as a router does
    /// (RFC 1812, RFC 8200), with IPv4's header checksum. Only for a TTL above 1: the caller hands a
    /// packet whose TTL would expire to the stack.
    fn forward_hop(ctx: &XdpContext, flow: &Flow<Self>) -> Result<()>;
    /// The packet's length at the IP layer (host order), which the FIB lookup checks against the route's MTU.
    fn ip_len(ctx: &XdpContext, flow: &Flow<Self>) -> Option<u16>;
}

impl Forwarded for u32 {
    #[inline(always)]
    fn forward_hop(ctx: &XdpContext, flow: &Flow<Self>) -> Result<()> {
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

    #[inline(always)]
    fn ip_len(ctx: &XdpContext, flow: &Flow<Self>) -> Option<u16> {
        ctx.load::<u16>(flow.l3() + IP_TOT_LEN_OFF).ok().map(u16::from_be)
    }
}

/// Where the hop limit and the payload length sit in the IPv6 header.
const IP6_HOP_LIMIT_OFF: usize = 7;
const IP6_PAYLOAD_LEN_OFF: usize = 4;

impl Forwarded for In6 {
    #[inline(always)]
    fn forward_hop(ctx: &XdpContext, flow: &Flow<Self>) -> Result<()> {
        // No header checksum in IPv6, and no L4 checksum covers the hop limit.
        let off = flow.l3() + IP6_HOP_LIMIT_OFF;
        let hop_limit: u8 = ctx.load(off)?;
        ctx.store(off, &hop_limit.saturating_sub(1))
    }

    #[inline(always)]
    fn ip_len(ctx: &XdpContext, flow: &Flow<Self>) -> Option<u16> {
        let payload = u16::from_be(ctx.load::<u16>(flow.l3() + IP6_PAYLOAD_LEN_OFF).ok()?);
        payload.checked_add(u16::try_from(IP6_HLEN).ok()?)
    }
}

/// The next hop's MACs towards `dst`, if it leaves through the interface the packet came in on and fits
/// the route's MTU. A packet too big for the route goes to the stack, which sends the sender the
/// "fragmentation needed" (IPv6: Packet Too Big) error a router owes it (TC then translates the error):
/// path MTU discovery through a NodePort depends on it.
#[inline(always)]
fn same_interface_next_hop<A: Forwarded>(
    ctx: &XdpContext,
    flow: &Flow<A>,
    src: A,
    dst: A,
) -> Option<([u8; 6], [u8; 6])> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid value of this plain C struct.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = A::AF;
    params.l4_protocol = flow.proto;
    let ifindex = ingress_ifindex(ctx);
    params.ifindex = ifindex;
    A::set_fib_addrs(&mut params, src, dst);
    params.__bindgen_anon_1.tot_len = A::ip_len(ctx, flow)?;
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
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: the context points at the kernel's xdp_md for the whole run.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

#[inline(always)]
fn set_macs(ctx: &XdpContext, (dmac, smac): ([u8; 6], [u8; 6])) -> Result<()> {
    ctx.store(0, &dmac)?;
    ctx.store(6, &smac)
}

/// A frame this program may forward itself: a whole TCP, UDP or SCTP packet (ICMP errors and fragments
/// need the TC programs' two halves, or their fragment records, which the first fragment writes there)
/// whose TTL does not expire here (the stack's forwarding sends the time-exceeded error a router owes
/// the sender). With the node's settings and the packet's TCP flags.
#[inline(always)]
fn forwardable<A: Forwarded>(ctx: &XdpContext) -> Option<(Flow<A>, &'static Config, u8)> {
    let Parsed::Flow(flow) = A::parse(ctx) else { return None };
    if flow.fragment != Fragment::Whole {
        return None;
    }
    if flow.ttl <= 1 {
        count(stats::XDP_TTL_EXPIRED);
        return None;
    }
    let cfg = snat::config()?;
    Some((flow, cfg, packet::tcp_flags(ctx, &flow)))
}

#[inline(always)]
fn try_xdp_host4(ctx: &XdpContext) -> Result<u32> {
    let Some((mut flow, cfg, tcp_flags)) = forwardable::<u32>(ctx) else { return Ok(xdp_action::XDP_PASS) };
    if let Some(client) = snat::client_of(&flow, cfg, tcp_flags) {
        return reply(ctx, &mut flow, cfg, tcp_flags, &client);
    }
    match service(ctx, &mut flow, cfg, tcp_flags)? {
        Step::Done(verdict) => Ok(verdict),
        Step::Snat { backend, client_port } => send_snat(ctx, &mut flow, cfg, tcp_flags, &backend, client_port),
    }
}

#[inline(always)]
fn try_xdp_host6(ctx: &XdpContext) -> Result<u32> {
    let Some((mut flow, cfg, tcp_flags)) = forwardable::<In6>(ctx) else { return Ok(xdp_action::XDP_PASS) };
    // Only looked at here; the reply program notes the packet on the entry.
    if snat::lookup_in(&flow, cfg).is_some() {
        return Ok(to_ipv6(ctx, ipv6::REPLY));
    }
    match service(ctx, &mut flow, cfg, tcp_flags)? {
        Step::Done(verdict) => Ok(verdict),
        Step::Snat { backend, client_port } => {
            let Some(step) = XDP_SNAT_STEP6.get_ptr_mut(0) else { return Ok(xdp_action::XDP_PASS) };
            // SAFETY: this CPU's entry, valid for the program run; read back by the program tail-called next.
            unsafe { step.write(SnatStep6 { backend, client_port }) };
            // Without the next program the frame passes to TC, which finds the flow decided here.
            Ok(to_ipv6(ctx, ipv6::SNAT))
        }
    }
}

#[inline(always)]
fn try_xdp_host6_reply(ctx: &XdpContext) -> Result<u32> {
    let Some((mut flow, cfg, tcp_flags)) = forwardable::<In6>(ctx) else { return Ok(xdp_action::XDP_PASS) };
    match snat::client_of(&flow, cfg, tcp_flags) {
        Some(client) => reply(ctx, &mut flow, cfg, tcp_flags, &client),
        None => Ok(xdp_action::XDP_PASS),
    }
}

#[inline(always)]
fn try_xdp_host6_snat(ctx: &XdpContext) -> Result<u32> {
    let Some((mut flow, cfg, tcp_flags)) = forwardable::<In6>(ctx) else { return Ok(xdp_action::XDP_PASS) };
    let Some(step) = XDP_SNAT_STEP6.get(0) else { return Ok(xdp_action::XDP_PASS) };
    let SnatStep6 { backend, client_port } = *step;
    send_snat(ctx, &mut flow, cfg, tcp_flags, &backend, client_port)
}

/// A reply to a flow SNATed here (`client` its SNAT entry): back to the client, from the frontend, in one
/// go, if the way back leaves by the interface it came in on.
#[inline(always)]
fn reply<A: Forwarded>(
    ctx: &XdpContext,
    flow: &mut Flow<A>,
    cfg: &Config,
    tcp_flags: u8,
    client: &SnatValue<A>,
) -> Result<u32> {
    // Looked up as the reply it is once un-SNATed (in place: a copy of an IPv6 flow costs stack).
    let sent_to = (flow.dst_addr, flow.dst_port);
    (flow.dst_addr, flow.dst_port) = (client.addr, client.port);
    let Some(original) = conntrack::lookup_reply(flow, tcp_flags, cfg) else {
        return Ok(xdp_action::XDP_PASS);
    };
    (flow.dst_addr, flow.dst_port) = sent_to;
    let Some(macs) = same_interface_next_hop(ctx, flow, original.nat_addr, client.addr) else {
        count(stats::XDP_FALLBACK);
        return Ok(xdp_action::XDP_PASS);
    };
    nat::rewrite(ctx, flow, Side::Destination, client.addr, original.client_port)?;
    nat::rewrite(ctx, flow, Side::Source, original.nat_addr, original.nat_port)?;
    A::forward_hop(ctx, flow)?;
    set_macs(ctx, macs)?;
    count(stats::XDP_TX_REPLY);
    Ok(xdp_action::XDP_TX)
}

/// What the service decision leaves to do.
enum Step<A> {
    /// The verdict: passed (translated or not), or dropped.
    Done(u32),
    /// Send the flow to `backend` on another node, SNATed ([`send_snat`]).
    Snat { backend: Backend<A>, client_port: u16 },
}

/// The service decision for a frame from outside: the TC path's (`decide`), and what XDP does with it.
#[inline(always)]
fn service<A: Forwarded>(ctx: &XdpContext, flow: &mut Flow<A>, cfg: &Config, tcp_flags: u8) -> Result<Step<A>> {
    let (backend, snat, client_port) = match decide(flow, Origin::Host, cfg, tcp_flags)? {
        Verdict::NotService | Verdict::LeftToKernel => return Ok(Step::Done(xdp_action::XDP_PASS)),
        Verdict::Drop(reason) => {
            drop::count(reason);
            return Ok(Step::Done(xdp_action::XDP_DROP));
        }
        // TC builds the ICMP answer; it reaches the same verdict (and counts the refusal).
        Verdict::Reject => {
            count(stats::XDP_FALLBACK);
            return Ok(Step::Done(xdp_action::XDP_PASS));
        }
        Verdict::Forward { backend, snat, client_port } => (backend, snat, client_port),
    };
    if !snat {
        nat::rewrite(ctx, flow, Side::Destination, backend.addr, backend.port)?;
        if client_port != flow.src_port {
            let src = flow.src_addr;
            nat::rewrite(ctx, flow, Side::Source, src, client_port)?;
        }
        count(stats::XDP_DNAT_PASS);
        return Ok(Step::Done(xdp_action::XDP_PASS));
    }
    if backend.flags & FLAG_LOCAL != 0 {
        count(stats::XDP_FALLBACK);
        return Ok(Step::Done(xdp_action::XDP_PASS));
    }
    Ok(Step::Snat { backend, client_port })
}

/// A flow to `backend` on another node, DNATed and SNATed, straight back out (`XDP_TX`) if the way there
/// leaves by the interface it came in on; else passed untouched to TC, which finds the flow decided.
#[inline(always)]
fn send_snat<A: Forwarded>(
    ctx: &XdpContext,
    flow: &mut Flow<A>,
    cfg: &Config,
    tcp_flags: u8,
    backend: &Backend<A>,
    client_port: u16,
) -> Result<u32> {
    // Sent back out of the interface it came in by: that interface's SNAT address.
    let addr = A::snat_addr_for(ingress_ifindex(ctx), cfg);
    let Some(macs) = same_interface_next_hop(ctx, flow, addr, backend.addr) else {
        count(stats::XDP_FALLBACK);
        return Ok(xdp_action::XDP_PASS);
    };
    nat::rewrite(ctx, flow, Side::Destination, backend.addr, backend.port)?;
    // The SNAT entry is keyed by the client port the backend would see. The flow is changed in place, not
    // copied: a copy of an IPv6 flow costs stack.
    let sent_port = flow.src_port;
    flow.src_port = client_port;
    let (addr, port) = snat::port_for(flow, addr, cfg, tcp_flags)?;
    flow.src_port = sent_port;
    nat::rewrite(ctx, flow, Side::Source, addr, port)?;
    A::forward_hop(ctx, flow)?;
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
