//! The service path: the decisions shared by every hook, and the TC ingress and egress built on them.
//!
//! On TC, ingress (before routing) only ever rewrites destinations: DNAT to a backend, and un-SNAT of
//! replies. Egress (after routing) only ever rewrites sources: reverse DNAT of replies, and SNAT. So the
//! kernel routes every packet by its final destination, and strict `rp_filter` never sees a spoofed-looking
//! source. ICMP errors about translated flows follow the same split (`icmp`), and later fragments of a
//! datagram take the path of its first fragment (`frag`).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    backend::{Backend, FLAG_LOCAL},
    config::{Config, FLAG_MASQUERADE_ALL},
    conntrack::{CtValue, FLAG_LOCAL_BACKEND, FLAG_SNAT, state},
    mark,
    service::flags,
};

use crate::{
    conntrack::{self, Known},
    drop::{self, FRAG_WITHOUT_FIRST, NO_ENDPOINTS, REJECTED, Reason, Result, SOURCE_RANGE},
    frag, icmp, lb,
    nat::{self, Side},
    packet::{self, Flow, Parsed},
    reject, skb, snat,
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
pub enum Verdict {
    /// Not addressed to a frontend: leave it alone.
    NotService,
    Drop(Reason),
    /// No usable endpoint anywhere: refuse the client.
    Reject,
    /// Send it to this backend; `snat` if it must also leave with the node's address; `client_port` is the
    /// source port the backend sees (the client's own unless it had to be remapped, see `conntrack`).
    Forward {
        backend: Backend,
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
fn kept_backend(flow: &Flow, ct: &CtValue) -> Option<Backend> {
    let answered_tcp = flow.proto == proxy_common::proto::TCP && ct.state & state::SYN_ACK != 0;
    if !answered_tcp && lb::backend(ct.backend_id).is_none() {
        return None;
    }
    let flags = if ct.flags & FLAG_LOCAL_BACKEND != 0 { FLAG_LOCAL } else { 0 };
    Some(Backend { addr: ct.nat_addr, port: ct.nat_port, proto: flow.proto, flags })
}

/// Finds the frontend a flow is addressed to and its backend: the flow's own if it keeps it (see
/// [`kept_backend`]), else the client's affinity, else a random pick. Records new flows in conntrack.
/// `tcp_flags` is the packet's (0 for other protocols).
#[inline(always)]
pub fn decide(flow: &Flow, origin: Origin, cfg: &Config, tcp_flags: u8) -> Result<Verdict> {
    // kube-proxy's local-traffic detection by cluster CIDR: a pod of another node is pod traffic, not
    // external traffic, even when it arrives on a host interface.
    let from_pod =
        origin == Origin::Pod || (cfg.cluster_mask != 0 && flow.src_addr & cfg.cluster_mask == cfg.cluster_addr);
    let Some(svc) = lb::lookup_service(flow, from_pod) else {
        return Ok(Verdict::NotService);
    };
    if origin == Origin::Host && svc.ext_flags & flags::SOURCE_RANGES != 0 && !lb::source_allowed(flow, &svc) {
        return Ok(Verdict::Drop(SOURCE_RANGE));
    }
    if let Known::Live(ct) = conntrack::lookup_forward(flow, tcp_flags, cfg) {
        if let Some(backend) = kept_backend(flow, &ct) {
            return Ok(Verdict::Forward { backend, snat: ct.flags & FLAG_SNAT != 0, client_port: ct.client_port });
        }
        conntrack::forget(flow, &ct);
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
    let snat = match origin {
        // A pod reaching itself through its Service (hairpin) must not see its own address as source; and
        // like kube-proxy, pod traffic to a node port, external or load-balancer address of a Service with
        // externalTrafficPolicy Cluster is masqueraded too.
        Origin::Pod => {
            cfg.flags & FLAG_MASQUERADE_ALL != 0
                || backend.addr == flow.src_addr
                || svc.ext_flags & (flags::MASQUERADE_EXTERNAL | flags::CLUSTER_IP) == flags::MASQUERADE_EXTERNAL
        }
        // Traffic arriving from elsewhere to a backend elsewhere is always SNATed, or its replies would not
        // come back through this node.
        Origin::Host if remote => true,
        // A pod of another node: like kube-proxy, SNAT only where the policy masquerades pod traffic too
        // (externalTrafficPolicy Cluster on a node port or external address), not for ClusterIPs.
        Origin::Host if from_pod => {
            cfg.flags & FLAG_MASQUERADE_ALL != 0
                || svc.ext_flags & (flags::MASQUERADE_EXTERNAL | flags::CLUSTER_IP) == flags::MASQUERADE_EXTERNAL
        }
        // External traffic is SNATed when the policy says so.
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
fn opens_flow(flow: &Flow, tcp_flags: u8) -> bool {
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
fn untracked_fragment(ctx: &TcContext, src: u32, dst: u32) -> i32 {
    if lb::is_service_addr(dst) && would_forward(ctx, src, dst) {
        return dropped(FRAG_WITHOUT_FIRST);
    }
    crate::stats::count(proxy_common::stats::FRAG_UNTRACKED);
    PASS
}

/// Whether the node would route a packet from `src` to `dst` arriving here on to somewhere else (not
/// deliver it locally), by the kernel's FIB.
#[inline(always)]
fn would_forward(ctx: &TcContext, src: u32, dst: u32) -> bool {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::{
            BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
            bpf_fib_lookup as FibParams,
        },
        helpers::bpf_fib_lookup,
    };
    const AF_INET: u8 = 2;
    // SAFETY: an all-zero bpf_fib_lookup is a valid value of this plain C struct.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = skb::ifindex(ctx);
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    let len = i32::try_from(size_of::<FibParams>()).unwrap_or(0);
    // SAFETY: `params` is a valid bpf_fib_lookup on the stack and its size is passed.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &raw mut params, len, 0) };
    [BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_FRAG_NEEDED]
        .iter()
        .any(|r| rc == i64::from(*r))
}

#[inline(always)]
pub fn ingress(ctx: &TcContext, origin: Origin) -> Result<i32> {
    let mut flow = match packet::parse(ctx) {
        Parsed::Other => return Ok(PASS),
        Parsed::UntrackedFragment { src, dst } => return Ok(untracked_fragment(ctx, src, dst)),
        Parsed::IcmpError(quote) => {
            icmp::ingress(ctx, &quote, &snat::config())?;
            return Ok(PASS);
        }
        Parsed::Flow(flow) => flow,
    };
    let cfg = snat::config();
    let tcp_flags = packet::tcp_flags(ctx, &flow);
    if let Some(client) = snat::client_of(&flow, &cfg, tcp_flags) {
        frag::remember(&flow);
        nat::rewrite(ctx, &mut flow, Side::Destination, client.addr, client.port)?;
        return Ok(PASS);
    }
    match decide(&flow, origin, &cfg, tcp_flags)? {
        Verdict::NotService => {
            if opens_flow(&flow, tcp_flags) {
                conntrack::forget_ended_reply(&flow, &cfg);
            }
            Ok(PASS)
        }
        Verdict::Drop(reason) => Ok(dropped(reason)),
        Verdict::Reject => {
            let verdict = reject::reject(ctx, &flow)?;
            drop::count(REJECTED);
            Ok(verdict)
        }
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

#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<i32> {
    let mut flow = match packet::parse(ctx) {
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
    let cfg = snat::config();
    let tcp_flags = packet::tcp_flags(ctx, &flow);
    if let Some(original) = conntrack::lookup_reply(&flow, tcp_flags, &cfg) {
        frag::remember(&flow);
        nat::rewrite(ctx, &mut flow, Side::Source, original.nat_addr, original.nat_port)?;
        if original.client_port != flow.dst_port {
            let dst = flow.dst_addr;
            nat::rewrite(ctx, &mut flow, Side::Destination, dst, original.client_port)?;
        }
        return Ok(PASS);
    }
    if skb::mark(ctx) & mark::SNAT != 0 {
        let port = snat::port_for(&flow, &cfg, tcp_flags)?;
        frag::remember(&flow);
        nat::rewrite(ctx, &mut flow, Side::Source, cfg.snat_addr, port)?;
    }
    Ok(PASS)
}
