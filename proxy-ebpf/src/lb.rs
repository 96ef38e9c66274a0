//! Service lookup, backend selection, session affinity and source ranges.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
};
use proxy_common::{
    addr::In6,
    affinity::{AffinityKey, AffinityKey6, AffinityValue},
    backend::{Backend, Backend6},
    capacity,
    config::Config,
    ids::NextIds,
    maglev::MaglevKey,
    service::{SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceKey, ServiceKey6, ServiceValue, flags},
    source_range::{SourceRangeKey, SourceRangeKey6, prefix_len},
};

use crate::{family::Family, packet::Flow};

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, capacity::NO_PREALLOC);

#[map(name = "BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, capacity::NO_PREALLOC);

/// Written and read by the agent only: its id counters survive its restarts here.
#[map(name = "IDS")]
static IDS: Array<NextIds> = Array::pinned(1, 0);

#[map(name = "AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(capacity::AFFINITY, 0);

/// Every address a ClusterIP, external IP or load-balancer IP lives on (the agent keeps it): a packet to
/// one that cannot be translated must not be routed on as it is. NodePort addresses are the node's own,
/// where such a packet is delivered locally, not forwarded, and are left out.
#[map(name = "FRONTEND_ADDRS")]
static FRONTEND_ADDRS: HashMap<u32, u32> = HashMap::pinned(capacity::FRONTEND_ADDRS, capacity::NO_PREALLOC);

/// Whether `addr` (network byte order) is a Service address that is not the node's own.
#[inline(always)]
pub fn is_service_addr<A: Maps>(addr: A) -> bool {
    // SAFETY: only the presence of the value is used.
    unsafe { A::frontend_addrs().get(&addr).is_some() }
}

/// What a packet addressed to no frontend meets, by its destination.
pub enum Unserved {
    /// An address that is not the cluster's to serve: routed as usual.
    Elsewhere,
    /// A ClusterIP, on a port or protocol none of its Services defines: refused.
    ClusterIpPort,
    /// An address in a service CIDR that no Service holds: dropped.
    UnallocatedServiceIp,
}

/// kube-proxy's nftables `cluster-ips-check`, for a packet that matched no frontend. With service CIDRs
/// set, an address outside them costs no map lookup (every ClusterIP is inside one).
#[inline(always)]
pub fn unserved<A: Family>(addr: A, cfg: &Config) -> Unserved {
    let in_cidr = addr.in_service_cidr(cfg);
    if A::has_service_cidrs(cfg) && !in_cidr {
        return Unserved::Elsewhere;
    }
    // SAFETY: the value is copied out at once.
    let bits = unsafe { A::frontend_addrs().get(&addr).copied() }.unwrap_or(0);
    if bits & proxy_common::frontend_addr::CLUSTER_IP != 0 {
        Unserved::ClusterIpPort
    } else if in_cidr && bits == 0 {
        Unserved::UnallocatedServiceIp
    } else {
        Unserved::Elsewhere
    }
}

#[map(name = "SOURCE_RANGES")]
static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

/// IPv6 frontends' maps, as their IPv4 namesakes. Backend and reverse-NAT ids, and Maglev tables, are
/// numbered across both families, so `MAGLEV` and `IDS` serve both.
#[map(name = "SERVICES6")]
static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::pinned(capacity::SERVICES, capacity::NO_PREALLOC);

#[map(name = "BACKENDS6")]
static BACKENDS6: HashMap<u32, Backend6> = HashMap::pinned(capacity::BACKENDS, capacity::NO_PREALLOC);

#[map(name = "AFFINITY6")]
static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue> = LruHashMap::pinned(capacity::AFFINITY, 0);

#[map(name = "FRONTEND_ADDRS6")]
static FRONTEND_ADDRS6: HashMap<In6, u32> = HashMap::pinned(capacity::FRONTEND_ADDRS, capacity::NO_PREALLOC);

#[map(name = "SOURCE_RANGES6")]
static SOURCE_RANGES6: LpmTrie<SourceRangeKey6, u32> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

/// A family's service-side maps.
pub trait Maps: Copy + Eq + 'static {
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceValue>;
    fn backends() -> &'static HashMap<u32, Backend<Self>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue>;
    fn frontend_addrs() -> &'static HashMap<Self, u32>;
    fn source_ranges() -> &'static LpmTrie<SourceRangeKey<Self>, u32>;
}

impl Maps for u32 {
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey, ServiceValue> {
        &SERVICES
    }

    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Backend> {
        &BACKENDS
    }

    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue> {
        &AFFINITY
    }

    #[inline(always)]
    fn frontend_addrs() -> &'static HashMap<u32, u32> {
        &FRONTEND_ADDRS
    }

    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeKey, u32> {
        &SOURCE_RANGES
    }
}

impl Maps for In6 {
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey6, ServiceValue> {
        &SERVICES6
    }

    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Backend6> {
        &BACKENDS6
    }

    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey6, AffinityValue> {
        &AFFINITY6
    }

    #[inline(always)]
    fn frontend_addrs() -> &'static HashMap<In6, u32> {
        &FRONTEND_ADDRS6
    }

    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeKey6, u32> {
        &SOURCE_RANGES6
    }
}

/// A frontend as found for one packet: the slot-0 entry of the scope that applies, and that scope.
#[derive(Clone, Copy)]
pub struct Service {
    pub value: ServiceValue,
    pub scope: u8,
    /// The slot-0 flags of the external scope (masquerade, source ranges), which hold for both scopes.
    pub ext_flags: u16,
}

#[inline(always)]
fn get<A: Maps>(key: &ServiceKey<A>) -> Option<ServiceValue> {
    // SAFETY: values are plain integers copied out at once; a concurrent update can at worst give a
    // torn-but-valid value, which the agent's write order makes harmless (count is written last).
    unsafe { A::services().get(key).copied() }
}

/// The frontend a packet is addressed to. Traffic from the node's pods (`internal`) uses the internal scope
/// where the frontend has one (a Local policy), and the external one otherwise.
#[inline(always)]
pub fn lookup_service<A: Maps>(flow: &Flow<A>, internal: bool) -> Option<Service> {
    let ext = get(&ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, SCOPE_EXTERNAL, 0))?;
    if internal && ext.flags & flags::HAS_INTERNAL_SCOPE != 0 {
        let int = get(&ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, SCOPE_INTERNAL, 0))?;
        return Some(Service { value: int, scope: SCOPE_INTERNAL, ext_flags: ext.flags });
    }
    Some(Service { value: ext, scope: SCOPE_EXTERNAL, ext_flags: ext.flags })
}

/// A backend by id, if it still exists.
#[inline(always)]
pub fn backend<A: Maps>(id: u32) -> Option<Backend<A>> {
    // SAFETY: as in `get`.
    unsafe { A::backends().get(&id).copied() }
}

#[map(name = "MAGLEV")]
static MAGLEV: HashMap<MaglevKey, u32> = HashMap::pinned(capacity::MAGLEV, capacity::NO_PREALLOC);

/// What asks for a backend.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// A node process's `connect()` or `sendmsg()`: a new flow that only this node sees (no source port yet).
    Socket,
    /// A packet without a flow entry.
    Packet,
}

/// Picks a backend for a new flow of a service with `count > 0`: returns its id and address.
///
/// A packet picks by its 5-tuple's hash (`proxy_common::flow_hash`, the same on every node): over the
/// frontend's Maglev table where it has one, else over its slots. So a flow whose state was lost (evicted,
/// a resized table, a restarted node, or a packet of it sprayed to another node) is given the backend it
/// had, as long as the Service's backends are unchanged (with Maglev, even when one of them changed, unless
/// it was this flow's). Client ports make the hash spread flows as evenly as kube-proxy's random choice.
/// A node socket's call has no source port yet: it picks at random.
#[inline(always)]
pub fn select_backend<A: Family>(
    flow: &Flow<A>,
    svc: &Service,
    asker: Asker,
    cfg: &Config,
) -> Option<(u32, Backend<A>)> {
    let count = u32::from(svc.value.count);
    if count == 0 {
        return None;
    }
    let hash = || A::hash(flow);
    if asker == Asker::Packet && svc.value.flags & flags::MAGLEV != 0 && cfg.maglev_table_size != 0 {
        let key = MaglevKey { table: svc.value.backend_id, index: hash() % cfg.maglev_table_size };
        // SAFETY: the value is copied out at once.
        let id = unsafe { MAGLEV.get(&key).copied() }?;
        return Some((id, backend(id)?));
    }
    let random = asker == Asker::Socket;
    // SAFETY: the helper has no preconditions.
    let pick = if random { unsafe { bpf_get_prandom_u32() } } else { hash() };
    // `pick % count` < count <= u16::MAX, so the conversion never fails.
    let slot = u16::try_from(pick % count).ok()? + 1;
    let id = get(&ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, svc.scope, slot))?.backend_id;
    Some((id, backend(id)?))
}

const NS_PER_SEC: u64 = 1_000_000_000;

/// sessionAffinity ClientIP: the backend this client used within the timeout, if it still exists.
#[inline(always)]
pub fn affinity_backend<A: Maps>(flow: &Flow<A>, svc: &Service) -> Option<(u32, Backend<A>)> {
    let key = AffinityKey { client_addr: flow.src_addr, rev_nat_id: svc.value.rev_nat_id };
    // SAFETY: the value is copied out at once.
    let entry = unsafe { A::affinity().get(&key).copied() }?;
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(entry.last_seen_ns) > u64::from(svc.value.affinity_timeout) * NS_PER_SEC {
        return None;
    }
    Some((entry.backend_id, backend(entry.backend_id)?))
}

/// Records (or refreshes) a client's affinity to a backend.
#[inline(always)]
pub fn remember_affinity<A: Maps>(flow: &Flow<A>, svc: &Service, backend_id: u32) {
    let key = AffinityKey { client_addr: flow.src_addr, rev_nat_id: svc.value.rev_nat_id };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let value = AffinityValue { backend_id, pad: 0, last_seen_ns: now };
    // An LRU insert only fails on allocation failure; affinity then falls back to a random pick.
    let _ = A::affinity().insert(&key, &value, u64::from(BPF_ANY));
}

/// loadBalancerSourceRanges: whether the packet's source may use this frontend.
#[inline(always)]
pub fn source_allowed<A: Family>(flow: &Flow<A>, svc: &Service) -> bool {
    let key =
        Key::new(prefix_len(A::BITS), SourceRangeKey { rev_nat_id: svc.value.rev_nat_id.to_be(), addr: flow.src_addr });
    A::source_ranges().get(&key).is_some()
}
