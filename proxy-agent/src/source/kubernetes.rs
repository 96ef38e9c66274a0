//! Cluster state from the Kubernetes API: watchers on Services, EndpointSlices and this node's Node.
//!
//! Each watcher lists, then watches, relisting with backoff after errors. A (re)list is buffered and replaces
//! that kind's objects at once when it is complete; the store is marked complete only when every kind has
//! delivered its first full list, so the dataplane is never programmed from a partial view.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use futures::{StreamExt as _, TryStreamExt as _};
use imbl::OrdMap;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use crate::store::{ClusterState, ObjectKey, Store, replace_all};

/// A kind the store holds: how to key it and where it lives in [`ClusterState`].
trait StoredKind:
    kube::Resource + Clone + PartialEq + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    type Key: Ord + Clone + Send;
    const NAME: &'static str;
    fn key(&self) -> Self::Key;
    fn slot(state: &mut ClusterState) -> &mut OrdMap<Self::Key, Arc<Self>>;
}

impl StoredKind for Service {
    type Key = ObjectKey;
    const NAME: &'static str = "Service";
    fn key(&self) -> ObjectKey {
        ObjectKey::of(&self.metadata)
    }
    fn slot(state: &mut ClusterState) -> &mut OrdMap<ObjectKey, Arc<Self>> {
        &mut state.services
    }
}

impl StoredKind for EndpointSlice {
    type Key = ObjectKey;
    const NAME: &'static str = "EndpointSlice";
    fn key(&self) -> ObjectKey {
        ObjectKey::of(&self.metadata)
    }
    fn slot(state: &mut ClusterState) -> &mut OrdMap<ObjectKey, Arc<Self>> {
        &mut state.endpoint_slices
    }
}

impl StoredKind for Node {
    type Key = String;
    const NAME: &'static str = "Node";
    fn key(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
    fn slot(state: &mut ClusterState) -> &mut OrdMap<String, Arc<Self>> {
        &mut state.nodes
    }
}

impl StoredKind for ServiceCIDR {
    type Key = String;
    const NAME: &'static str = "ServiceCIDR";
    fn key(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
    fn slot(state: &mut ClusterState) -> &mut OrdMap<String, Arc<Self>> {
        &mut state.service_cidrs
    }
}

/// Which kinds have delivered their first complete list.
struct Readiness {
    pending: Mutex<Vec<&'static str>>,
}

impl Readiness {
    fn listed(&self, kind: &'static str, store: &Store) {
        let mut pending = self.pending.lock().expect("readiness lock");
        pending.retain(|k| *k != kind);
        if pending.is_empty() {
            store.mark_complete();
        }
    }
}

/// Applies one watcher event to the store. A (re)list is buffered in `relist` until `InitDone`.
fn on_event<K: StoredKind>(
    event: watcher::Event<K>,
    relist: &mut Option<BTreeMap<K::Key, Arc<K>>>,
    store: &Store,
) -> bool {
    match event {
        watcher::Event::Init => *relist = Some(BTreeMap::new()),
        watcher::Event::InitApply(obj) => {
            relist.get_or_insert_default().insert(obj.key(), Arc::new(obj));
        }
        watcher::Event::InitDone => {
            let fresh = relist.take().unwrap_or_default();
            store.update(|s| replace_all(K::slot(s), fresh));
            return true;
        }
        watcher::Event::Apply(obj) => store.update(|s| drop(K::slot(s).insert(obj.key(), Arc::new(obj)))),
        watcher::Event::Delete(obj) => store.update(|s| drop(K::slot(s).remove(&obj.key()))),
    }
    false
}

async fn watch_kind<K: StoredKind>(
    api: Api<K>,
    config: watcher::Config,
    store: Store,
    readiness: Arc<Readiness>,
) -> anyhow::Result<()>
where
    K::DynamicType: Default,
{
    let mut relist = None;
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => {
                if on_event(event, &mut relist, &store) {
                    tracing::info!(kind = K::NAME, "list complete");
                    readiness.listed(K::NAME, &store);
                }
            }
            Ok(None) => anyhow::bail!("the {} watch stream ended", K::NAME),
            // The backoff wrapper retries; an error here is reported and the stream goes on.
            Err(e) => tracing::warn!(kind = K::NAME, error = %e, "watch failed; retrying with backoff"),
        }
    }
}

/// How the agent reaches the API server. It must not depend on the `kubernetes` Service's ClusterIP, which
/// only works once a service proxy (this agent) is running: `--master` (or `KUBERNETES_SERVICE_HOST`, which a
/// DaemonSet can set to the API server's real address) gives the address, in-cluster service-account
/// credentials the identity; `--kubeconfig` gives both.
pub async fn client_config(master: Option<&str>, kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Config> {
    use anyhow::Context as _;
    let mut config = if let Some(path) = kubeconfig {
        let file = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("using kubeconfig {}", path.display()))?
    } else if master.is_some() {
        // Service-account credentials; the address comes from --master below, not from cluster DNS.
        match kube::Config::incluster_dns() {
            Ok(config) => config,
            Err(_) => kube::Config::infer().await.context("no in-cluster credentials and no usable kubeconfig")?,
        }
    } else {
        kube::Config::infer().await.context("finding the API server (in-cluster environment or kubeconfig)")?
    };
    if let Some(master) = master {
        config.cluster_url = master.parse().with_context(|| format!("--master {master:?} is not a URL"))?;
    }
    Ok(config)
}

/// Watches `ServiceCIDR` objects where the API serves them (`networking.k8s.io/v1`, Kubernetes 1.33 and later);
/// elsewhere logs once and leaves `--service-cluster-ip-range` as the only source. Not part of readiness:
/// without them the agent only drops less, so the first sync does not wait for them.
async fn watch_service_cidrs(api: Api<ServiceCIDR>, store: Store, readiness: Arc<Readiness>) -> anyhow::Result<()> {
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 403 => {
            tracing::info!(
                code = e.code,
                "ServiceCIDRs (networking.k8s.io/v1) not readable here: service CIDRs come from --service-cluster-ip-range only"
            );
            std::future::pending::<()>().await;
            Ok(())
        }
        // Anything else (the API server away) is the watcher's to retry.
        _ => watch_kind::<ServiceCIDR>(api, watcher::Config::default(), store, readiness).await,
    }
}

/// Runs the watchers until one of them fails for good.
pub async fn run(client: Client, node_name: String, store: Store) -> anyhow::Result<()> {
    let readiness = Arc::new(Readiness { pending: Mutex::new(vec![Service::NAME, EndpointSlice::NAME, Node::NAME]) });
    // Services another proxy is responsible for carry this label; kube-proxy skips them too.
    let services = watcher::Config::default().labels("!service.kubernetes.io/service-proxy-name");
    let slices = watcher::Config::default().labels("kubernetes.io/service-name");
    let nodes = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    tokio::try_join!(
        watch_kind::<Service>(Api::all(client.clone()), services, store.clone(), readiness.clone()),
        watch_kind::<EndpointSlice>(Api::all(client.clone()), slices, store.clone(), readiness.clone()),
        watch_kind::<Node>(Api::all(client.clone()), nodes, store.clone(), readiness.clone()),
        watch_service_cidrs(Api::all(client), store, readiness),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[tokio::test]
    async fn master_overrides_the_kubeconfig_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters: [{name: k, cluster: {server: 'https://10.32.0.1:443'}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n",
        )
        .unwrap();
        let plain = client_config(None, Some(&path)).await.unwrap();
        assert_eq!(plain.cluster_url.to_string(), "https://10.32.0.1:443/");
        let direct = client_config(Some("https://192.0.2.10:6443"), Some(&path)).await.unwrap();
        assert_eq!(direct.cluster_url.to_string(), "https://192.0.2.10:6443/");
        assert!(client_config(Some("not a url"), Some(&path)).await.is_err());
    }

    use super::*;

    fn service(name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    fn names(rx: &tokio::sync::watch::Receiver<crate::store::Snapshot>) -> Vec<String> {
        rx.borrow().state.services.keys().map(|k| k.name.to_string()).collect()
    }

    /// A relist is buffered and swapped in whole at `InitDone`: objects that vanished while the watch was
    /// down disappear, and nothing is visible half-listed.
    #[test]
    fn a_relist_replaces_the_kind_only_when_complete() {
        let (store, rx) = Store::new();
        let mut relist = None;
        for e in
            [watcher::Event::Init, watcher::Event::InitApply(service("a")), watcher::Event::InitApply(service("b"))]
        {
            assert!(!on_event(e, &mut relist, &store));
        }
        assert!(names(&rx).is_empty(), "nothing is visible before InitDone");
        assert!(on_event(watcher::Event::InitDone, &mut relist, &store));
        assert_eq!(names(&rx), ["a", "b"]);

        on_event(watcher::Event::Apply(service("c")), &mut relist, &store);
        on_event(watcher::Event::Delete(service("a")), &mut relist, &store);
        assert_eq!(names(&rx), ["b", "c"]);

        // After a 410 Gone the watcher relists; "b" was deleted meanwhile.
        for e in [watcher::Event::Init, watcher::Event::InitApply(service("c")), watcher::Event::InitDone] {
            on_event(e, &mut relist, &store);
        }
        assert_eq!(names(&rx), ["c"]);

        // A relist that finds nothing new changes nothing: no sync is even woken.
        let generation = rx.borrow().generation;
        for e in [watcher::Event::Init, watcher::Event::InitApply(service("c")), watcher::Event::InitDone] {
            on_event(e, &mut relist, &store);
        }
        assert_eq!(rx.borrow().generation, generation);
    }

    #[test]
    fn the_store_is_complete_only_after_every_kind_has_listed() {
        let (store, rx) = Store::new();
        let readiness = Readiness { pending: Mutex::new(vec![Service::NAME, EndpointSlice::NAME, Node::NAME]) };
        readiness.listed(Service::NAME, &store);
        readiness.listed(Node::NAME, &store);
        assert!(!rx.borrow().complete);
        readiness.listed(EndpointSlice::NAME, &store);
        assert!(rx.borrow().complete);
    }

    #[test]
    fn an_update_that_changes_nothing_does_not_wake_the_sync_loop() {
        let (store, rx) = Store::new();
        store.update(|s| drop(s.services.insert(ObjectKey::of(&service("a").metadata), Arc::new(service("a")))));
        let generation = rx.borrow().generation;
        store.update(|s| drop(s.services.insert(ObjectKey::of(&service("a").metadata), Arc::new(service("a")))));
        assert_eq!(rx.borrow().generation, generation);
    }
}

#[cfg(test)]
#[path = "kubernetes_api_tests.rs"]
mod api_tests;
