//! One dataplane for both netfilter backends and both families: per family, build the
//! [`plan`](super::plan), print it with the backend, diff the printed ruleset against what was applied (or,
//! at the start and on a full resync, against what the kernel holds), and commit the difference in one
//! atomic transaction.

use std::{collections::BTreeMap, marker::PhantomData};

use super::{Family, RuleConfig, plan};
use crate::{
    dataplane::{ApplyStats, Dataplane},
    model::ServiceTable,
};

/// What a backend starts a transaction from.
pub enum Previous<'a, B: Backend> {
    /// Exactly this ruleset: the agent's own last transaction.
    Applied(&'a B::Ruleset),
    /// What the kernel holds, read back as far as the backend can.
    Installed(&'a B::Installed),
}

/// A netfilter backend: how a plan is spelt, read back and committed.
pub trait Backend: Send + 'static {
    /// A printed plan, comparable with the last one applied.
    type Ruleset: PartialEq + Send;
    /// What the kernel holds, as far as a transaction needs to know.
    type Installed;
    /// The mode's name, for logs and metrics.
    const NAME: &'static str;

    fn print(plan: &plan::Plan) -> Self::Ruleset;

    /// Whether the backend can serve `family` here (its tool runs and the kernel has its NAT).
    ///
    /// # Errors
    /// What the tool or the kernel said.
    fn usable(family: Family) -> Result<(), String>;

    /// Makes the kernel ready for a first or full transaction of `family` (hooks, fixed chains) and reads
    /// back what it holds now.
    ///
    /// # Errors
    /// When the tool cannot run or the kernel refuses.
    fn installed(family: Family) -> anyhow::Result<Self::Installed>;

    /// The input of one transaction of `family` that turns `old` into `new`, and what it writes and
    /// deletes; empty when nothing changes.
    fn transaction(family: Family, old: &Previous<'_, Self>, new: &Self::Ruleset) -> (String, ApplyStats)
    where
        Self: Sized;

    /// Commits a transaction of `family` whole, or nothing of it.
    ///
    /// # Errors
    /// The tool's own message when it refuses the input.
    fn commit(family: Family, input: &str) -> anyhow::Result<()>;

    /// Rules and elements in use, for the occupancy metrics.
    fn occupancy(applied: &Self::Ruleset) -> Vec<(&'static str, usize)>;
}

pub struct NetfilterDataplane<B: Backend> {
    config: RuleConfig,
    /// The families served: IPv4, and IPv6 where the backend can serve it here.
    families: Vec<Family>,
    /// Per family, what the last successful transaction installed; absent until the first one, and after
    /// a full resync is asked for: then what the kernel holds is read and everything differing is rewritten.
    applied: BTreeMap<Family, B::Ruleset>,
    /// Per family, the half of the table its last successful apply installed, to find UDP endpoints that
    /// went away.
    last_tables: BTreeMap<Family, ServiceTable>,
    backend: PhantomData<B>,
}

impl<B: Backend> NetfilterDataplane<B> {
    /// Serves IPv4, and IPv6 too unless the backend cannot here (then it says why, once).
    #[must_use]
    pub fn start(config: RuleConfig) -> Self {
        let mut families = vec![Family::V4];
        match B::usable(Family::V6) {
            Ok(()) => families.push(Family::V6),
            Err(why) => tracing::warn!(mode = B::NAME, reason = why, "IPv6 cannot be served here: IPv4 only"),
        }
        Self { config, families, applied: BTreeMap::new(), last_tables: BTreeMap::new(), backend: PhantomData }
    }

    fn apply_family(&mut self, table: &ServiceTable, family: Family) -> anyhow::Result<ApplyStats> {
        let wanted = B::print(&plan::build(table, &self.config, family));
        let (input, stats) = match self.applied.get(&family) {
            Some(applied) if *applied == wanted => (String::new(), ApplyStats::default()),
            Some(applied) => B::transaction(family, &Previous::Applied(applied), &wanted),
            None => B::transaction(family, &Previous::Installed(&B::installed(family)?), &wanted),
        };
        if !input.is_empty() {
            // A failed commit leaves this family consistent (nftables commits a transaction whole;
            // iptables-restore commits each table whole), and the next apply, from what is known, converges.
            B::commit(family, &input)?;
        }
        self.applied.insert(family, wanted);
        let half = table.family(family.is_ipv6());
        super::clear_stale_udp(self.last_tables.get(&family).unwrap_or(&ServiceTable::default()), &half);
        self.last_tables.insert(family, half);
        Ok(stats)
    }
}

impl<B: Backend> Dataplane for NetfilterDataplane<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    /// Each family on its own, as kube-proxy's proxiers: one failing does not hold up the other's rules or
    /// its stale-UDP cleanup; the error names the family.
    fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let mut failed = Vec::new();
        for family in self.families.clone() {
            match self.apply_family(table, family) {
                Ok(of_family) => {
                    stats.writes += of_family.writes;
                    stats.deletes += of_family.deletes;
                }
                Err(e) => failed.push(format!("{family:?}: {e:#}")),
            }
        }
        if failed.is_empty() { Ok(stats) } else { anyhow::bail!("{} rules: {}", B::NAME, failed.join("; ")) }
    }

    fn apply_full(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        // Forget what we believe is installed: what the kernel holds is read back, repairing any drift.
        self.applied.clear();
        self.apply(table)
    }

    fn occupancy(&self) -> Vec<(&'static str, usize)> {
        // Both families' rules in one figure per kind.
        let mut total: BTreeMap<&'static str, usize> = BTreeMap::new();
        for applied in self.applied.values() {
            for (name, n) in B::occupancy(applied) {
                *total.entry(name).or_default() += n;
            }
        }
        total.into_iter().collect()
    }
}
