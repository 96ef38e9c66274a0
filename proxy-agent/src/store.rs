//! The store: the cluster state the sources write and the sync loop reads.
//!
//! Sources replace or patch it; every change bumps a generation and wakes the sync loop. The model only
//! ever sees a consistent snapshot, and never one before the source says its initial view is complete.

use std::sync::Arc;

use imbl::OrdMap;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use tokio::sync::watch;

/// `namespace/name` of a namespaced object. Shared strings: keys are copied into several indexes per
/// object, and a copy should cost a reference count, not two allocations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    #[must_use]
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.as_deref().unwrap_or("default").into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the model reads.
///
/// The maps are persistent (structure-sharing) maps: a copy costs a pointer, a changed copy shares every
/// untouched node with the original, and comparing or diffing two versions skips the shared parts. So one
/// change to a 100k-Service state is copied, compared and found in time that grows with the change, not
/// with the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: OrdMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: OrdMap<ObjectKey, Arc<EndpointSlice>>,
    pub nodes: OrdMap<String, Arc<Node>>,
    /// `networking.k8s.io/v1` `ServiceCIDR` objects, by name: the ranges ClusterIPs are allocated from.
    pub service_cidrs: OrdMap<String, Arc<ServiceCIDR>>,
    /// Objects the source itself refused (a manifest that does not parse or check), as `(kind, name)`:
    /// counted in the metrics with the model's rejections.
    pub refused: Vec<(&'static str, String)>,
}

/// Makes `map` hold exactly `fresh`, touching only entries that differ: an object equal to the one held
/// keeps the held copy, so a relist or reload that changed one object leaves everything else shared, and
/// the sync loop sees a one-object change.
pub fn replace_all<K: Ord + Clone, V: PartialEq>(
    map: &mut OrdMap<K, Arc<V>>,
    fresh: impl IntoIterator<Item = (K, Arc<V>)>,
) {
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in fresh {
        let same = map.get(&key).is_some_and(|held| Arc::ptr_eq(held, &value) || **held == *value);
        if !same {
            map.insert(key.clone(), value);
        }
        seen.insert(key);
    }
    let gone: Vec<K> = map.keys().filter(|k| !seen.contains(*k)).cloned().collect();
    for key in gone {
        map.remove(&key);
    }
}

/// What the sync loop is told: the state, and whether it is complete enough to program.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub state: Arc<ClusterState>,
    /// False until the source has delivered its first complete view. Programming a partial view would
    /// delete live services that simply had not been listed yet.
    pub complete: bool,
    pub generation: u64,
}

/// The writing end, held by the source.
#[derive(Clone)]
pub struct Store {
    tx: Arc<watch::Sender<Snapshot>>,
}

impl Store {
    #[must_use]
    pub fn new() -> (Self, watch::Receiver<Snapshot>) {
        let (tx, rx) = watch::channel(Snapshot::default());
        (Self { tx: Arc::new(tx) }, rx)
    }

    /// Changes the state in place. Wakes the sync loop only if something actually changed.
    pub fn update(&self, change: impl FnOnce(&mut ClusterState)) {
        self.tx.send_if_modified(|snap| {
            let mut next = (*snap.state).clone();
            change(&mut next);
            if next == *snap.state {
                return false;
            }
            snap.state = Arc::new(next);
            snap.generation += 1;
            true
        });
    }

    /// Marks the initial view as complete; the first sync happens after this.
    pub fn mark_complete(&self) {
        self.tx.send_if_modified(|snap| !std::mem::replace(&mut snap.complete, true));
    }
}
