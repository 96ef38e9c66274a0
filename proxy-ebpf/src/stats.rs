//! Per-CPU counters of what the data path did (`proxy_common::stats`), for tests and operators.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::stats;

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    bump(&STATS, index);
}

/// Adds one to slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *counter += 1 };
    }
}
