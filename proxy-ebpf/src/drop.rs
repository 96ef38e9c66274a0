//! Named reasons for every drop, refusal or give-up, counted per CPU in the `DROPS` array (Cilium's
//! `DROP_*` codes and drop notifications play this part). A program never drops without saying why.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::drop;

#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drop::COUNT, 0);

/// Why the service path stopped: one of `proxy_common::drop`'s indexes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub u32);

pub const SOURCE_RANGE: Reason = Reason(drop::SOURCE_RANGE);
pub const NO_ENDPOINTS: Reason = Reason(drop::NO_ENDPOINTS);
pub const REJECTED: Reason = Reason(drop::REJECTED);
pub const PACKET_TOO_SHORT: Reason = Reason(drop::PACKET_TOO_SHORT);
pub const REWRITE_FAILED: Reason = Reason(drop::REWRITE_FAILED);
pub const SCTP_PORT_CHANGE: Reason = Reason(drop::SCTP_PORT_CHANGE);
pub const CONNTRACK_FULL: Reason = Reason(drop::CONNTRACK_FULL);
pub const SNAT_NO_ADDRESS: Reason = Reason(drop::SNAT_NO_ADDRESS);
pub const SNAT_PORTS_EXHAUSTED: Reason = Reason(drop::SNAT_PORTS_EXHAUSTED);
pub const SNAT_FULL: Reason = Reason(drop::SNAT_FULL);
pub const REJECT_FAILED: Reason = Reason(drop::REJECT_FAILED);
pub const SOCK_REFUSED: Reason = Reason(drop::SOCK_REFUSED);
pub const SOCK_MAP_FULL: Reason = Reason(drop::SOCK_MAP_FULL);
pub const FRAG_WITHOUT_FIRST: Reason = Reason(drop::FRAG_WITHOUT_FIRST);
pub const UNALLOCATED_SERVICE_IP: Reason = Reason(drop::UNALLOCATED_SERVICE_IP);

pub type Result<T> = core::result::Result<T, Reason>;

/// Counts one drop (or refusal) for `reason`.
#[inline(always)]
pub fn count(reason: Reason) {
    crate::stats::bump(&DROPS, reason.0);
}
