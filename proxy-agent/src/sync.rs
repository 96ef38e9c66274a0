//! The sync loop: waits for the store to change, coalesces bursts, runs the model, applies the result.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, time::Instant};

use crate::{
    dataplane::{ApplyStats, Dataplane},
    health::{proxy::ProxyHealth, service_checks::ServiceHealthServers},
    metrics::Metrics,
    model::{IncrementalModel, NodeIdentity, Rejection},
    store::{ClusterState, Snapshot},
};

#[derive(Clone, Copy, Debug)]
#[expect(clippy::struct_field_names, reason = "the names follow kube-proxy's minSyncPeriod and syncPeriod")]
pub struct SyncConfig {
    /// At most one sync per this period, however fast changes arrive (kube-proxy's `minSyncPeriod`).
    pub min_sync_period: Duration,
    /// A sync at least this often, even without changes (kube-proxy's `syncPeriod`).
    pub sync_period: Duration,
    /// A periodic sync re-reads the kernel's state (and repairs drift) once this long has passed since the
    /// last re-read: kube-proxy's hourly full sync. Re-reading costs time in proportion to the table.
    pub full_resync_period: Duration,
    /// How often to look for new pod interfaces.
    pub housekeeping_period: Duration,
}

/// Who watches the sync loop: metrics and the health endpoints.
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub health: Arc<ProxyHealth>,
}

/// Whether this node can take load-balancer traffic: not being deleted, not marked for scale-down.
fn node_eligible(snapshot: &Snapshot, node: &NodeIdentity) -> bool {
    let Some(n) = snapshot.state.nodes.get(&node.name) else { return true };
    let deleting = n.metadata.deletion_timestamp.is_some();
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
    !deleting && !tainted
}

/// How much of the table a sync writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Only the frontends the model says changed.
    Changes,
    /// The whole table, diffed against what the dataplane remembers (the first sync, and after a failure).
    Whole,
    /// The whole table, diffed against what the kernel holds (the first sync, and the periodic full
    /// resync).
    Reread,
}

/// Decides how much each sync writes: the whole table after a start or a failure, a re-read of the kernel's
/// state when the periodic sync finds the full resync period passed, otherwise only what changed.
struct Schedule {
    full_resync_period: Duration,
    whole_table_next: bool,
    /// When the kernel's state was last re-read; `None` until a sync has done it.
    last_reread: Option<Instant>,
}

impl Schedule {
    fn new(full_resync_period: Duration) -> Self {
        Self { full_resync_period, whole_table_next: true, last_reread: None }
    }

    /// The scope of the next sync; `periodic` when the sync period's timer, not a change, started it.
    fn scope(&self, periodic: bool, now: Instant) -> Scope {
        let reread_due = self.last_reread.is_none_or(|at| now.duration_since(at) >= self.full_resync_period);
        match (periodic && reread_due, self.whole_table_next) {
            (true, _) => Scope::Reread,
            (false, true) => Scope::Whole,
            (false, false) => Scope::Changes,
        }
    }

    fn succeeded(&mut self, scope: Scope, now: Instant) {
        self.whole_table_next = false;
        if scope == Scope::Reread {
            self.last_reread = Some(now);
        }
    }

    /// The live state stays consistent after a failure; the next sync writes the whole table again.
    fn failed(&mut self) {
        self.whole_table_next = true;
    }
}

/// The model and the dataplane: moved together onto a blocking thread for each sync, since both do work
/// that grows with the change (and on a full sync, with the table).
struct Engine {
    model: IncrementalModel,
    dataplane: Box<dyn Dataplane>,
}

/// What one sync did.
struct Outcome {
    result: anyhow::Result<ApplyStats>,
    occupancy: Vec<(&'static str, usize)>,
    changed: usize,
    model_ms: f64,
}

impl Engine {
    fn sync(&mut self, state: &Arc<ClusterState>, scope: Scope) -> Outcome {
        let started = std::time::Instant::now();
        let cidrs_before = self.model.table().service_cidrs.clone();
        let changed = self.model.update(state);
        let model_ms = started.elapsed().as_secs_f64() * 1e3;
        let table = self.model.table();
        // Service CIDRs are node-wide, no frontend's: a change to them alone still needs applying.
        let cidrs_changed = table.service_cidrs != cidrs_before;
        let result = match scope {
            Scope::Changes if changed.is_empty() && !cidrs_changed => Ok(ApplyStats::default()),
            Scope::Changes => self.dataplane.apply_changes(table, &changed),
            Scope::Whole => self.dataplane.apply(table),
            Scope::Reread => self.dataplane.apply_full(table),
        };
        Outcome { result, occupancy: self.dataplane.occupancy(), changed: changed.len(), model_ms }
    }
}

/// Runs until the source goes away. Returns only on error.
pub async fn run(
    mut snapshots: watch::Receiver<Snapshot>,
    node: NodeIdentity,
    dataplane: Box<dyn Dataplane>,
    config: SyncConfig,
    observers: Observers,
) -> anyhow::Result<()> {
    let Observers { metrics, health } = observers;
    tracing::info!(dataplane = dataplane.name(), "waiting for the initial view of the cluster");
    snapshots
        .wait_for(|s| s.complete)
        .await
        .map_err(|_| anyhow::anyhow!("the source stopped before its first complete view"))?;

    let mut engine = Engine { model: IncrementalModel::new(node.clone()), dataplane };
    let mut reported: BTreeSet<Rejection> = BTreeSet::new();
    let mut health_checks = ServiceHealthServers::new(None);
    let mut last_sync: Option<Instant> = None;
    // The state last applied successfully, and whether the next sync must write the whole table.
    let mut applied: Option<(u64, Arc<ClusterState>)> = None;
    let mut schedule = Schedule::new(config.full_resync_period);
    let mut housekeeping = tokio::time::interval(config.housekeeping_period);
    let mut resync = tokio::time::interval(config.sync_period);
    loop {
        let forced = tokio::select! {
            changed = snapshots.changed() => {
                changed.map_err(|_| anyhow::anyhow!("the source stopped"))?;
                health.queued(SystemTime::now());
                false
            }
            _ = resync.tick() => true,
            _ = housekeeping.tick() => {
                let (returned, result) = blocking(engine, |e| e.dataplane.housekeeping()).await?;
                engine = returned;
                if let Err(e) = result {
                    tracing::warn!(error = format!("{e:#}"), "dataplane housekeeping failed; retrying next period");
                }
                continue;
            }
        };
        if let Some(last) = last_sync {
            tokio::time::sleep_until(last + config.min_sync_period).await;
        }
        let snapshot = snapshots.borrow_and_update().clone();
        if !forced && applied.as_ref().is_some_and(|(generation, _)| *generation == snapshot.generation) {
            continue;
        }
        last_sync = Some(Instant::now());

        let started = std::time::Instant::now();
        let scope = schedule.scope(forced, Instant::now());
        let target = Arc::clone(&snapshot.state);
        let (returned, outcome) = blocking(engine, move |e| e.sync(&target, scope)).await?;
        engine = returned;

        let rejected = record_rejections(&engine.model, &snapshot.state, &metrics, &mut reported);
        health.set_node_eligible(node_eligible(&snapshot, &node));
        health_checks.update(engine.model.health_checks()).await;
        for (map, entries) in outcome.occupancy {
            metrics
                .map_entries
                .get_or_create(&crate::metrics::MapLabel { map: map.to_owned() })
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
        }
        let frontends = engine.model.table().frontends.len();
        let backends = engine.model.distinct_backends();
        match outcome.result {
            Ok(stats) => {
                let now = SystemTime::now();
                health.updated(now);
                metrics.sync_duration.observe(started.elapsed().as_secs_f64());
                metrics.sync_last_timestamp.set(crate::metrics::unix_seconds(now));
                let before = applied.map(|(_, state)| state).unwrap_or_default();
                metrics.observe_programming(&before, &snapshot.state, now);
                metrics.frontends.set(i64::try_from(frontends).unwrap_or(i64::MAX));
                metrics.backends.set(i64::try_from(backends).unwrap_or(i64::MAX));
                metrics.map_writes.inc_by(stats.writes as u64);
                metrics.map_deletes.inc_by(stats.deletes as u64);
                applied = Some((snapshot.generation, Arc::clone(&snapshot.state)));
                schedule.succeeded(scope, Instant::now());
                tracing::info!(
                    generation = snapshot.generation,
                    scope = ?scope,
                    frontends,
                    backends,
                    changed = outcome.changed,
                    writes = stats.writes,
                    deletes = stats.deletes,
                    rejected,
                    model_ms = outcome.model_ms,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "service table applied"
                );
            }
            Err(e) => {
                schedule.failed();
                metrics.sync_errors.inc();
                tracing::error!(
                    generation = snapshot.generation,
                    error = format!("{e:#}"),
                    "applying the service table failed"
                );
            }
        }
    }
}

/// Logs new rejections and counts every object left out, by kind. Returns how many the model rejected.
fn record_rejections(
    model: &IncrementalModel,
    state: &ClusterState,
    metrics: &Metrics,
    reported: &mut BTreeSet<Rejection>,
) -> usize {
    let rejected = model.rejected();
    report_rejections(&rejected, reported);
    metrics.rejected.clear();
    let refused_by_source = state.refused.iter().map(|(kind, _)| *kind);
    for kind in rejected.iter().map(|r| r.kind).chain(refused_by_source) {
        metrics.rejected.get_or_create(&crate::metrics::KindLabel { kind: kind.to_owned() }).inc();
    }
    rejected.len()
}

/// Logs each rejected object once, when it is first rejected, and again if it recovers and breaks again.
fn report_rejections(rejected: &[Rejection], reported: &mut BTreeSet<Rejection>) {
    let now: BTreeSet<Rejection> = rejected.iter().cloned().collect();
    for r in now.difference(reported) {
        tracing::error!(kind = r.kind, object = %r.object, field = %r.field, reason = %r.reason, "{r}; not programmed");
    }
    *reported = now;
}

/// Runs model and dataplane work on a blocking thread: map writes and netlink calls are syscalls, and a
/// full sync of a large table is seconds of CPU.
async fn blocking<T: Send + 'static>(
    mut engine: Engine,
    work: impl FnOnce(&mut Engine) -> T + Send + 'static,
) -> anyhow::Result<(Engine, T)> {
    let result = tokio::task::spawn_blocking(move || {
        let out = work(&mut engine);
        (engine, out)
    })
    .await?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first sync and the sync after a failure write the whole table; a periodic sync re-reads the
    /// kernel only once the full resync period has passed since the last re-read, and otherwise writes
    /// only what changed, like a change does.
    #[test]
    fn periodic_syncs_reread_the_kernel_once_per_full_resync_period() {
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut schedule = Schedule::new(hour);
        assert_eq!(schedule.scope(true, start), Scope::Reread, "the first periodic sync re-reads");
        assert_eq!(schedule.scope(false, start), Scope::Whole, "a first sync started by a change");
        schedule.succeeded(Scope::Reread, start);

        let later = start + Duration::from_secs(30);
        assert_eq!(schedule.scope(true, later), Scope::Changes, "a periodic sync within the hour");
        assert_eq!(schedule.scope(false, later), Scope::Changes);
        schedule.succeeded(Scope::Changes, later);
        assert_eq!(schedule.scope(true, start + hour), Scope::Reread, "an hour after the last re-read");

        schedule.failed();
        assert_eq!(schedule.scope(true, later), Scope::Whole, "after a failure, the whole table");
        schedule.succeeded(Scope::Whole, later);
        assert_eq!(schedule.scope(true, later), Scope::Changes, "a whole-table sync is not a re-read");
        assert_eq!(schedule.scope(true, start + hour), Scope::Reread);
    }
}
