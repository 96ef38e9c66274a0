//! Source NAT to the node's address, for flows that must come back through this node: external traffic with
//! externalTrafficPolicy Cluster, flows to a backend on another node, hairpin, and `masqueradeAll`.
//!
//! SNAT happens at egress (after routing) and its reverse at ingress (before routing), so the stack never
//! sees a packet whose source is one of its own addresses arriving from outside: strict `rp_filter` holds.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use proxy_common::{
    capacity,
    config::Config,
    conntrack::{CtKey, DIR_SNAT_IN, DIR_SNAT_OUT, SnatValue},
};

use crate::{
    conntrack,
    nat::{self, Side},
    packet::Flow,
};

#[map(name = "SNAT")]
static SNAT: LruHashMap<CtKey, SnatValue> = LruHashMap::pinned(capacity::SNAT, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

/// How many random ports to try before giving up on a new SNATed flow.
const PORT_TRIES: u32 = 8;

/// The node-wide settings the agent wrote.
#[inline(always)]
pub fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Rewrites the source of a new or known flow to the node's address and a port of its own.
#[inline(always)]
pub fn snat(ctx: &TcContext, flow: &Flow, cfg: &Config) -> Result<(), i64> {
    if cfg.snat_addr == 0 {
        return Err(-1);
    }
    let out_key = conntrack::key(flow, DIR_SNAT_OUT);
    // SAFETY: the value is copied out at once.
    let port = if let Some(known) = unsafe { SNAT.get(&out_key).copied() } {
        known.port
    } else {
        let port = allocate_port(flow, cfg)?;
        let out = SnatValue { addr: cfg.snat_addr, port, pad: 0 };
        SNAT.insert(&out_key, &out, u64::from(BPF_ANY)).map_err(i64::from)?;
        port
    };
    nat::rewrite(ctx, flow, Side::Source, cfg.snat_addr, port)
}

/// Finds a free node port for a flow to `flow.dst` and records the way back to the client.
#[inline(always)]
fn allocate_port(flow: &Flow, cfg: &Config) -> Result<u16, i64> {
    let span = u32::from(cfg.snat_port_max.saturating_sub(cfg.snat_port_min)) + 1;
    let back = SnatValue { addr: flow.src_addr, port: flow.src_port, pad: 0 };
    for _ in 0..PORT_TRIES {
        // SAFETY: the helper has no preconditions.
        let offset = unsafe { bpf_get_prandom_u32() } % span;
        // min + offset <= max, so this always fits.
        let port = u16::try_from(u32::from(cfg.snat_port_min) + offset).unwrap_or(cfg.snat_port_min);
        let in_key = CtKey {
            src_addr: flow.dst_addr,
            dst_addr: cfg.snat_addr,
            src_port: flow.dst_port,
            dst_port: port.to_be(),
            proto: flow.proto,
            dir: DIR_SNAT_IN,
            pad: 0,
        };
        // NOEXIST: a port another flow to the same backend holds is never taken over.
        if SNAT.insert(&in_key, &back, u64::from(BPF_NOEXIST)).is_ok() {
            return Ok(port.to_be());
        }
    }
    Err(-1)
}

/// A reply to a SNATed flow: its destination goes back to the client. Returns whether it was one.
#[inline(always)]
pub fn unsnat(ctx: &TcContext, flow: &Flow, cfg: &Config) -> Result<bool, i64> {
    if cfg.snat_addr == 0 || flow.dst_addr != cfg.snat_addr {
        return Ok(false);
    }
    // SAFETY: the value is copied out at once.
    let Some(client) = (unsafe { SNAT.get(&conntrack::key(flow, DIR_SNAT_IN)).copied() }) else {
        return Ok(false);
    };
    nat::rewrite(ctx, flow, Side::Destination, client.addr, client.port)?;
    Ok(true)
}
