//! IPv4 and IPv6 fragments of Service datagrams. Only a datagram's first fragment carries its ports, so the first
//! fragment records them (keyed by source, destination, IP id and protocol, as this hook sees it), and the
//! later fragments are translated as their first fragment was: same conntrack entry, same backend, same
//! addresses; their payload is never touched (the first fragment's L4 checksum covers the whole datagram).
//!
//! A later fragment that arrives with no record (reordered before its first fragment, or its first
//! fragment evicted or never seen here) cannot be translated: at ingress, one to a Service address is
//! dropped (it must not leave by the default route untranslated) and any other passes, so the node's
//! other reordered traffic still reassembles (Cilium drops every such fragment on its service path). A
//! Service datagram whose fragments are reordered is lost either way; Linux sends fragments in order.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns, macros::map, maps::LruHashMap};
use proxy_common::{
    addr::In6,
    capacity,
    frag::{FragKey, FragKey6, FragValue, LIFETIME_SECS},
};

use crate::packet::{Flow, Fragment};

#[map(name = "FRAGS")]
static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(capacity::FRAGS, 0);

#[map(name = "FRAGS6")]
static FRAGS6: LruHashMap<FragKey6, FragValue> = LruHashMap::pinned(capacity::FRAGS, 0);

/// A family's fragment records: its map and how a datagram is keyed in it.
pub trait Maps: Sized + 'static {
    type Key: 'static;
    fn frags() -> &'static LruHashMap<Self::Key, FragValue>;
    fn key(flow: &Flow<Self>) -> Self::Key;
}

impl Maps for u32 {
    type Key = FragKey;

    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKey, FragValue> {
        &FRAGS
    }

    #[inline(always)]
    fn key(flow: &Flow<Self>) -> FragKey {
        // IPv4's identification is 16 bits (`Flow::ip_id` holds it widened).
        #[expect(clippy::cast_possible_truncation, reason = "the value came from a 16-bit field")]
        let id = flow.ip_id as u16;
        FragKey { src_addr: flow.src_addr, dst_addr: flow.dst_addr, id, proto: flow.proto, pad: 0 }
    }
}

impl Maps for In6 {
    type Key = FragKey6;

    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKey6, FragValue> {
        &FRAGS6
    }

    #[inline(always)]
    fn key(flow: &Flow<Self>) -> FragKey6 {
        FragKey6 { src_addr: flow.src_addr, dst_addr: flow.dst_addr, id: flow.ip_id, proto: flow.proto, pad: [0; 3] }
    }
}

#[inline(always)]
fn now_secs() -> u32 {
    // SAFETY: the helper has no preconditions.
    let ns = unsafe { bpf_ktime_get_coarse_ns() };
    u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
}

/// Records the ports of a first fragment for the later fragments of its datagram. Called only for a packet
/// about to be translated, before it is, so the key is what the later fragments will carry here and the
/// map holds Service datagrams only.
#[inline(always)]
pub fn remember<A: Maps + Copy>(flow: &Flow<A>) {
    if flow.fragment != Fragment::First {
        return;
    }
    let value = FragValue { src_port: flow.src_port, dst_port: flow.dst_port, seen: now_secs() };
    // An LRU insert fails only if the kernel cannot allocate; the later fragments then pass untracked.
    let _ = A::frags().insert(&A::key(flow), &value, u64::from(BPF_ANY));
}

/// The ports of a later fragment's datagram, if its first fragment was seen here recently.
#[inline(always)]
pub fn ports<A: Maps + Copy>(flow: &Flow<A>) -> Option<(u16, u16)> {
    // SAFETY: the value is copied out at once.
    let entry = unsafe { A::frags().get(&A::key(flow)).copied() }?;
    if now_secs().saturating_sub(entry.seen) > LIFETIME_SECS {
        return None;
    }
    Some((entry.src_port, entry.dst_port))
}
