//! Socket programs for the node's own traffic (cgroup `sock_addr` hooks).
//!
//! A process on the node talking to a ClusterIP or to a NodePort on the node's address never passes a TC
//! hook on the way in, so translation happens where it is cheapest: at `connect()` and `sendmsg()`, the
//! destination becomes a backend, once per connection instead of once per packet. `recvmsg()` and
//! `getpeername()` show the frontend again, so applications see the address they asked for. An unconnected
//! UDP socket's datagrams to one frontend keep one backend while the socket keeps talking (`SOCK_FLOWS`),
//! as conntrack keeps a flow's: a QUIC-like or multi-datagram exchange is not spread over backends.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use proxy_common::{
    addr::In6,
    backend::Backend,
    capacity,
    service::flags,
    sock::{FLOW_IDLE_SECS, SockFlow, SockFlowKey, SockFlowKey6, SockFrontend, SockFrontend6, SockKey, SockKey6},
};

use crate::{
    drop::{self, SOCK_MAP_FULL, SOCK_REFUSED},
    family::Family,
    lb,
    packet::{Flow, Fragment},
    snat,
};

#[map(name = "SOCK_REVNAT")]
static SOCK_REVNAT: LruHashMap<SockKey, SockFrontend> = LruHashMap::pinned(capacity::SOCK_REVNAT, 0);

#[map(name = "SOCK_FLOWS")]
static SOCK_FLOWS: LruHashMap<SockFlowKey, SockFlow> = LruHashMap::pinned(capacity::SOCK_FLOWS, 0);

#[map(name = "SOCK_REVNAT6")]
static SOCK_REVNAT6: LruHashMap<SockKey6, SockFrontend6> = LruHashMap::pinned(capacity::SOCK_REVNAT, 0);

#[map(name = "SOCK_FLOWS6")]
static SOCK_FLOWS6: LruHashMap<SockFlowKey6, SockFlow> = LruHashMap::pinned(capacity::SOCK_FLOWS, 0);

/// A family as the socket hooks see it: its socket maps.
trait SockFamily: Family {
    type RevKey: 'static;
    type Front: Copy + 'static;
    type FlowKey: 'static;
    fn revnat() -> &'static LruHashMap<Self::RevKey, Self::Front>;
    fn flows() -> &'static LruHashMap<Self::FlowKey, SockFlow>;
    fn rev_key(cookie: u64, addr: Self, port: u16) -> Self::RevKey;
    fn front(addr: Self, port: u16) -> Self::Front;
    fn front_parts(front: Self::Front) -> (Self, u16);
    fn flow_key(cookie: u64, addr: Self, port: u16, proto: u8) -> Self::FlowKey;
}

impl SockFamily for u32 {
    type RevKey = SockKey;
    type Front = SockFrontend;
    type FlowKey = SockFlowKey;

    #[inline(always)]
    fn revnat() -> &'static LruHashMap<SockKey, SockFrontend> {
        &SOCK_REVNAT
    }

    #[inline(always)]
    fn flows() -> &'static LruHashMap<SockFlowKey, SockFlow> {
        &SOCK_FLOWS
    }

    #[inline(always)]
    fn rev_key(cookie: u64, addr: Self, port: u16) -> SockKey {
        SockKey { cookie, addr, port, pad: 0 }
    }

    #[inline(always)]
    fn front(addr: Self, port: u16) -> SockFrontend {
        SockFrontend { addr, port, pad: 0 }
    }

    #[inline(always)]
    fn front_parts(front: SockFrontend) -> (Self, u16) {
        (front.addr, front.port)
    }

    #[inline(always)]
    fn flow_key(cookie: u64, addr: Self, port: u16, proto: u8) -> SockFlowKey {
        SockFlowKey { cookie, addr, port, proto, pad: 0 }
    }
}

impl SockFamily for In6 {
    type RevKey = SockKey6;
    type Front = SockFrontend6;
    type FlowKey = SockFlowKey6;

    #[inline(always)]
    fn revnat() -> &'static LruHashMap<SockKey6, SockFrontend6> {
        &SOCK_REVNAT6
    }

    #[inline(always)]
    fn flows() -> &'static LruHashMap<SockFlowKey6, SockFlow> {
        &SOCK_FLOWS6
    }

    #[inline(always)]
    fn rev_key(cookie: u64, addr: Self, port: u16) -> SockKey6 {
        SockKey6 { cookie, addr, port, pad: [0; 3] }
    }

    #[inline(always)]
    fn front(addr: Self, port: u16) -> SockFrontend6 {
        SockFrontend6 { addr, port, pad: 0 }
    }

    #[inline(always)]
    fn front_parts(front: SockFrontend6) -> (Self, u16) {
        (front.addr, front.port)
    }

    #[inline(always)]
    fn flow_key(cookie: u64, addr: Self, port: u16, proto: u8) -> SockFlowKey6 {
        SockFlowKey6 { cookie, addr, port, proto, pad: [0; 5] }
    }
}

/// Where a hook's `bpf_sock_addr` holds the call's address, and as which family's: `user_ip4` in the IPv4
/// hooks; `user_ip6` in the IPv6 ones, holding an IPv6 address or, for an IPv6 socket talking IPv4 (a
/// dual-stack program given an IPv4 name), an IPv4-mapped one (`::ffff:a.b.c.d`). The kernel sends the
/// latter as IPv4, so it is translated with the IPv4 frontends and maps, and written back mapped.
trait UserAddr {
    type Family: SockFamily;
    /// SAFETY: `sa` is the program's `bpf_sock_addr`, in a hook of the field's family.
    unsafe fn get(sa: *mut bpf_sock_addr) -> Self::Family;
    /// SAFETY: as [`UserAddr::get`], from a hook that may write it.
    unsafe fn set(sa: *mut bpf_sock_addr, addr: Self::Family);
}

struct UserIp4;
struct UserIp6;
struct UserIp6Mapped;

/// The third word of an IPv4-mapped address (`0:0:0:0:0:ffff:…`), as it lies in memory.
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl UserAddr for UserIp4 {
    type Family = u32;

    #[inline(always)]
    unsafe fn get(sa: *mut bpf_sock_addr) -> u32 {
        // SAFETY: the caller's.
        unsafe { (*sa).user_ip4 }
    }

    #[inline(always)]
    unsafe fn set(sa: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: the caller's.
        unsafe { (*sa).user_ip4 = addr };
    }
}

impl UserAddr for UserIp6 {
    type Family = In6;

    #[inline(always)]
    unsafe fn get(sa: *mut bpf_sock_addr) -> In6 {
        // SAFETY: the caller's; the verifier wants the words read one at a time.
        unsafe { In6([(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]]) }
    }

    #[inline(always)]
    unsafe fn set(sa: *mut bpf_sock_addr, addr: In6) {
        // SAFETY: the caller's; written a word at a time, as the verifier allows.
        unsafe {
            (*sa).user_ip6[0] = addr.0[0];
            (*sa).user_ip6[1] = addr.0[1];
            (*sa).user_ip6[2] = addr.0[2];
            (*sa).user_ip6[3] = addr.0[3];
        }
    }
}

impl UserAddr for UserIp6Mapped {
    type Family = u32;

    #[inline(always)]
    unsafe fn get(sa: *mut bpf_sock_addr) -> u32 {
        // SAFETY: the caller's; only called once `mapped` said the address is IPv4-mapped.
        unsafe { (*sa).user_ip6[3] }
    }

    #[inline(always)]
    unsafe fn set(sa: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: the caller's.
        unsafe { UserIp6::set(sa, In6([0, 0, MAPPED_WORD, addr])) };
    }
}

/// Whether an IPv6 hook's address is IPv4-mapped.
#[inline(always)]
fn mapped(ctx: &SockAddrContext) -> bool {
    // SAFETY: an IPv6 hook's context; the words are readable one at a time.
    let sa = ctx.sock_addr;
    unsafe { (*sa).user_ip6[0] == 0 && (*sa).user_ip6[1] == 0 && (*sa).user_ip6[2] == MAPPED_WORD }
}

/// Which hook a translation runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `connect()`: once per connection, the socket then talks to one backend by itself.
    Connect,
    /// `sendmsg()` with an address, on an unconnected socket: once per datagram.
    SendTo,
}

/// The verdicts of a `sock_addr` program.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// The errno a refused Service gives, as kube-proxy's ICMP port unreachable does (`-ECONNREFUSED`).
const ECONNREFUSED: i32 = 111;

/// Fails the call the way kube-proxy's REJECT rule in the OUTPUT chain fails the node's own traffic to a
/// Service without endpoints: a TCP `connect()` is refused (the ICMP error reaches the socket), a UDP send
/// fails with EPERM (the rule drops the datagram as it leaves). A bare [`DENY`] is EPERM.
#[inline(always)]
fn refuse(proto: u8) -> i32 {
    drop::count(SOCK_REFUSED);
    if proto == proxy_common::proto::TCP {
        // SAFETY: the helper only sets the syscall's return value (cgroup programs, Linux 5.18+).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    DENY
}

/// Whether the socket lives in the network namespace this agent serves.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    snat::config().is_some_and(|cfg| cfg.netns_cookie != 0 && cookie == cfg.netns_cookie)
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The backend this socket's earlier datagrams to the frontend went to, if it still exists and the socket
/// sent within [`FLOW_IDLE_SECS`]; refreshed on every datagram.
#[inline(always)]
fn sticky_backend<A: SockFamily>(key: &A::FlowKey, now: u64) -> Option<Backend<A>> {
    let entry = A::flows().get_ptr_mut(key)?;
    // SAFETY: `entry` points into the map's value, valid for this program run; plain field accesses.
    let (backend_id, last_seen) = unsafe { ((*entry).backend_id, (*entry).last_seen_ns) };
    if now.saturating_sub(last_seen) > FLOW_IDLE_SECS * 1_000_000_000 {
        return None;
    }
    let backend = lb::backend(backend_id)?;
    // SAFETY: as above.
    unsafe { (*entry).last_seen_ns = now };
    Some(backend)
}

/// Points the socket at a backend if it is addressed to a frontend.
#[inline(always)]
fn translate<A: SockFamily, U: UserAddr<Family = A>>(ctx: &SockAddrContext, call: Call) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context points at the kernel's bpf_sock_addr for the whole run; these fields are readable.
    let (addr, user_port, protocol) = unsafe { (U::get(sa), (*sa).user_port, (*sa).protocol) };
    let Ok(proto) = u8::try_from(protocol) else { return ALLOW };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = (user_port & 0xffff) as u16;
    let flow = Flow {
        l3_off: 0,
        l4_off: 0,
        src_addr: A::default(),
        dst_addr: addr,
        src_port: 0,
        dst_port: port,
        proto,
        ttl: 0,
        ip_id: 0,
        fragment: Fragment::Whole,
    };
    // The node's own traffic is internal: it reaches every endpoint, whatever the external policy.
    let Some(svc) = lb::lookup_service(&flow, true) else { return ALLOW };
    let Some(cfg) = snat::config() else { return ALLOW };
    // Handing over to the kernel's NAT: its rules translate new sockets (the output hook) from now on.
    if cfg.flags & proxy_common::config::FLAG_DRAIN != 0 {
        return ALLOW;
    }
    // loadBalancerSourceRanges: the node's own connection leaves from its primary address, which must be
    // in the ranges (kube-proxy checks them in its output hook too; it drops, here the call fails at once).
    if svc.ext_flags & flags::SOURCE_RANGES != 0
        && !lb::source_allowed(&Flow { src_addr: A::snat_addr_for(0, cfg), ..flow }, &svc)
    {
        drop::count(drop::SOURCE_RANGE);
        return DENY;
    }
    let cookie = socket_cookie(ctx);
    let flow_key = A::flow_key(cookie, addr, port, proto);
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let known = if call == Call::SendTo { sticky_backend::<A>(&flow_key, now) } else { None };
    let backend = if let Some(backend) = known {
        backend
    } else {
        // sessionAffinity ClientIP holds for the node's own connections too (kube-proxy's affinity rules sit
        // in the output path as well): the client is the node's address, which they leave from.
        let affinity = svc.value.flags & flags::AFFINITY != 0;
        let node = Flow { src_addr: A::snat_addr_for(0, cfg), ..flow };
        let chosen = if affinity { lb::affinity_backend(&node, &svc) } else { None };
        let Some((backend_id, backend)) = chosen.or_else(|| lb::select_backend(&flow, &svc, lb::Asker::Socket, cfg))
        else {
            // No usable endpoint: refuse at once rather than leave the client to time out.
            return if svc.value.flags & flags::REJECT_WHEN_EMPTY != 0 { refuse(proto) } else { ALLOW };
        };
        if affinity {
            lb::remember_affinity(&node, &svc, backend_id);
        }
        if call == Call::SendTo {
            let value = SockFlow { backend_id, pad: 0, last_seen_ns: now };
            // Without the entry the next datagram picks again, as before; not worth refusing for.
            let _ = A::flows().insert(&flow_key, &value, u64::from(BPF_ANY));
        }
        backend
    };
    let key = A::rev_key(cookie, backend.addr, backend.port);
    let frontend = A::front(addr, port);
    // Without the entry, replies would show the backend's address; better to refuse than to confuse.
    if A::revnat().insert(&key, &frontend, u64::from(BPF_ANY)).is_err() {
        drop::count(SOCK_MAP_FULL);
        return DENY;
    }
    // SAFETY: as above; these fields are writable from connect and sendmsg hooks.
    unsafe {
        U::set(sa, backend.addr);
        (*sa).user_port = u32::from(backend.port);
    }
    ALLOW
}

/// Shows the frontend instead of the backend a socket was pointed at.
#[inline(always)]
fn restore<A: SockFamily, U: UserAddr<Family = A>>(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate`.
    let (addr, user_port) = unsafe { (U::get(sa), (*sa).user_port) };
    let key = A::rev_key(socket_cookie(ctx), addr, (user_port & 0xffff) as u16);
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { A::revnat().get(&key).copied() } {
        let (addr, port) = A::front_parts(frontend);
        // SAFETY: these fields are writable from recvmsg and getpeername hooks.
        unsafe {
            U::set(sa, addr);
            (*sa).user_port = u32::from(port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate::<_, UserIp4>(&ctx, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate::<_, UserIp4>(&ctx, Call::SendTo)
}

#[cgroup_sock_addr(recvmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore::<_, UserIp4>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore::<_, UserIp4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    if mapped(&ctx) {
        translate::<_, UserIp6Mapped>(&ctx, Call::Connect)
    } else {
        translate::<_, UserIp6>(&ctx, Call::Connect)
    }
}

#[cgroup_sock_addr(sendmsg6)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    if mapped(&ctx) {
        translate::<_, UserIp6Mapped>(&ctx, Call::SendTo)
    } else {
        translate::<_, UserIp6>(&ctx, Call::SendTo)
    }
}

#[cgroup_sock_addr(recvmsg6)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    if mapped(&ctx) { restore::<_, UserIp6Mapped>(&ctx) } else { restore::<_, UserIp6>(&ctx) }
}

#[cgroup_sock_addr(getpeername6)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    if mapped(&ctx) { restore::<_, UserIp6Mapped>(&ctx) } else { restore::<_, UserIp6>(&ctx) }
}
