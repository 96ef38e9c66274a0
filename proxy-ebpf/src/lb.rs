//! Service lookup and backend selection.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::HashMap};
use proxy_common::{
    backend::Backend,
    capacity,
    service::{ServiceKey, ServiceValue},
};

use crate::packet::Flow;

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

#[map(name = "BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

/// The frontend a packet is addressed to: slot 0 of the service map.
#[inline(always)]
pub fn lookup_service(flow: &Flow) -> Option<ServiceValue> {
    let key = ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, 0);
    // SAFETY: values are plain integers copied out at once; a concurrent update can at worst give a
    // torn-but-valid value, which the agent's write order makes harmless (count is written last).
    unsafe { SERVICES.get(&key).copied() }
}

/// A backend by id, if it still exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    // SAFETY: as in `lookup_service`.
    unsafe { BACKENDS.get(&id).copied() }
}

/// Picks a random backend of a service with `svc.count > 0`. Returns its id and address.
#[inline(always)]
pub fn select_backend(flow: &Flow, svc: &ServiceValue) -> Option<(u32, Backend)> {
    // SAFETY: the helper has no preconditions.
    let rand = unsafe { bpf_get_prandom_u32() };
    let count = u32::from(svc.count);
    if count == 0 {
        return None;
    }
    // `rand % count` < count <= u16::MAX, so the conversion never fails.
    let slot = u16::try_from(rand % count).ok()? + 1;
    let key = ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, slot);
    // SAFETY: as in `lookup_service`.
    let id = unsafe { SERVICES.get(&key) }?.backend_id;
    Some((id, backend(id)?))
}
