//! The service path: the decisions shared by every hook, and the TC ingress and egress built on them.
//!
//! On TC, ingress (before routing) only ever rewrites destinations: DNAT to a backend, and un-SNAT of
//! replies. Egress (after routing) only ever rewrites sources: reverse DNAT of replies, and SNAT. So the
//! kernel routes every packet by its final destination, and strict `rp_filter` never sees a spoofed-looking
//! source. ICMP errors about translated flows follow the same split (`icmp`), and later fragments of a
//! datagram take the path of its first fragment (`frag`).
//!
//! The path is written once over [`Family`]: each program runs it for IPv4 or IPv6 by the packet's
//! ethertype, against that family's maps. ICMP errors are translated in both families (`ICMPv6` other
//! than errors, neighbour discovery included, passes untouched).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    addr::In6,
    backend::{Backend, FLAG_LOCAL},
    config::{Config, FLAG_DRAIN, FLAG_HANDOVER, FLAG_MASQUERADE_ALL},
    conntrack::{CtValue, FLAG_KERNEL_NAT, FLAG_LOCAL_BACKEND, FLAG_SNAT, state},
    mark,
    service::flags,
};

use crate::{
    conntrack::{self, Known},
    drop::{self, FRAG_WITHOUT_FIRST, NO_ENDPOINTS, REJECTED, Reason, Result, SOURCE_RANGE, UNALLOCATED_SERVICE_IP},
    family::Family,
    frag, icmp,
    lb::{self, Unserved},
    nat::{self, Side},
    packet::{self, ETH_P_IP, ETH_P_IPV6, Flow, Parsed},
    reject::Back,
    skb, snat,
};

pub const PASS: i32 = TC_ACT_OK;
pub const DROP: i32 = TC_ACT_SHOT;

/// Where a packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From one of this node's pods.
    Pod,
    /// From a host interface: another node, or outside the cluster.
    Host,
}

/// What to do with a packet addressed somewhere.
pub enum Verdict<A = u32> {
    /// Not addressed to a frontend: leave it alone.
    NotService,
    /// Addressed to a frontend, but the kernel's NAT (netfilter's rules and conntrack) translates this flow:
    /// leave it alone (see `config::FLAG_HANDOVER`, `FLAG_DRAIN`).
    LeftToKernel,
    Drop(Reason),
    /// No usable endpoint anywhere: refuse the client.
    Reject,
    /// Send it to this backend; `snat` if it must also leave with the node's address; `client_port` is the
    /// source port the backend sees (the client's own unless it had to be remapped, see `conntrack`).
    Forward {
        backend: Backend<A>,
        snat: bool,
        client_port: u16,
    },
}

/// The backend a live flow keeps: TCP keeps its backend for the connection's life once the backend has
/// answered, even when the endpoint has left the Service (as kube-proxy's conntrack keeps it: a terminating
/// pod finishes its connections); UDP and a TCP handshake not yet answered keep it only while the backend
/// is still one of this Service's (backend ids are per Service), so they move off a pod that left it as
/// kube-proxy's conntrack cleanup moves them.
#[inline(always)]
fn kept_backend<A: Family>(flow: &Flow<A>, ct: &CtValue<A>) -> Option<Backend<A>> {
    let answered_tcp = flow.proto == proxy_common::proto::TCP && ct.state & state::SYN_ACK != 0;
    if !answered_tcp && lb::backend::<A>(ct.backend_id).is_none() {
        return None;
    }
    let flags = if ct.flags & FLAG_LOCAL_BACKEND != 0 { FLAG_LOCAL } else { 0 };
    Some(Backend { addr: ct.nat_addr, port: ct.nat_port, proto: flow.proto, flags })
}

/// Finds the frontend a flow is addressed to and its backend: the flow's own if it keeps it (see
/// [`kept_backend`]), else the client's affinity, else a random pick. Records new flows in conntrack.
/// `tcp_flags` is the packet's (0 for other protocols).
#[inline(always)]
pub fn decide<A: Family>(flow: &Flow<A>, origin: Origin, cfg: &Config, tcp_flags: u8) -> Result<Verdict<A>> {
    // kube-proxy's local-traffic detection by cluster CIDR: a pod of another node is pod traffic, not
    // external traffic, even when it arrives on a host interface.
    let from_pod = origin == Origin::Pod || flow.src_addr.in_cluster_cidr(cfg);
    let Some(svc) = lb::lookup_service(flow, from_pod) else {
        return Ok(Verdict::NotService);
    };
    // Handing over to the kernel's rules: nothing updates these tables any more, so only a flow this
    // dataplane translated (and keeps) is its business; the rules decide everything else, source ranges
    // included.
    if cfg.flags & FLAG_DRAIN != 0 {
        return Ok(match conntrack::lookup_forward(flow, tcp_flags, cfg) {
            Known::Live(ct) if ct.flags & FLAG_KERNEL_NAT == 0 && !conntrack::reopens(flow, tcp_flags, ct) => {
                match kept_backend(flow, ct) {
                    Some(backend) => {
                        Verdict::Forward { backend, snat: ct.flags & FLAG_SNAT != 0, client_port: ct.client_port }
                    }
                    None => Verdict::LeftToKernel,
                }
            }
            Known::Live(ct) => {
                conntrack::forget_flow(flow, ct);
                Verdict::LeftToKernel
            }
            Known::New => Verdict::LeftToKernel,
        });
    }
    // loadBalancerSourceRanges hold for every sender, pods included: kube-proxy checks them before DNAT in
    // prerouting, which pod traffic passes too.
    if svc.ext_flags & flags::SOURCE_RANGES != 0 && !lb::source_allowed(flow, &svc) {
        return Ok(Verdict::Drop(SOURCE_RANGE));
    }
    if let Known::Live(ct) = conntrack::lookup_forward(flow, tcp_flags, cfg) {
        if ct.flags & FLAG_KERNEL_NAT != 0 {
            if !conntrack::leaves_kernel(flow, tcp_flags, ct, cfg) {
                return Ok(Verdict::LeftToKernel);
            }
        } else if let Some(backend) = kept_backend(flow, ct) {
            return Ok(Verdict::Forward { backend, snat: ct.flags & FLAG_SNAT != 0, client_port: ct.client_port });
        }
        conntrack::forget(flow, ct);
    }
    // Between two dataplanes, a flow this one has not translated is the kernel's rules' to translate.
    if cfg.flags & FLAG_HANDOVER != 0 {
        conntrack::record_kernel(flow, tcp_flags, cfg)?;
        return Ok(Verdict::LeftToKernel);
    }
    let affinity = svc.value.flags & flags::AFFINITY != 0;
    let chosen = if affinity { lb::affinity_backend(flow, &svc) } else { None };
    let Some((backend_id, backend)) = chosen.or_else(|| lb::select_backend(flow, &svc, lb::Asker::Packet, cfg)) else {
        return Ok(if svc.value.flags & flags::REJECT_WHEN_EMPTY != 0 {
            Verdict::Reject
        } else {
            Verdict::Drop(NO_ENDPOINTS)
        });
    };
    if affinity {
        lb::remember_affinity(flow, &svc, backend_id);
    }
    let remote = backend.flags & FLAG_LOCAL == 0;
    // Pod traffic, as kube-proxy masquerades it: to a ClusterIP only with masqueradeAll; to a node port,
    // external or load-balancer address when its policy masquerades (externalTrafficPolicy Cluster;
    // masqueradeAll does not reach those, so a Local policy's pod traffic keeps its source).
    let cluster_ip = svc.ext_flags & flags::CLUSTER_IP != 0;
    let masquerade_pod =
        if cluster_ip { cfg.flags & FLAG_MASQUERADE_ALL != 0 } else { svc.ext_flags & flags::MASQUERADE_EXTERNAL != 0 };
    let snat = match origin {
        // A pod reaching itself through its Service (hairpin) must not see its own address as source.
        Origin::Pod => masquerade_pod || backend.addr == flow.src_addr,
        // Traffic arriving from elsewhere to a backend elsewhere is always SNATed, or its replies would not
        // come back through this node.
        Origin::Host if remote => true,
        // A pod of another node counts as pod traffic.
        Origin::Host if from_pod => masquerade_pod,
        // External traffic is SNATed when the policy says so (always for ClusterIPs).
        Origin::Host => svc.ext_flags & flags::MASQUERADE_EXTERNAL != 0,
    };
    let mut ct_flags = if snat { FLAG_SNAT } else { 0 };
    if !remote {
        ct_flags |= FLAG_LOCAL_BACKEND;
    }
    let value = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        client_port: flow.src_port,
        backend_id,
        rev_nat_id: svc.value.rev_nat_id,
        flags: ct_flags,
        state: conntrack::initial_state(flow.proto, tcp_flags),
        created: 0,
        last_seen: 0,
    };
    let client_port = conntrack::record(flow, value, cfg)?;
    Ok(Verdict::Forward { backend, snat, client_port })
}

/// Whether a packet not addressed to a Service may start a new flow on a reused tuple: a TCP SYN (without
/// ACK), or any UDP datagram (UDP has no start). Only these pay for a conntrack lookup.
#[inline(always)]
fn opens_flow<A: Copy>(flow: &Flow<A>, tcp_flags: u8) -> bool {
    match flow.proto {
        proxy_common::proto::TCP => tcp_flags & (conntrack::TCP_SYN | conntrack::TCP_ACK) == conntrack::TCP_SYN,
        proxy_common::proto::UDP => flow.has_l4_header(),
        _ => false,
    }
}

/// The verdict of a TC program on a packet the path gave up on: counted under its reason, dropped. A
/// packet chosen for translation that could not be translated is never passed on half-rewritten, or with
/// a Service address to a network that does not know it.
#[inline(always)]
pub fn dropped(reason: Reason) -> i32 {
    drop::count(reason);
    DROP
}

/// A later fragment with no record of its datagram (see `frag`): one to a Service address that the node
/// would forward is dropped, since it can be neither translated nor routed on as it is (it would leave by
/// the default route); any other passes, so the node's other traffic (fragments of flows that are not a
/// Service's, reordered or not) still reassembles, also on an external IP that is the node's own address.
#[inline(always)]
fn untracked_fragment<A: Family>(ctx: &TcContext, src: A, dst: A) -> i32 {
    if lb::is_service_addr(dst) && would_forward(ctx, src, dst) {
        return dropped(FRAG_WITHOUT_FIRST);
    }
    crate::stats::count(proxy_common::stats::FRAG_UNTRACKED);
    PASS
}

/// Whether the node would route a packet from `src` to `dst` arriving here on to somewhere else (not
/// deliver it locally), by the kernel's FIB.
#[inline(always)]
fn would_forward<A: Family>(ctx: &TcContext, src: A, dst: A) -> bool {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::{
            BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
            bpf_fib_lookup as FibParams,
        },
        helpers::bpf_fib_lookup,
    };
    // SAFETY: an all-zero bpf_fib_lookup is a valid value of this plain C struct.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = A::AF;
    params.ifindex = skb::ifindex(ctx);
    A::set_fib_addrs(&mut params, src, dst);
    let len = i32::try_from(size_of::<FibParams>()).unwrap_or(0);
    // SAFETY: `params` is a valid bpf_fib_lookup on the stack and its size is passed.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &raw mut params, len, 0) };
    [BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_FRAG_NEEDED]
        .iter()
        .any(|r| rc == i64::from(*r))
}

/// TC ingress on a pod or host interface: DNAT of Service traffic, un-SNAT of replies.
#[inline(always)]
pub fn ingress(ctx: &TcContext, origin: Origin) -> Result<i32> {
    match packet::ethertype(ctx) {
        ETH_P_IP => ingress_of::<u32>(ctx, origin),
        ETH_P_IPV6 => Ok(to_ipv6(ctx, if origin == Origin::Pod { ipv6::POD_INGRESS } else { ipv6::HOST_INGRESS })),
        _ => Ok(PASS),
    }
}

/// The IPv6 path of [`ingress`], run by the IPv6 programs (`tc_*6`).
#[inline(always)]
pub fn ingress6(ctx: &TcContext, origin: Origin) -> Result<i32> {
    ingress_of::<In6>(ctx, origin)
}

#[inline(always)]
fn ingress_of<A: Family>(ctx: &TcContext, origin: Origin) -> Result<i32> {
    let mut flow = match A::parse(ctx) {
        Parsed::Other => return Ok(PASS),
        Parsed::UntrackedFragment { src, dst } => return Ok(untracked_fragment(ctx, src, dst)),
        Parsed::IcmpError(quote) => {
            if let Some(cfg) = snat::config() {
                icmp::ingress(ctx, &quote, cfg)?;
            }
            return Ok(PASS);
        }
        Parsed::Flow(flow) => flow,
    };
    let Some(cfg) = snat::config() else { return Ok(PASS) };
    let tcp_flags = packet::tcp_flags(ctx, &flow);
    if let Some(client) = snat::client_of(&flow, cfg, tcp_flags) {
        frag::remember(&flow);
        nat::rewrite(ctx, &mut flow, Side::Destination, client.addr, client.port)?;
        return Ok(PASS);
    }
    match decide(&flow, origin, cfg, tcp_flags)? {
        Verdict::NotService => {
            if let Some(verdict) = unserved(ctx, &flow, cfg, Back::Out)? {
                return Ok(verdict);
            }
            if opens_flow(&flow, tcp_flags) {
                conntrack::forget_ended_reply(&flow, cfg);
            }
            Ok(PASS)
        }
        Verdict::LeftToKernel => {
            // Later fragments of the datagram pass the same way.
            frag::remember(&flow);
            Ok(PASS)
        }
        Verdict::Drop(reason) => Ok(dropped(reason)),
        Verdict::Reject => refuse(ctx, &flow, Back::Out),
        Verdict::Forward { backend, snat, client_port } => {
            frag::remember(&flow);
            nat::rewrite(ctx, &mut flow, Side::Destination, backend.addr, backend.port)?;
            if client_port != flow.src_port {
                let src = flow.src_addr;
                nat::rewrite(ctx, &mut flow, Side::Source, src, client_port)?;
            }
            if snat {
                ctx.set_mark(skb::mark(ctx) | mark::SNAT);
            }
            Ok(PASS)
        }
    }
}

/// Refuses the sender of `flow` (ICMP port unreachable), counted as a refusal.
#[inline(always)]
fn refuse<A: Family>(ctx: &TcContext, flow: &Flow<A>, back: Back) -> Result<i32> {
    let verdict = A::reject(ctx, flow, back)?;
    drop::count(REJECTED);
    Ok(verdict)
}

/// What happens to a packet that matched no frontend but is addressed to the cluster's service addresses
/// (`lb::unserved`): refused if it is for a ClusterIP's undefined port, dropped if no Service holds the
/// address. `None`: not the service path's business. No such packet leaves by the default route.
#[inline(always)]
fn unserved<A: Family>(ctx: &TcContext, flow: &Flow<A>, cfg: &Config, back: Back) -> Result<Option<i32>> {
    // While draining, the tables are not kept up to date: the rules judge what they do not hold.
    if cfg.flags & FLAG_DRAIN != 0 {
        return Ok(None);
    }
    Ok(match lb::unserved(flow.dst_addr, cfg) {
        Unserved::Elsewhere => None,
        Unserved::ClusterIpPort => Some(refuse(ctx, flow, back)?),
        Unserved::UnallocatedServiceIp => Some(dropped(UNALLOCATED_SERVICE_IP)),
    })
}

/// TC egress on a pod interface: replies get their Service address back, flows to a local backend that
/// must be SNATed get the node's address. (Towards a pod, a packet for a service address is translated or
/// a reply, never the node's own untranslated request.)
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<i32> {
    egress_with(ctx, false)
}

/// TC egress on a host interface: [`egress`], and what the node's own processes send to the cluster's
/// service addresses without translation (a port no Service defines; a socket the socket programs do
/// not see) is refused or dropped there instead of leaving by the default route.
#[inline(always)]
pub fn host_egress(ctx: &TcContext) -> Result<i32> {
    egress_with(ctx, true)
}

#[inline(always)]
fn egress_with(ctx: &TcContext, host: bool) -> Result<i32> {
    match packet::ethertype(ctx) {
        ETH_P_IP => egress_of::<u32>(ctx, host),
        ETH_P_IPV6 => Ok(to_ipv6(ctx, if host { ipv6::HOST_EGRESS } else { ipv6::POD_EGRESS })),
        _ => Ok(PASS),
    }
}

/// The IPv6 path of [`egress`] (`host`: of [`host_egress`]), run by the IPv6 programs (`tc_*6`).
#[inline(always)]
pub fn egress6(ctx: &TcContext, host: bool) -> Result<i32> {
    egress_of::<In6>(ctx, host)
}

/// IPv6 packets go on to the IPv6 program of the same hook by a tail call: each family's path then has
/// the whole 512-byte BPF stack to itself (the two together do not fit in one program), and the IPv4
/// path pays nothing for IPv6. The agent fills [`IPV6_PROGRAMS`] as it loads the object; a slot it has
/// not filled (an object loaded by something else) passes the packet untouched.
pub mod ipv6 {
    pub const POD_INGRESS: u32 = 0;
    pub const POD_EGRESS: u32 = 1;
    pub const HOST_INGRESS: u32 = 2;
    pub const HOST_EGRESS: u32 = 3;
}

#[aya_ebpf::macros::map(name = "IPV6_PROGRAMS")]
static IPV6_PROGRAMS: aya_ebpf::maps::ProgramArray = aya_ebpf::maps::ProgramArray::with_max_entries(4, 0);

#[inline(always)]
fn to_ipv6(ctx: &TcContext, slot: u32) -> i32 {
    // SAFETY: the tail call replaces this program with one of the same type on the same context; when
    // the slot is empty it returns, and the packet passes.
    unsafe { IPV6_PROGRAMS.tail_call(ctx, slot) };
    PASS
}

#[inline(always)]
fn egress_of<A: Family>(ctx: &TcContext, host: bool) -> Result<i32> {
    let mut flow = match A::parse(ctx) {
        Parsed::Other => return Ok(PASS),
        Parsed::UntrackedFragment { .. } => {
            crate::stats::count(proxy_common::stats::FRAG_UNTRACKED);
            return Ok(PASS);
        }
        Parsed::IcmpError(quote) => {
            icmp::egress(ctx, &quote)?;
            return Ok(PASS);
        }
        Parsed::Flow(flow) => flow,
    };
    let Some(cfg) = snat::config() else { return Ok(PASS) };
    let tcp_flags = packet::tcp_flags(ctx, &flow);
    if let Some(original) = conntrack::lookup_reply(&flow, tcp_flags, cfg) {
        frag::remember(&flow);
        nat::rewrite(ctx, &mut flow, Side::Source, original.nat_addr, original.nat_port)?;
        if original.client_port != flow.dst_port {
            let dst = flow.dst_addr;
            nat::rewrite(ctx, &mut flow, Side::Destination, dst, original.client_port)?;
        }
        return Ok(PASS);
    }
    let marked = skb::mark(ctx);
    if marked & mark::SNAT != 0 {
        // The address of the interface the packet leaves by, as netfilter's MASQUERADE takes it.
        let (addr, port) = snat::port_for(&flow, A::snat_addr_for(skb::ifindex(ctx), cfg), cfg, tcp_flags)?;
        frag::remember(&flow);
        nat::rewrite(ctx, &mut flow, Side::Source, addr, port)?;
        // Consumed: an overlay device (VXLAN) keeps the mark on the packet it wraps this one in, which must
        // leave the uplink untranslated.
        ctx.set_mark(marked & !mark::SNAT);
        return Ok(PASS);
    }
    if host && let Some(verdict) = unserved(ctx, &flow, cfg, Back::In)? {
        return Ok(verdict);
    }
    Ok(PASS)
}
