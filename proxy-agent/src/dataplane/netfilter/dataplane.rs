//! One dataplane for both netfilter backends: build the [`plan`](super::plan), print it with the backend,
//! diff the printed ruleset against what was applied (or, at the start and on a full resync, against what
//! the kernel holds), and commit the difference in one atomic transaction.

use std::marker::PhantomData;

use super::{RuleConfig, plan};
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

    /// Makes the kernel ready for a first or full transaction (hooks, fixed chains) and reads back what it
    /// holds now.
    ///
    /// # Errors
    /// When the tool cannot run or the kernel refuses.
    fn installed() -> anyhow::Result<Self::Installed>;

    /// The input of one transaction that turns `old` into `new`, and what it writes and deletes; empty when
    /// nothing changes.
    fn transaction(old: &Previous<'_, Self>, new: &Self::Ruleset) -> (String, ApplyStats)
    where
        Self: Sized;

    /// Commits a transaction whole, or nothing of it.
    ///
    /// # Errors
    /// The tool's own message when it refuses the input.
    fn commit(input: &str) -> anyhow::Result<()>;

    /// Rules and elements in use, for the occupancy metrics.
    fn occupancy(applied: &Self::Ruleset) -> Vec<(&'static str, usize)>;
}

pub struct NetfilterDataplane<B: Backend> {
    config: RuleConfig,
    /// What the last successful transaction installed; `None` until the first one, and after a full
    /// resync is asked for: then what the kernel holds is read and everything differing is rewritten.
    applied: Option<B::Ruleset>,
    /// The table of the last successful apply, to find UDP endpoints that went away.
    last_table: ServiceTable,
    backend: PhantomData<B>,
}

impl<B: Backend> NetfilterDataplane<B> {
    #[must_use]
    pub fn start(config: RuleConfig) -> Self {
        Self { config, applied: None, last_table: ServiceTable::default(), backend: PhantomData }
    }
}

impl<B: Backend> Dataplane for NetfilterDataplane<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        let wanted = B::print(&plan::build(table, &self.config));
        let (input, stats) = match &self.applied {
            Some(applied) if *applied == wanted => (String::new(), ApplyStats::default()),
            Some(applied) => B::transaction(&Previous::Applied(applied), &wanted),
            None => B::transaction(&Previous::Installed(&B::installed()?), &wanted),
        };
        if !input.is_empty() {
            // On failure nothing changed: both backends commit a transaction whole or not at all.
            B::commit(&input)?;
        }
        self.applied = Some(wanted);
        super::clear_stale_udp(&self.last_table, table);
        self.last_table = table.clone();
        Ok(stats)
    }

    fn apply_full(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        // Forget what we believe is installed: what the kernel holds is read back, repairing any drift.
        self.applied = None;
        self.apply(table)
    }

    fn occupancy(&self) -> Vec<(&'static str, usize)> {
        self.applied.as_ref().map_or_else(Vec::new, B::occupancy)
    }
}
