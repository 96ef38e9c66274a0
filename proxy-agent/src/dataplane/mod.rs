//! The dataplane: one trait between the model and the kernel. Nothing above it knows which one is in use.

pub mod conntrack;
pub mod ebpf;
pub mod iptables;
pub mod netfilter;
pub mod nftables;

use std::collections::BTreeSet;

use crate::model::{Frontend, ServiceTable};

/// What one `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Map entries (or rules) written.
    pub writes: usize,
    /// Map entries (or rules) removed.
    pub deletes: usize,
}

pub trait Dataplane: Send {
    /// A short name for logs and metrics: `ebpf`, `iptables`, `nftables`.
    fn name(&self) -> &'static str;

    /// Makes the kernel's service state equal `table`, writing only the differences, in an order that never
    /// shows a half-written service to traffic. On error the live state is still consistent, and the next
    /// call picks up from wherever this one stopped.
    fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats>;

    /// Like [`Dataplane::apply`], knowing that only the `changed` frontends differ from the table last
    /// applied successfully: a dataplane that can write per frontend does only that. The default renders the
    /// whole table.
    fn apply_changes(&mut self, table: &ServiceTable, changed: &BTreeSet<Frontend>) -> anyhow::Result<ApplyStats> {
        let _ = changed;
        self.apply(table)
    }

    /// Like [`Dataplane::apply`], but first re-reads what the kernel holds instead of trusting the agent's
    /// memory of it, so entries changed or removed behind the agent's back are repaired (the periodic full
    /// reconcile).
    fn apply_full(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        self.apply(table)
    }

    /// Entries in use per map (or rules per chain), for the occupancy metrics.
    fn occupancy(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }

    /// Periodic work that does not depend on the table, such as attaching to pod interfaces that appeared
    /// since the last call.
    fn housekeeping(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}
