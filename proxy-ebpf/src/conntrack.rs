//! Connection tracking for translated flows: which backend a flow was given, how to undo it on replies, and
//! how long it lives. The entry layout and why it cannot collide: `proxy_common::conntrack`.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::LruHashMap,
};
use proxy_common::{
    addr::In6,
    capacity,
    config::Config,
    conntrack::{
        CtKey, CtKey6, CtValue, CtValue6, DIR_FORWARD, DIR_REPLY, FLAG_KERNEL_NAT, Timeouts, closed, expired, state,
    },
    proto, stats,
};

use crate::{
    drop::{CONNTRACK_FULL, Result},
    packet::Flow,
    stats::count,
};

#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// During an upgrade (`FLAG_MIGRATING`), the previous agent's `CONNTRACK`, which the agent hands this
/// object at load; a single unused entry otherwise.
#[map(name = "PREV_CONNTRACK")]
static PREV_CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(1, 0);

/// IPv6 flows, as `CONNTRACK` and `PREV_CONNTRACK`.
#[map(name = "CONNTRACK6")]
static CONNTRACK6: LruHashMap<CtKey6, CtValue6> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map(name = "PREV_CONNTRACK6")]
static PREV_CONNTRACK6: LruHashMap<CtKey6, CtValue6> = LruHashMap::with_max_entries(1, 0);

/// A family's flow table and, during an upgrade, its predecessor.
pub trait Maps: Copy + Eq + 'static {
    fn conntrack() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>>;
    fn prev_conntrack() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>>;
}

impl Maps for u32 {
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey, CtValue> {
        &CONNTRACK
    }

    #[inline(always)]
    fn prev_conntrack() -> &'static LruHashMap<CtKey, CtValue> {
        &PREV_CONNTRACK
    }
}

impl Maps for In6 {
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey6, CtValue6> {
        &CONNTRACK6
    }

    #[inline(always)]
    fn prev_conntrack() -> &'static LruHashMap<CtKey6, CtValue6> {
        &PREV_CONNTRACK6
    }
}

/// The entry of `key` (see `upgrade::entry`).
#[inline(always)]
fn entry<A: Maps>(key: &CtKey<A>, cfg: &Config) -> Option<*mut CtValue<A>> {
    crate::upgrade::entry(A::conntrack(), A::prev_conntrack(), key, cfg)
}

#[inline(always)]
fn mirror<A: Maps>(key: &CtKey<A>, value: &CtValue<A>, cfg: &Config) {
    crate::upgrade::mirror(A::prev_conntrack(), key, value, cfg);
}

/// How many other client ports to try for a flow whose reply tuple a live flow holds.
const REMAP_TRIES: u32 = 16;

/// TCP flags the state follows.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Seconds of the kernel's monotonic clock.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: the helper has no preconditions.
    let ns = unsafe { bpf_ktime_get_coarse_ns() };
    u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
}

/// The key of a flow's packet in direction `dir`, as the packet carries it.
#[inline(always)]
pub fn key<A: Copy>(flow: &Flow<A>, dir: u8) -> CtKey<A> {
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

/// The reply entry's key of a forward entry `fwd` of the flow keyed `key`.
#[inline(always)]
fn reply_key<A: Copy>(key: &CtKey<A>, fwd: &CtValue<A>) -> CtKey<A> {
    CtKey {
        src_addr: fwd.nat_addr,
        dst_addr: key.src_addr,
        src_port: fwd.nat_port,
        dst_port: fwd.client_port,
        proto: key.proto,
        dir: DIR_REPLY,
        pad: 0,
    }
}

/// The forward entry's key that reply entry `reply` (keyed `key`) names.
#[inline(always)]
fn forward_key<A: Copy>(key: &CtKey<A>, reply: &CtValue<A>) -> CtKey<A> {
    CtKey {
        src_addr: key.dst_addr,
        dst_addr: reply.nat_addr,
        src_port: reply.client_port,
        dst_port: reply.nat_port,
        proto: key.proto,
        dir: DIR_FORWARD,
        pad: 0,
    }
}

/// The lifetimes the agent configured (the kernel's defaults until it has).
#[inline(always)]
pub fn timeouts(cfg: &Config) -> Timeouts {
    if cfg.timeouts.tcp_established == 0 { Timeouts::DEFAULT } else { cfg.timeouts }
}

/// The state bits a packet with `tcp_flags` adds, sent by the client (`forward`) or the backend.
#[inline(always)]
fn state_of(proto_number: u8, tcp_flags: u8, forward: bool, current: u16) -> u16 {
    if proto_number != proto::TCP {
        return if forward { 0 } else { state::REPLIED };
    }
    let mut s = if forward { 0 } else { state::REPLIED };
    if tcp_flags & TCP_RST != 0 {
        s |= state::RST;
    }
    if forward {
        if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            s |= state::SYN;
        } else if current & state::SYN_ACK != 0 && tcp_flags & TCP_ACK != 0 {
            s |= state::ESTABLISHED;
        }
        if tcp_flags & TCP_FIN != 0 {
            s |= state::FIN_FORWARD;
        }
    } else {
        if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            s |= state::SYN_ACK;
        }
        if tcp_flags & TCP_FIN != 0 {
            s |= state::FIN_REPLY;
        }
    }
    s
}

/// Notes a packet on a forward entry: its state and when. Writes only what changed (a packet a second per
/// flow, plus state changes), so busy flows do not bounce the entry's cache line between CPUs.
#[inline(always)]
fn touch<A>(entry: *mut CtValue<A>, proto_number: u8, tcp_flags: u8, forward: bool, now: u32) {
    // SAFETY: `entry` points into the map's value, valid for this program run; plain field reads and writes.
    unsafe {
        let added = state_of(proto_number, tcp_flags, forward, (*entry).state);
        if (*entry).state | added != (*entry).state {
            (*entry).state |= added;
        }
        if (*entry).last_seen != now {
            (*entry).last_seen = now;
        }
    }
}

/// The state of a flow its first packet opens. A TCP packet other than a SYN opens a flow whose state was
/// lost (an evicted entry, a restarted node): it is picked up as established, as netfilter does.
#[inline(always)]
pub fn initial_state(proto_number: u8, tcp_flags: u8) -> u16 {
    if proto_number == proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return state::SYN | state::SYN_ACK | state::ESTABLISHED;
    }
    state_of(proto_number, tcp_flags, true, 0)
}

/// Removes the reply entry of the flow `flow` had (`ct`), which is about to be given another backend.
#[inline(always)]
pub fn forget<A: Maps>(flow: &Flow<A>, ct: &CtValue<A>) {
    let _ = A::conntrack().remove(&reply_key(&key(flow, DIR_FORWARD), ct));
    count(stats::CT_ENDED);
}

/// What a client's packet to a frontend finds of its flow.
pub enum Known<'m, A = u32> {
    /// A live flow: keep its translation. The entry in the map, not a copy (an IPv6 entry is 40 bytes of
    /// the IPv6 program's 512-byte stack, which is nearly all used). Read it before inserting into the map:
    /// an LRU insert may evict and reuse any element, this one included.
    Live(&'m CtValue<A>),
    /// No flow, or one that has ended (expired, closed and now reopened by a SYN): pick afresh.
    New,
}

/// The flow a client's packet to a frontend belongs to, noting the packet on it. `tcp_flags` is the
/// packet's (0 for other protocols). An expired flow, or a closed TCP flow that a new SYN reopens, is
/// removed (with its reply entry) and reported as new.
#[inline(always)]
pub fn lookup_forward<'m, A: Maps>(flow: &Flow<A>, tcp_flags: u8, cfg: &Config) -> Known<'m, A> {
    let key = key(flow, DIR_FORWARD);
    let Some(entry) = entry(&key, cfg) else { return Known::New };
    let now = now();
    {
        // SAFETY: `entry` points into the map's value, valid for this program run; only read here.
        let value = unsafe { &*entry };
        let reopened = flow.proto == proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && closed(value);
        if reopened || expired(&timeouts(cfg), flow.proto, value, now) {
            let _ = A::conntrack().remove(&reply_key(&key, value));
            let _ = A::conntrack().remove(&key);
            count(stats::CT_ENDED);
            return Known::New;
        }
    }
    // SAFETY: as above; plain field reads before `touch` updates them.
    let (last_seen, flags) = unsafe { ((*entry).last_seen, (*entry).flags) };
    touch(entry, flow.proto, tcp_flags, true, now);
    // SAFETY: as above; no write through `entry` follows while the reference lives.
    let value = unsafe { &*entry };
    // A flow that has sent nothing back for a while may have lost its reply entry to the LRU: once a second,
    // make sure it is there. (A flow left to the kernel's NAT has none.)
    if last_seen != now && flags & FLAG_KERNEL_NAT == 0 {
        let rkey = reply_key(&key, value);
        // SAFETY: only the presence of the value is used.
        if unsafe { A::conntrack().get(&rkey).is_none() } {
            let _ = A::conntrack().insert(&rkey, &reply_value(flow, value), u64::from(BPF_NOEXIST));
            // The insert may have evicted and reused this flow's own element: look it up again.
            let Some(entry) = A::conntrack().get_ptr_mut(&key) else { return Known::New };
            // SAFETY: as above, for the element found now.
            return Known::Live(unsafe { &*entry });
        }
    }
    Known::Live(value)
}

/// The reply entry of a forward entry for the flow `flow` (as the client sent it).
#[inline(always)]
fn reply_value<A: Copy>(flow: &Flow<A>, fwd: &CtValue<A>) -> CtValue<A> {
    CtValue {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        client_port: flow.src_port,
        backend_id: fwd.backend_id,
        rev_nat_id: fwd.rev_nat_id,
        flags: fwd.flags,
        state: 0,
        created: fwd.created,
        last_seen: fwd.last_seen,
    }
}

/// Whether the reply entry `value` (keyed `key`) belongs to a live flow other than the one keyed `ours`.
#[inline(always)]
fn held_by_live_flow<A: Maps>(key: &CtKey<A>, value: &CtValue<A>, ours: &CtKey<A>, cfg: &Config) -> bool {
    let fkey = forward_key(key, value);
    if fkey == *ours {
        return false;
    }
    // SAFETY: read in place (not copied: stack is tight on the IPv6 path); a concurrent update can at worst
    // give a torn-but-valid value.
    let Some(fwd) = (unsafe { A::conntrack().get(&fkey) }) else { return false };
    reply_key(&fkey, fwd) == *key && !expired(&timeouts(cfg), key.proto, fwd, now()) && !closed(fwd)
}

/// Records a new flow from `flow`'s client to `backend_addr:backend_port`, with `value`'s ids and flags.
/// Returns the client port the backend will see: the client's own, or another if a live flow already
/// holds the reply tuple that port would give (one client port to two Services of one pod).
#[inline(always)]
pub fn record<A: Maps>(flow: &Flow<A>, mut value: CtValue<A>, cfg: &Config) -> Result<u16> {
    let fkey = key(flow, DIR_FORWARD);
    let now = now();
    value.created = now;
    value.last_seen = now;
    value.client_port = flow.src_port;
    let reply = reply_value(flow, &value);
    let mut rkey = reply_key(&fkey, &value);
    if A::conntrack().insert(&rkey, &reply, u64::from(BPF_NOEXIST)).is_err() {
        // SAFETY: read in place, as in `held_by_live_flow`.
        let held = unsafe { A::conntrack().get(&rkey) };
        if held.is_some_and(|old| held_by_live_flow(&rkey, old, &fkey, cfg)) {
            value.client_port = remap(&mut rkey, &reply)?;
        } else {
            // A leftover of an ended flow (or of this one, picked afresh): ours now.
            A::conntrack().insert(&rkey, &reply, u64::from(BPF_ANY)).map_err(|_| CONNTRACK_FULL)?;
        }
    }
    A::conntrack().insert(&fkey, &value, u64::from(BPF_ANY)).map_err(|_| CONNTRACK_FULL)?;
    mirror(&rkey, &reply, cfg);
    mirror(&fkey, &value, cfg);
    count(stats::CT_CREATED);
    Ok(value.client_port)
}

/// Records `flow` as left to the kernel's NAT (see `FLAG_KERNEL_NAT`): a forward entry alone, which only
/// says "pass". A TCP flow opened by this packet's SYN is recorded as answered, since its SYN-ACK passes
/// unseen: the client's next ACK then marks it established.
#[inline(always)]
pub fn record_kernel<A: Maps>(flow: &Flow<A>, tcp_flags: u8, cfg: &Config) -> Result<()> {
    let now = now();
    let mut state = initial_state(flow.proto, tcp_flags);
    if flow.proto == proto::TCP {
        state |= state::SYN_ACK;
    }
    let value = CtValue {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        client_port: flow.src_port,
        backend_id: 0,
        rev_nat_id: 0,
        flags: FLAG_KERNEL_NAT,
        state,
        created: now,
        last_seen: now,
    };
    let fkey = key(flow, DIR_FORWARD);
    A::conntrack().insert(&fkey, &value, u64::from(BPF_ANY)).map_err(|_| CONNTRACK_FULL)?;
    mirror(&fkey, &value, cfg);
    count(stats::CT_CREATED);
    Ok(())
}

/// Whether a packet on a flow left to the kernel's NAT starts a new connection on its tuple instead: a SYN
/// once the old connection was established (a retransmitted SYN of a handshake the kernel is answering
/// still belongs to it). Never while the handover is under way: the kernel's rules take new flows then.
#[inline(always)]
pub fn leaves_kernel<A>(flow: &Flow<A>, tcp_flags: u8, ct: &CtValue<A>, cfg: &Config) -> bool {
    cfg.flags & proxy_common::config::FLAG_HANDOVER == 0
        && flow.proto == proto::TCP
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && ct.state & state::ESTABLISHED != 0
}

/// Whether a SYN on a flow this dataplane translated opens a new connection on its tuple (while the rules
/// take new flows, `FLAG_DRAIN`): its flow had been answered, so this is not a retransmitted SYN of it. The
/// rules then translate it from the start; translated here, its packets would meet a kernel conntrack entry
/// of the old connection, and rules that drop what conntrack calls invalid (kube-proxy's).
#[inline(always)]
pub fn reopens<A>(flow: &Flow<A>, tcp_flags: u8, ct: &CtValue<A>) -> bool {
    flow.proto == proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && ct.state & state::SYN_ACK != 0
}

/// Removes both entries of the flow `flow` had (`ct`).
#[inline(always)]
pub fn forget_flow<A: Maps>(flow: &Flow<A>, ct: &CtValue<A>) {
    let fkey = key(flow, DIR_FORWARD);
    let _ = A::conntrack().remove(&reply_key(&fkey, ct));
    let _ = A::conntrack().remove(&fkey);
    count(stats::CT_ENDED);
}

/// Finds a client port for which the reply tuple `rkey` is free and records `reply` under it. Ports come
/// from the upper half of the port space, where clients' fixed ports rarely are.
#[inline(always)]
fn remap<A: Maps>(rkey: &mut CtKey<A>, reply: &CtValue<A>) -> Result<u16> {
    for _ in 0..REMAP_TRIES {
        // SAFETY: the helper has no preconditions.
        let port = 32_768 + (unsafe { bpf_get_prandom_u32() } % 32_768);
        rkey.dst_port = u16::try_from(port).unwrap_or(u16::MAX).to_be();
        if A::conntrack().insert(rkey, reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Ok(rkey.dst_port);
        }
    }
    Err(CONNTRACK_FULL)
}

/// The original tuple of a packet that answers a translated flow (backend → client), if it is a live
/// flow's: the frontend to show and the client's own port. Notes the packet on the flow (`tcp_flags` as
/// in [`lookup_forward`]). A reply entry whose flow has ended, or that a newer flow replaced, is removed.
#[inline(always)]
pub fn lookup_reply<A: Maps>(flow: &Flow<A>, tcp_flags: u8, cfg: &Config) -> Option<CtValue<A>> {
    let rkey = key(flow, DIR_REPLY);
    // SAFETY: the entry is copied out at once.
    let reply = unsafe { *entry(&rkey, cfg)? };
    let fkey = forward_key(&rkey, &reply);
    let Some(entry) = entry(&fkey, cfg) else {
        let _ = A::conntrack().remove(&rkey);
        return None;
    };
    // SAFETY: as in `touch`; the value is copied out.
    let fwd = unsafe { *entry };
    let now = now();
    if reply_key(&fkey, &fwd) != rkey {
        let _ = A::conntrack().remove(&rkey);
        return None;
    }
    if expired(&timeouts(cfg), flow.proto, &fwd, now) {
        let _ = A::conntrack().remove(&rkey);
        let _ = A::conntrack().remove(&fkey);
        count(stats::CT_ENDED);
        return None;
    }
    touch(entry, flow.proto, tcp_flags, false, now);
    Some(reply)
}

/// The reply entry for replies on `flow`'s reversed tuple, without noting a packet: for an ICMP error,
/// which says nothing about the flow's state.
#[inline(always)]
pub fn peek_reply<A: Maps>(flow: &Flow<A>) -> Option<CtValue<A>> {
    // SAFETY: the value is copied out at once.
    unsafe { A::conntrack().get(&key(flow, DIR_REPLY)).copied() }
}

/// The forward entry of `flow`, without noting a packet (for an ICMP error).
#[inline(always)]
pub fn peek_forward<A: Maps>(flow: &Flow<A>) -> Option<CtValue<A>> {
    // SAFETY: the value is copied out at once.
    unsafe { A::conntrack().get(&key(flow, DIR_FORWARD)).copied() }
}

/// For a packet that opens a flow straight to an address that was once a backend (not through a
/// frontend): forgets the translated flow whose replies would arrive on its reversed tuple if that flow has
/// ended, so its reverse translation cannot hijack the new flow's replies. A live translated flow keeps its
/// entries: a packet XDP has just translated arrives at TC addressed to its backend like a direct one,
/// with its flow's SYN not yet answered; a UDP flow cannot be told from a direct one and keeps them too.
#[inline(always)]
pub fn forget_ended_reply<A: Maps>(flow: &Flow<A>, cfg: &Config) {
    let rkey = CtKey {
        src_addr: flow.dst_addr,
        dst_addr: flow.src_addr,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: DIR_REPLY,
        pad: 0,
    };
    // Nothing to forget is the common case: one lock-free lookup.
    // SAFETY: the value is copied out at once.
    let Some(reply) = (unsafe { A::conntrack().get(&rkey).copied() }) else { return };
    let fkey = forward_key(&rkey, &reply);
    // SAFETY: the value is copied out at once.
    let fwd = unsafe { A::conntrack().get(&fkey).copied() };
    let ended = match fwd {
        None => true,
        Some(fwd) => {
            reply_key(&fkey, &fwd) != rkey
                || expired(&timeouts(cfg), flow.proto, &fwd, now())
                || (flow.proto == proto::TCP && (closed(&fwd) || fwd.state & state::SYN_ACK != 0))
        }
    };
    if ended {
        let _ = A::conntrack().remove(&rkey);
        if fwd.is_some_and(|f| reply_key(&fkey, &f) == rkey) {
            let _ = A::conntrack().remove(&fkey);
            count(stats::CT_ENDED);
        }
    }
}
