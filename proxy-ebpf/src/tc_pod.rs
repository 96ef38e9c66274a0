//! TC programs on the node's pod-facing interfaces (the host end of each pod's veth).
//!
//! - `tc_pod_ingress` sees what a pod sends: packets to a frontend get a backend as their destination (DNAT).
//! - `tc_pod_egress` sees what is delivered to a pod: replies of translated flows get the frontend back as
//!   their source. Doing this at egress, after routing, keeps `rp_filter` on the backend side out of the way.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::conntrack::CtValue;

use crate::{
    conntrack, lb,
    nat::{self, Side},
    packet,
};

const PASS: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    // A packet that was chosen for translation but could not be translated is dropped, never passed on
    // half-rewritten or with the service address to a network that does not know it.
    try_pod_ingress(&ctx).unwrap_or(DROP)
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    try_pod_egress(&ctx).unwrap_or(DROP)
}

#[inline(always)]
fn try_pod_ingress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(flow) = packet::parse(ctx) else {
        return Ok(PASS);
    };
    let Some(svc) = lb::lookup_service(&flow) else {
        return Ok(PASS);
    };
    // An established flow keeps its backend while that backend exists; otherwise pick (again).
    let backend = if let Some(known) = conntrack::lookup_forward(&flow).and_then(|ct| lb::backend(ct.backend_id)) {
        known
    } else {
        let Some((backend_id, picked)) = lb::select_backend(&flow, &svc) else {
            // No usable backend.
            return Ok(DROP);
        };
        let value = CtValue { backend_id, rev_nat_id: svc.rev_nat_id };
        conntrack::record(&flow, &picked, &value).map_err(i64::from)?;
        picked
    };
    nat::rewrite(ctx, &flow, Side::Destination, backend.addr, backend.port)?;
    Ok(PASS)
}

#[inline(always)]
fn try_pod_egress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(flow) = packet::parse(ctx) else {
        return Ok(PASS);
    };
    let Some(ct) = conntrack::lookup_reply(&flow) else {
        return Ok(PASS);
    };
    let Some(frontend) = nat::revnat(ct.rev_nat_id) else {
        // The service is gone; the client will see its connection fail, as it would with kube-proxy.
        return Ok(PASS);
    };
    nat::rewrite(ctx, &flow, Side::Source, frontend.addr, frontend.port)?;
    Ok(PASS)
}
