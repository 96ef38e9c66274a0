//! Prometheus metrics, under kube-proxy's names where the meaning is the same, so existing dashboards and
//! alerts keep working; ours carry the `proxy_agent_` prefix.

use std::{
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime},
};

use imbl::ordmap::DiffItem;
use k8s_openapi::{api::discovery::v1::EndpointSlice, jiff::Timestamp};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::store::ClusterState;

/// kube-proxy's buckets for sync durations: 1 ms doubling to about 16 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

pub struct Metrics {
    pub registry: Registry,
    /// kube-proxy: time to compute and program the rules.
    pub sync_duration: Histogram,
    /// kube-proxy: when the last successful sync ended.
    pub sync_last_timestamp: Gauge<f64, AtomicU64>,
    /// kube-proxy: time from an endpoint change (the EndpointSlice's trigger-time annotation) to programmed.
    pub network_programming: Histogram,
    pub sync_errors: Counter,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub map_writes: Counter,
    pub map_deletes: Counter,
    /// Objects left out, by kind.
    pub rejected: Family<KindLabel, Gauge>,
    /// Entries in use, by map.
    pub map_entries: Family<MapLabel, Gauge>,
    /// 1 for the dataplane in use, with why it was chosen.
    pub dataplane_mode: Family<ModeLabel, Gauge>,
}

/// The annotation the EndpointSlice controller sets to when the change that produced the slice happened.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(sync_buckets());
        let sync_last_timestamp = Gauge::<f64, AtomicU64>::default();
        let network_programming =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 20));
        let sync_errors = Counter::default();
        let (frontends, backends) = (Gauge::default(), Gauge::default());
        let (map_writes, map_deletes) = (Counter::default(), Counter::default());
        let rejected = Family::<KindLabel, Gauge>::default();
        let map_entries = Family::<MapLabel, Gauge>::default();
        let dataplane_mode = Family::<ModeLabel, Gauge>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            sync_last_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming.clone(),
        );
        registry.register("proxy_agent_sync_errors", "Syncs that failed to program the dataplane", sync_errors.clone());
        registry.register("proxy_agent_frontends", "Frontends (address, port, protocol) programmed", frontends.clone());
        registry.register("proxy_agent_backends", "Distinct backends programmed", backends.clone());
        registry.register("proxy_agent_map_writes", "Map entries written", map_writes.clone());
        registry.register("proxy_agent_map_deletes", "Map entries deleted", map_deletes.clone());
        registry.register(
            "proxy_agent_rejected_objects",
            "Objects the dataplane cannot honour, skipped",
            rejected.clone(),
        );
        registry.register("proxy_agent_map_entries", "Entries in use in each map", map_entries.clone());
        registry.register(
            "proxy_agent_dataplane_mode",
            "The dataplane in use and why it was chosen",
            dataplane_mode.clone(),
        );
        Self {
            registry,
            sync_duration,
            sync_last_timestamp,
            network_programming,
            sync_errors,
            frontends,
            backends,
            map_writes,
            map_deletes,
            rejected,
            map_entries,
            dataplane_mode,
        }
    }

    /// After a successful sync from `before` to `after`: observes how long each endpoint change that
    /// reached the dataplane with it took, from the trigger time its EndpointSlice carries.
    pub fn observe_programming(&self, before: &ClusterState, after: &ClusterState, now: SystemTime) {
        let now = Timestamp::try_from(now).unwrap_or(Timestamp::UNIX_EPOCH);
        let trigger =
            |slice: &EndpointSlice| slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME)?.parse::<Timestamp>().ok();
        for item in before.endpoint_slices.diff(&after.endpoint_slices) {
            let (old, new) = match item {
                DiffItem::Add(_, new) => (None, new),
                DiffItem::Update { old: (_, old), new: (_, new) } => (trigger(old), new),
                DiffItem::Remove(..) => continue,
            };
            let Some(triggered) = trigger(new).filter(|t| Some(*t) != old) else { continue };
            let latency = now.duration_since(triggered);
            let secs = Duration::try_from(latency).map_or(0.0, |d| d.as_secs_f64());
            self.network_programming.observe(secs);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
#[must_use]
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;
    use crate::store::ObjectKey;

    #[test]
    fn each_endpoint_change_is_observed_once() {
        let slice: EndpointSlice = serde_saphyr::from_str(
            "metadata: {name: s, namespace: d, annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-01-01T00:00:00Z'}}\naddressType: IPv4\nendpoints: []",
        )
        .unwrap();
        let mut state = ClusterState::default();
        state.endpoint_slices.insert(ObjectKey::of(&slice.metadata), Arc::new(slice));
        let m = Metrics::new();
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_602);
        m.observe_programming(&ClusterState::default(), &state, later);
        m.observe_programming(&state, &state, later);
        let text = m.encode();
        assert!(text.contains("kubeproxy_network_programming_duration_seconds_count 1"), "{text}");
        assert!(text.contains("kubeproxy_network_programming_duration_seconds_sum 2.0"), "{text}");
    }
}
