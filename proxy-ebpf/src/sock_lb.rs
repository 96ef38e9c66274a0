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
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use proxy_common::{
    backend::Backend,
    capacity,
    service::flags,
    sock::{FLOW_IDLE_SECS, SockFlow, SockFlowKey, SockFrontend, SockKey},
};

use crate::{
    drop::{self, SOCK_MAP_FULL, SOCK_REFUSED},
    lb,
    packet::{Flow, Fragment},
    snat,
};

#[map(name = "SOCK_REVNAT")]
static SOCK_REVNAT: LruHashMap<SockKey, SockFrontend> = LruHashMap::pinned(capacity::SOCK_REVNAT, 0);

#[map(name = "SOCK_FLOWS")]
static SOCK_FLOWS: LruHashMap<SockFlowKey, SockFlow> = LruHashMap::pinned(capacity::SOCK_FLOWS, 0);

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
fn sticky_backend(key: &SockFlowKey, now: u64) -> Option<Backend> {
    let entry = SOCK_FLOWS.get_ptr_mut(key)?;
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
fn translate(ctx: &SockAddrContext, call: Call) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context points at the kernel's bpf_sock_addr for the whole run; these fields are readable.
    let (addr, user_port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let Ok(proto) = u8::try_from(protocol) else { return ALLOW };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = (user_port & 0xffff) as u16;
    let flow = Flow {
        l3_off: 0,
        l4_off: 0,
        src_addr: 0,
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
    if svc.ext_flags & flags::SOURCE_RANGES != 0 && !lb::source_allowed(&Flow { src_addr: cfg.snat_addr, ..flow }, &svc)
    {
        drop::count(drop::SOURCE_RANGE);
        return DENY;
    }
    let cookie = socket_cookie(ctx);
    let flow_key = SockFlowKey { cookie, addr, port, proto, pad: 0 };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let known = if call == Call::SendTo { sticky_backend(&flow_key, now) } else { None };
    let backend = if let Some(backend) = known {
        backend
    } else {
        let Some((backend_id, backend)) = lb::select_backend(&flow, &svc, lb::Asker::Socket, cfg) else {
            // No usable endpoint: refuse at once rather than leave the client to time out.
            return if svc.value.flags & flags::REJECT_WHEN_EMPTY != 0 { refuse(proto) } else { ALLOW };
        };
        if call == Call::SendTo {
            let value = SockFlow { backend_id, pad: 0, last_seen_ns: now };
            // Without the entry the next datagram picks again, as before; not worth refusing for.
            let _ = SOCK_FLOWS.insert(&flow_key, &value, u64::from(BPF_ANY));
        }
        backend
    };
    let key = SockKey { cookie, addr: backend.addr, port: backend.port, pad: 0 };
    let frontend = SockFrontend { addr, port, pad: 0 };
    // Without the entry, replies would show the backend's address; better to refuse than to confuse.
    if SOCK_REVNAT.insert(&key, &frontend, u64::from(BPF_ANY)).is_err() {
        drop::count(SOCK_MAP_FULL);
        return DENY;
    }
    // SAFETY: as above; these fields are writable from connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = u32::from(backend.port);
    }
    ALLOW
}

/// Shows the frontend instead of the backend a socket was pointed at.
#[inline(always)]
fn restore(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate`.
    let (addr, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockKey { cookie: socket_cookie(ctx), addr, port: (user_port & 0xffff) as u16, pad: 0 };
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { SOCK_REVNAT.get(&key).copied() } {
        // SAFETY: these fields are writable from recvmsg4 and getpeername4.
        unsafe {
            (*sa).user_ip4 = frontend.addr;
            (*sa).user_port = u32::from(frontend.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Call::SendTo)
}

#[cgroup_sock_addr(recvmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
#[expect(clippy::needless_pass_by_value, reason = "#[cgroup_sock_addr] fixes the signature")]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}
