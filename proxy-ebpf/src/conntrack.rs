//! Connection tracking for translated flows: which backend a flow was given, and how to undo it on replies.

use aya_ebpf::{bindings::BPF_ANY, macros::map, maps::LruHashMap};
use proxy_common::{
    backend::Backend,
    capacity,
    conntrack::{CtKey, CtValue, DIR_FORWARD, DIR_REPLY},
};

use crate::{
    drop::{CONNTRACK_FULL, Result},
    packet::Flow,
};

#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// The key of a flow's packet in direction `dir`, as the packet carries it.
#[inline(always)]
pub fn key(flow: &Flow, dir: u8) -> CtKey {
    CtKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        dir,
        pad: 0,
    }
}

/// The entry of a flow from a client to a frontend, if it was seen before.
#[inline(always)]
pub fn lookup_forward(flow: &Flow) -> Option<CtValue> {
    // SAFETY: the value is copied out at once.
    unsafe { CONNTRACK.get(&key(flow, DIR_FORWARD)).copied() }
}

/// Records a flow's backend, and the reply tuple the egress program will reverse-translate.
#[inline(always)]
pub fn record(flow: &Flow, backend: &Backend, value: &CtValue) -> Result<()> {
    CONNTRACK.insert(&key(flow, DIR_FORWARD), value, u64::from(BPF_ANY)).map_err(|_| CONNTRACK_FULL)?;
    let reply = CtKey {
        src_addr: backend.addr,
        dst_addr: flow.src_addr,
        src_port: backend.port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: DIR_REPLY,
        pad: 0,
    };
    CONNTRACK.insert(&reply, value, u64::from(BPF_ANY)).map_err(|_| CONNTRACK_FULL)
}

/// Forgets the translated flow whose replies would arrive on `flow`'s reversed tuple. For a packet that
/// opens a flow straight to an address that was once a backend: a client may reuse a source port it used
/// through a Service, and the old flow's reverse translation would otherwise hijack the new flow's replies.
/// The old flow's forward entry goes too: were the client to reuse the port for the Service again, a
/// forward entry without its reply entry would send the new flow on with replies nobody translates back.
#[inline(always)]
pub fn forget_reply(flow: &Flow) {
    let reply = CtKey {
        src_addr: flow.dst_addr,
        dst_addr: flow.src_addr,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: DIR_REPLY,
        pad: 0,
    };
    // Nothing to forget is the common case: a lock-free lookup first, the bucket-locking deletes only when
    // there is something to delete.
    // SAFETY: the value is copied out at once.
    let Some(old) = (unsafe { CONNTRACK.get(&reply).copied() }) else { return };
    let _ = CONNTRACK.remove(&reply);
    if let Some(frontend) = crate::nat::revnat(old.rev_nat_id) {
        let forward = CtKey {
            src_addr: flow.src_addr,
            dst_addr: frontend.addr,
            src_port: flow.src_port,
            dst_port: frontend.port,
            proto: flow.proto,
            dir: DIR_FORWARD,
            pad: 0,
        };
        let _ = CONNTRACK.remove(&forward);
    }
}

/// The entry of a packet that answers a translated flow (backend → client), if any.
#[inline(always)]
pub fn lookup_reply(flow: &Flow) -> Option<CtValue> {
    // SAFETY: the value is copied out at once.
    unsafe { CONNTRACK.get(&key(flow, DIR_REPLY)).copied() }
}
