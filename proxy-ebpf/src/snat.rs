//! Source NAT to the node's address, for flows that must come back through this node: external traffic with
//! externalTrafficPolicy Cluster, flows to a backend on another node, hairpin, and `masqueradeAll`.
//!
//! On the TC path SNAT happens at egress (after routing) and its reverse at ingress (before routing), so the
//! stack never sees a packet whose source is one of its own addresses arriving from outside. The XDP path
//! does both at once and sends the packet straight back out.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use proxy_common::{
    addr::In6,
    capacity,
    config::{Config, Config6},
    conntrack::{
        CtKey, CtKey6, DIR_SNAT_IN, DIR_SNAT_OUT, SNAT_CLOSING, SNAT_FIN_IN, SNAT_FIN_OUT, SNAT_RST, SnatValue,
        SnatValue6,
    },
    proto,
};

use crate::{
    conntrack,
    drop::{Result, SNAT_FULL, SNAT_NO_ADDRESS, SNAT_PORTS_EXHAUSTED},
    family::Family,
    packet::Flow,
};

#[map(name = "SNAT")]
static SNAT: LruHashMap<CtKey, SnatValue> = LruHashMap::pinned(capacity::SNAT, 0);

/// During an upgrade, the previous agent's `SNAT` (see `conntrack::PREV_CONNTRACK`).
#[map(name = "PREV_SNAT")]
static PREV_SNAT: LruHashMap<CtKey, SnatValue> = LruHashMap::with_max_entries(1, 0);

/// IPv6 flows, as `SNAT` and `PREV_SNAT`.
#[map(name = "SNAT6")]
static SNAT6: LruHashMap<CtKey6, SnatValue6> = LruHashMap::pinned(capacity::SNAT, 0);

#[map(name = "PREV_SNAT6")]
static PREV_SNAT6: LruHashMap<CtKey6, SnatValue6> = LruHashMap::with_max_entries(1, 0);

/// A family's SNAT table and, during an upgrade, its predecessor.
pub trait Maps: Copy + Eq + 'static {
    fn snat() -> &'static LruHashMap<CtKey<Self>, SnatValue<Self>>;
    fn prev_snat() -> &'static LruHashMap<CtKey<Self>, SnatValue<Self>>;
}

impl Maps for u32 {
    #[inline(always)]
    fn snat() -> &'static LruHashMap<CtKey, SnatValue> {
        &SNAT
    }

    #[inline(always)]
    fn prev_snat() -> &'static LruHashMap<CtKey, SnatValue> {
        &PREV_SNAT
    }
}

impl Maps for In6 {
    #[inline(always)]
    fn snat() -> &'static LruHashMap<CtKey6, SnatValue6> {
        &SNAT6
    }

    #[inline(always)]
    fn prev_snat() -> &'static LruHashMap<CtKey6, SnatValue6> {
        &PREV_SNAT6
    }
}

/// The SNAT entry of `key` (see `upgrade::entry`).
#[inline(always)]
fn entry<A: Maps>(key: &CtKey<A>, cfg: &Config) -> Option<*mut SnatValue<A>> {
    crate::upgrade::entry(A::snat(), A::prev_snat(), key, cfg)
}

#[inline(always)]
fn mirror<A: Maps>(key: &CtKey<A>, value: &SnatValue<A>, cfg: &Config) {
    crate::upgrade::mirror(A::prev_snat(), key, value, cfg);
}

/// The address an interface's SNATed flows leave with, by ifindex, where it is not `snat_addr`: its own, or
/// its bridge's (written by the agent as it attaches).
#[map(name = "EGRESS_SNAT")]
static EGRESS_SNAT: HashMap<u32, u32> = HashMap::pinned(capacity::EGRESS_SNAT, 0);

/// The address a flow SNATed on its way out of interface `ifindex` leaves with (zero: none).
#[inline(always)]
pub fn addr_for(ifindex: u32, cfg: &Config) -> u32 {
    // SAFETY: the value is copied out at once.
    unsafe { EGRESS_SNAT.get(&ifindex).copied() }.unwrap_or(cfg.snat_addr)
}

/// IPv6's [`EGRESS_SNAT`]: an interface's own (or its bridge's) global IPv6 address.
#[map(name = "EGRESS_SNAT6")]
static EGRESS_SNAT6: HashMap<u32, In6> = HashMap::pinned(capacity::EGRESS_SNAT, 0);

/// The IPv6 address a flow SNATed on its way out of interface `ifindex` leaves with (zero: none).
#[inline(always)]
pub fn addr6_for(ifindex: u32) -> In6 {
    // SAFETY: the value is copied out at once.
    unsafe { EGRESS_SNAT6.get(&ifindex).copied() }
        .unwrap_or_else(|| config6().map_or(In6::UNSPECIFIED, |c| c.snat_addr))
}

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

/// IPv6's node-wide settings (`Config6`), read where they are needed rather than copied.
#[map(name = "CONFIG6")]
static CONFIG6: Array<Config6> = Array::pinned(1, 0);

/// IPv6's node-wide settings the agent wrote.
#[inline(always)]
pub fn config6() -> Option<&'static Config6> {
    CONFIG6.get(0)
}

/// How many random ports to try before giving up on a new SNATed flow (its SYN is then dropped, and TCP
/// retries in a second). With a third of the range held, 8 tries failed once in ~25k new flows; 32 make it
/// once in billions, and cost nothing while ports are free.
const PORT_TRIES: u32 = 32;
/// A port whose TCP flow closed both ways (a FIN from each side) serves a new flow to the same backend after
/// this long without packets: time for the final ACK to reach the backend, so a new SYN never meets the old
/// socket in `LAST_ACK`. Closed flows are what a busy NodePort leaves behind by the thousand per second; a
/// port range of 4.5k would run dry if each were held for seconds (new connections then lose their SYN).
const CLOSED_REUSE_MS: u32 = 250;
/// A port whose flow closed one way only (a FIN from one side: the other may still send) serves a new flow
/// after this long without packets, netfilter's `CLOSE_WAIT` timeout.
const HALF_CLOSED_IDLE_SECS: u32 = 60;
/// A port whose flow went quiet serves a new flow after this long: UDP (no end to see) like netfilter's
/// UDP timeout, TCP that ended unseen after a day.
const UDP_IDLE_SECS: u32 = 60;
const TCP_IDLE_SECS: u32 = 86_400;

/// TCP flags that end a flow, and those of a handshake.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The kernel's monotonic clock: (seconds, milliseconds wrapping at 2^32).
#[inline(always)]
fn now() -> (u32, u32) {
    // SAFETY: the helper has no preconditions.
    let ns = unsafe { bpf_ktime_get_coarse_ns() };
    let secs = u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX);
    #[expect(clippy::cast_possible_truncation, reason = "milliseconds wrap on purpose; only differences are used")]
    let ms = (ns / 1_000_000) as u32;
    (secs, ms)
}

/// Whether the flow holding a port (its `DIR_SNAT_IN` entry) has ended or gone quiet long enough for the
/// port to serve a new flow.
#[inline(always)]
fn reusable<A>(held: &SnatValue<A>, proto_number: u8, (now, now_ms): (u32, u32)) -> bool {
    let idle = now.saturating_sub(held.last_seen);
    if held.flags & SNAT_RST != 0 {
        return true;
    }
    if held.flags & (SNAT_FIN_OUT | SNAT_FIN_IN) == SNAT_FIN_OUT | SNAT_FIN_IN {
        return now_ms.wrapping_sub(held.last_seen_ms) >= CLOSED_REUSE_MS;
    }
    if held.flags & SNAT_CLOSING != 0 {
        return idle >= HALF_CLOSED_IDLE_SECS;
    }
    idle >= if proto_number == proto::TCP { TCP_IDLE_SECS } else { UDP_IDLE_SECS }
}

/// The `DIR_SNAT_IN` key of replies from `flow`'s backend to the node's `addr` and `port`.
#[inline(always)]
fn in_key<A: Copy>(flow: &Flow<A>, addr: A, port: u16) -> CtKey<A> {
    CtKey {
        src_addr: flow.dst_addr,
        dst_addr: addr,
        src_port: flow.dst_port,
        dst_port: port,
        proto: flow.proto,
        dir: DIR_SNAT_IN,
        pad: 0,
    }
}

/// Notes a packet of the flow behind a `DIR_SNAT_IN` entry: when, and how far it closes the flow. `fin` is
/// the bit a FIN from this packet's side sets.
#[inline(always)]
fn touch<A>(entry: *mut SnatValue<A>, tcp_flags: u8, fin: u16) {
    let (secs, ms) = now();
    let mut closing = 0;
    if tcp_flags & TCP_FIN != 0 {
        closing |= SNAT_CLOSING | fin;
    }
    if tcp_flags & TCP_RST != 0 {
        closing |= SNAT_CLOSING | SNAT_RST;
    }
    // SAFETY: `entry` points into the map's value, valid for this program run; plain field writes.
    unsafe {
        (*entry).last_seen = secs;
        (*entry).last_seen_ms = ms;
        (*entry).flags |= closing;
    }
}

/// The node-wide settings the agent wrote, in place: a copy would take 112 bytes of the 512-byte stack.
/// (Index 0 of a one-entry array always exists; `None` only satisfies the verifier.)
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// The node address and port a flow (client → backend, after DNAT) leaves with: those it has, or `addr`
/// (see [`addr_for`]) and a new port. `tcp_flags` is the packet's (0 for other protocols); a FIN or RST
/// marks the flow as ending.
#[inline(always)]
pub fn port_for<A: Family>(flow: &Flow<A>, addr: A, cfg: &Config, tcp_flags: u8) -> Result<(A, u16)> {
    let out_key = conntrack::key(flow, DIR_SNAT_OUT);
    // SAFETY: the value is copied out at once.
    if let Some(known) = entry(&out_key, cfg).map(|e| unsafe { *e }) {
        if let Some(entry) = A::snat().get_ptr_mut(&in_key(flow, known.addr, known.port)) {
            if flow.proto == proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                // The client opens a new connection on the tuple: the port's flow starts afresh, so its
                // SYN-ACK is not taken for another NAT's (see `client_of`).
                // SAFETY: as in `touch`; a field write.
                unsafe { (*entry).flags = 0 };
            } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                touch(entry, tcp_flags, SNAT_FIN_OUT);
            }
        }
        return Ok((known.addr, known.port));
    }
    if addr == A::default() {
        return Err(SNAT_NO_ADDRESS);
    }
    let port = allocate_port(flow, addr, cfg)?;
    let out = SnatValue { addr, port, flags: 0, last_seen: 0, last_seen_ms: 0 };
    A::snat().insert(&out_key, &out, u64::from(BPF_ANY)).map_err(|_| SNAT_FULL)?;
    mirror(&out_key, &out, cfg);
    Ok((addr, port))
}

/// Finds a free node port for a flow to `flow.dst` and records the way back to the client. A port held by
/// a live flow to the same backend is never taken over; one whose flow ended or went quiet is.
#[inline(always)]
fn allocate_port<A: Family>(flow: &Flow<A>, addr: A, cfg: &Config) -> Result<u16> {
    let span = u32::from(cfg.snat_port_max.saturating_sub(cfg.snat_port_min)) + 1;
    let now = now();
    let back = SnatValue { addr: flow.src_addr, port: flow.src_port, flags: 0, last_seen: now.0, last_seen_ms: now.1 };
    for _ in 0..PORT_TRIES {
        // SAFETY: the helper has no preconditions.
        let offset = unsafe { bpf_get_prandom_u32() } % span;
        // min + offset <= max, so this always fits.
        let port = u16::try_from(u32::from(cfg.snat_port_min) + offset).unwrap_or(cfg.snat_port_min).to_be();
        let key = in_key(flow, addr, port);
        // During an upgrade a port may be held by a flow only the previous table knows yet.
        // SAFETY: the value is copied out at once.
        let held = entry(&key, cfg).map(|e| unsafe { *e });
        if held.is_none() && A::snat().insert(&key, &back, u64::from(BPF_NOEXIST)).is_ok() {
            mirror(&key, &back, cfg);
            return Ok(port);
        }
        // SAFETY: the value is copied out at once.
        let Some(held) = held.or_else(|| unsafe { A::snat().get(&key).copied() }) else { continue };
        if !reusable(&held, flow.proto, now) {
            continue;
        }
        // The old flow's client must not keep leaving with this port: forget its mapping, so a late packet
        // of it gets a port of its own.
        let old_out = CtKey {
            src_addr: held.addr,
            dst_addr: flow.dst_addr,
            src_port: held.port,
            dst_port: flow.dst_port,
            proto: flow.proto,
            dir: DIR_SNAT_OUT,
            pad: 0,
        };
        let _ = A::snat().remove(&old_out);
        if A::snat().insert(&key, &back, u64::from(BPF_ANY)).is_ok() {
            mirror(&key, &back, cfg);
            return Ok(port);
        }
    }
    Err(SNAT_PORTS_EXHAUSTED)
}

/// For a reply to a SNATed flow (backend → node address and SNAT port): the client it belongs to. Notes
/// the packet on the entry (`tcp_flags` as in [`port_for`]).
#[inline(always)]
pub fn client_of<A: Family>(flow: &Flow<A>, cfg: &Config, tcp_flags: u8) -> Option<SnatValue<A>> {
    if !flow.dst_addr.is_snat_addr(cfg) {
        return None;
    }
    let key = conntrack::key(flow, DIR_SNAT_IN);
    let entry = entry(&key, cfg)?;
    // A SYN-ACK answers a new connection, never one that has closed: the port is another NAT's now (the
    // kernel's MASQUERADE, whose random ports can land on one this table used), and the connection's
    // packets pass untouched from here on.
    // SAFETY: as in `touch`; a field read.
    let held = unsafe { (*entry).flags };
    let closed = held & SNAT_RST != 0 || held & (SNAT_FIN_OUT | SNAT_FIN_IN) == SNAT_FIN_OUT | SNAT_FIN_IN;
    if closed && flow.proto == proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        let _ = A::snat().remove(&key);
        return None;
    }
    touch(entry, tcp_flags, SNAT_FIN_IN);
    // SAFETY: as in `touch`; the value is copied out.
    Some(unsafe { *entry })
}

/// The client behind a SNAT reply tuple (backend → node address and SNAT port), without noting a packet:
/// for an ICMP error, which says nothing about how far the flow has closed.
#[inline(always)]
pub fn lookup_in<A: Family>(flow: &Flow<A>, cfg: &Config) -> Option<SnatValue<A>> {
    if !flow.dst_addr.is_snat_addr(cfg) {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { A::snat().get(&conntrack::key(flow, DIR_SNAT_IN)).copied() }
}

/// The node address and port a SNATed flow (client → backend, after DNAT) leaves with, if it has one.
#[inline(always)]
pub fn lookup_out<A: Maps>(flow: &Flow<A>) -> Option<SnatValue<A>> {
    // SAFETY: the value is copied out at once.
    unsafe { A::snat().get(&conntrack::key(flow, DIR_SNAT_OUT)).copied() }
}
