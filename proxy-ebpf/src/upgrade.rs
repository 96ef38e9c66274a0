//! A flow table and its predecessor during an agent upgrade (`FLAG_MIGRATING`): the agent hands the new
//! programs the previous agent's table (`PREV_*` maps) until it has copied it over. Meanwhile a flow this
//! table does not know is looked up there and taken over, and a new entry is written to both: hooks still
//! running the previous programs for the few milliseconds of the swap know only their own table.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    maps::LruHashMap,
};
use proxy_common::config::{Config, FLAG_MIGRATING};

/// The entry of `key` in `table`, or during an upgrade the one in `previous`, carried over on the way.
#[inline(always)]
pub fn entry<K, V: Copy>(
    table: &LruHashMap<K, V>,
    previous: &LruHashMap<K, V>,
    key: &K,
    cfg: &Config,
) -> Option<*mut V> {
    if let Some(entry) = table.get_ptr_mut(key) {
        return Some(entry);
    }
    if cfg.flags & FLAG_MIGRATING == 0 {
        return None;
    }
    // SAFETY: the value is copied out at once.
    let old = unsafe { previous.get(key).copied() }?;
    let _ = table.insert(key, &old, u64::from(BPF_NOEXIST));
    table.get_ptr_mut(key)
}

/// During an upgrade, writes a new entry to `previous` as well.
#[inline(always)]
pub fn mirror<K, V>(previous: &LruHashMap<K, V>, key: &K, value: &V, cfg: &Config) {
    if cfg.flags & FLAG_MIGRATING != 0 {
        let _ = previous.insert(key, value, u64::from(BPF_ANY));
    }
}
