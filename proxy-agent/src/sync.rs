//! The sync loop: waits for the store to change, coalesces bursts, runs the model, applies the result.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, time::Instant};

use crate::{
    dataplane::Dataplane,
    health::{proxy::ProxyHealth, service_checks::ServiceHealthServers},
    metrics::Metrics,
    model::{self, NodeIdentity, Rejection},
    store::Snapshot,
};

#[derive(Clone, Copy, Debug)]
#[expect(clippy::struct_field_names, reason = "the names follow kube-proxy's minSyncPeriod and syncPeriod")]
pub struct SyncConfig {
    /// At most one sync per this period, however fast changes arrive (kube-proxy's `minSyncPeriod`).
    pub min_sync_period: Duration,
    /// A full reconcile at least this often, even without changes (kube-proxy's `syncPeriod`).
    pub sync_period: Duration,
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

/// Runs until the source goes away. Returns only on error.
pub async fn run(
    mut snapshots: watch::Receiver<Snapshot>,
    node: NodeIdentity,
    mut dataplane: Box<dyn Dataplane>,
    config: SyncConfig,
    observers: Observers,
) -> anyhow::Result<()> {
    let Observers { metrics, health } = observers;
    tracing::info!(dataplane = dataplane.name(), "waiting for the initial view of the cluster");
    snapshots
        .wait_for(|s| s.complete)
        .await
        .map_err(|_| anyhow::anyhow!("the source stopped before its first complete view"))?;

    let mut reported: BTreeSet<Rejection> = BTreeSet::new();
    let mut health_checks = ServiceHealthServers::new(None);
    let mut last_sync: Option<Instant> = None;
    let mut applied_generation = None;
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
                let (returned, result) = blocking(dataplane, |d| d.housekeeping()).await?;
                dataplane = returned;
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
        if !forced && applied_generation == Some(snapshot.generation) {
            continue;
        }
        last_sync = Some(Instant::now());

        let started = std::time::Instant::now();
        let desired = model::desired(&snapshot.state, &node);
        report_rejections(&desired.rejected, &mut reported);
        metrics.rejected.clear();
        let refused_by_source = snapshot.state.refused.iter().map(|(kind, _)| *kind);
        for kind in desired.rejected.iter().map(|r| r.kind).chain(refused_by_source) {
            metrics.rejected.get_or_create(&crate::metrics::KindLabel { kind: kind.to_owned() }).inc();
        }
        health.set_node_eligible(node_eligible(&snapshot, &node));
        health_checks.update(&desired.health_checks).await;
        let table = desired.table;
        let frontends = table.frontends.len();
        let backends = table.distinct_backends();
        // The periodic resync re-reads the kernel's state, repairing anything changed behind our back.
        let (returned, (result, occupancy)) = blocking(dataplane, move |d| {
            let result = if forced { d.apply_full(&table) } else { d.apply(&table) };
            (result, d.occupancy())
        })
        .await?;
        dataplane = returned;
        for (map, entries) in occupancy {
            metrics
                .map_entries
                .get_or_create(&crate::metrics::MapLabel { map: map.to_owned() })
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
        }
        match result {
            Ok(stats) => {
                applied_generation = Some(snapshot.generation);
                let now = SystemTime::now();
                health.updated(now);
                metrics.sync_duration.observe(started.elapsed().as_secs_f64());
                metrics.sync_last_timestamp.set(crate::metrics::unix_seconds(now));
                metrics.observe_programming(&snapshot.state, now);
                metrics.frontends.set(i64::try_from(frontends).unwrap_or(i64::MAX));
                metrics.backends.set(i64::try_from(backends).unwrap_or(i64::MAX));
                metrics.map_writes.inc_by(stats.writes as u64);
                metrics.map_deletes.inc_by(stats.deletes as u64);
                tracing::info!(
                    generation = snapshot.generation,
                    frontends,
                    backends,
                    writes = stats.writes,
                    deletes = stats.deletes,
                    rejected = desired.rejected.len(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "service table applied"
                );
            }
            // The live state stays consistent; the next change or resync retries from where this stopped.
            Err(e) => {
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

/// Logs each rejected object once, when it is first rejected, and again if it recovers and breaks again.
fn report_rejections(rejected: &[Rejection], reported: &mut BTreeSet<Rejection>) {
    let now: BTreeSet<Rejection> = rejected.iter().cloned().collect();
    for r in now.difference(reported) {
        tracing::error!(kind = r.kind, object = %r.object, field = %r.field, reason = %r.reason, "{r}; not programmed");
    }
    *reported = now;
}

/// Runs dataplane work on a blocking thread: map writes and netlink calls are syscalls.
async fn blocking<T: Send + 'static>(
    mut dataplane: Box<dyn Dataplane>,
    work: impl FnOnce(&mut dyn Dataplane) -> T + Send + 'static,
) -> anyhow::Result<(Box<dyn Dataplane>, T)> {
    let result = tokio::task::spawn_blocking(move || {
        let out = work(dataplane.as_mut());
        (dataplane, out)
    })
    .await?;
    Ok(result)
}
