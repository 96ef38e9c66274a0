//! The service path, shared by the pod-facing and host-facing hooks.
//!
//! Ingress (before routing) only ever rewrites destinations: DNAT to a backend, and un-SNAT of replies.
//! Egress (after routing) only ever rewrites sources: reverse DNAT of replies, and SNAT. So the kernel routes
//! every packet by its final destination, and strict `rp_filter` never sees a spoofed-looking source.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    backend::FLAG_LOCAL,
    config::FLAG_MASQUERADE_ALL,
    conntrack::{CtValue, FLAG_SNAT},
    mark,
    service::flags,
};

use crate::{
    conntrack, lb,
    nat::{self, Side},
    packet, reject, skb, snat,
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

#[inline(always)]
pub fn ingress(ctx: &TcContext, origin: Origin) -> Result<i32, i64> {
    let Some(flow) = packet::parse(ctx) else {
        return Ok(PASS);
    };
    let cfg = snat::config();
    if snat::unsnat(ctx, &flow, &cfg)? {
        return Ok(PASS);
    }
    let Some(svc) = lb::lookup_service(&flow, origin == Origin::Pod) else {
        return Ok(PASS);
    };
    if origin == Origin::Host && svc.ext_flags & flags::SOURCE_RANGES != 0 && !lb::source_allowed(&flow, &svc) {
        return Ok(DROP);
    }

    // An established flow keeps its backend while that backend exists; otherwise pick (again).
    let known = conntrack::lookup_forward(&flow).and_then(|ct| lb::backend(ct.backend_id).map(|b| (b, ct.flags)));
    let (backend, ct_flags) = if let Some(known) = known {
        known
    } else {
        let affinity = svc.value.flags & flags::AFFINITY != 0;
        let chosen = if affinity { lb::affinity_backend(&flow, &svc) } else { None };
        let Some((backend_id, backend)) = chosen.or_else(|| lb::select_backend(&flow, &svc)) else {
            return if svc.value.flags & flags::REJECT_WHEN_EMPTY != 0 { reject::reject(ctx, &flow) } else { Ok(DROP) };
        };
        if affinity {
            lb::remember_affinity(&flow, &svc, backend_id);
        }
        let snat = match origin {
            // A pod reaching itself through its Service (hairpin) must not see its own address as source.
            Origin::Pod => cfg.flags & FLAG_MASQUERADE_ALL != 0 || backend.addr == flow.src_addr,
            // External traffic is SNATed when the policy says so, and always when the backend is elsewhere,
            // or its replies would not come back through this node.
            Origin::Host => svc.ext_flags & flags::MASQUERADE_EXTERNAL != 0 || backend.flags & FLAG_LOCAL == 0,
        };
        let ct_flags = if snat { FLAG_SNAT } else { 0 };
        let value = CtValue { backend_id, rev_nat_id: svc.value.rev_nat_id, flags: ct_flags };
        conntrack::record(&flow, &backend, &value).map_err(i64::from)?;
        (backend, ct_flags)
    };
    nat::rewrite(ctx, &flow, Side::Destination, backend.addr, backend.port)?;
    if ct_flags & FLAG_SNAT != 0 {
        ctx.set_mark(skb::mark(ctx) | mark::SNAT);
    }
    Ok(PASS)
}

#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(flow) = packet::parse(ctx) else {
        return Ok(PASS);
    };
    if let Some(ct) = conntrack::lookup_reply(&flow) {
        let Some(frontend) = nat::revnat(ct.rev_nat_id) else {
            // The Service is gone; the client's connection fails, as it would with kube-proxy.
            return Ok(PASS);
        };
        nat::rewrite(ctx, &flow, Side::Source, frontend.addr, frontend.port)?;
        return Ok(PASS);
    }
    if skb::mark(ctx) & mark::SNAT != 0 {
        snat::snat(ctx, &flow, &snat::config())?;
    }
    Ok(PASS)
}
