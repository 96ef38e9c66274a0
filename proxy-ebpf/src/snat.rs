//! Source NAT to the node's address, for flows that must come back through this node: external traffic with
//! externalTrafficPolicy Cluster, flows to a backend on another node, hairpin, and `masqueradeAll`.
//!
//! On the TC path SNAT happens at egress (after routing) and its reverse at ingress (before routing), so the
//! stack never sees a packet whose source is one of its own addresses arriving from outside. The XDP path
//! does both at once and sends the packet straight back out.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, LruHashMap},
};
use proxy_common::{
    capacity,
    config::Config,
    conntrack::{CtKey, DIR_SNAT_IN, DIR_SNAT_OUT, SnatValue},
};

use crate::{conntrack, packet::Flow};

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

/// The node port a flow (client → backend, after DNAT) leaves with: the one it has, or a new one.
#[inline(always)]
pub fn port_for(flow: &Flow, cfg: &Config) -> Result<u16, i64> {
    if cfg.snat_addr == 0 {
        return Err(-1);
    }
    let out_key = conntrack::key(flow, DIR_SNAT_OUT);
    // SAFETY: the value is copied out at once.
    if let Some(known) = unsafe { SNAT.get(&out_key).copied() } {
        return Ok(known.port);
    }
    let port = allocate_port(flow, cfg)?;
    let out = SnatValue { addr: cfg.snat_addr, port, pad: 0 };
    SNAT.insert(&out_key, &out, u64::from(BPF_ANY)).map_err(i64::from)?;
    Ok(port)
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

/// For a reply to a SNATed flow (backend → node address and SNAT port): the client it belongs to.
#[inline(always)]
pub fn client_of(flow: &Flow, cfg: &Config) -> Option<SnatValue> {
    if cfg.snat_addr == 0 || flow.dst_addr != cfg.snat_addr {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { SNAT.get(&conntrack::key(flow, DIR_SNAT_IN)).copied() }
}
