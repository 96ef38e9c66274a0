//! The store: the cluster state the sources write and the sync loop reads.
//!
//! Sources replace or patch it; every change bumps a generation and wakes the sync loop. The model only
//! ever sees a consistent snapshot, and never one before the source says its initial view is complete.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::watch;

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    #[must_use]
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the model reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Objects the source itself refused (a manifest that does not parse or check), as `(kind, name)`:
    /// counted in the metrics with the model's rejections.
    pub refused: Vec<(&'static str, String)>,
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
