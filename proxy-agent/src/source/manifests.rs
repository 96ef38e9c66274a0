//! Cluster state from a directory of manifests: the same YAML a user would `kubectl apply`.
//!
//! The directory is polled; when a file changes, that file is read again. A document that does not parse,
//! or an object that does not check, is logged with its file, kind and name, and the object's last good
//! version stays in place, as a rejected `kubectl apply` would leave it. Other objects are unaffected.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use serde_json::Value;

use crate::{
    model::validate,
    store::{ClusterState, ObjectKey, Store, replace_all},
};

/// One object read from a file, or the reason it could not be used.
#[derive(Clone, Debug)]
enum Parsed {
    Service(ObjectKey, Arc<Service>),
    EndpointSlice(ObjectKey, Arc<EndpointSlice>),
    Node(String, Arc<Node>),
    ServiceCidr(String, Arc<ServiceCIDR>),
}

/// An object's identity across reloads: kind and `namespace/name`.
type Identity = (&'static str, String);

impl Parsed {
    fn identity(&self) -> Identity {
        match self {
            Self::Service(k, _) => ("Service", k.to_string()),
            Self::EndpointSlice(k, _) => ("EndpointSlice", k.to_string()),
            Self::Node(n, _) => ("Node", n.clone()),
            Self::ServiceCidr(n, _) => ("ServiceCIDR", n.clone()),
        }
    }

    fn insert_into(self, state: &mut ClusterState) {
        match self {
            Self::Service(k, v) => drop(state.services.insert(k, v)),
            Self::EndpointSlice(k, v) => drop(state.endpoint_slices.insert(k, v)),
            Self::Node(k, v) => drop(state.nodes.insert(k, v)),
            Self::ServiceCidr(k, v) => drop(state.service_cidrs.insert(k, v)),
        }
    }
}

/// Where each object came from, and the last version of it that checked.
#[derive(Default)]
struct LastGood {
    objects: BTreeMap<Identity, (PathBuf, Parsed)>,
    /// Each file's parse, kept while its size and modification time stay the same: a change to one file
    /// re-parses that file only, and the objects of the others keep their identity (so the sync loop sees
    /// only what changed).
    parsed_files: BTreeMap<PathBuf, ParsedFile>,
}

/// A file's size and modification time: cheap to read, and changes with any edit.
type FileStamp = (u64, Option<SystemTime>);

/// What one file held, document by document.
#[derive(Clone)]
struct ParsedFile {
    stamp: FileStamp,
    documents: Vec<Document>,
}

/// One YAML document: its objects (each parsed, or refused), or the syntax error that stopped the file.
#[derive(Clone)]
enum Document {
    Objects(Vec<Result<Option<Parsed>, ParseError>>),
    Invalid(String),
}

impl ParsedFile {
    fn parse(text: &str, stamp: FileStamp) -> Self {
        // Each document as JSON first, as Kubernetes reads YAML; a syntax error anywhere makes the whole file
        // unreadable (its objects are kept as they were).
        let documents = match serde_saphyr::from_multiple::<Value>(text) {
            Ok(values) => values
                .into_iter()
                .map(|value| Document::Objects(items(value).into_iter().map(parse_object).collect()))
                .collect(),
            Err(e) => vec![Document::Invalid(e.to_string())],
        };
        Self { stamp, documents }
    }
}

fn stamp_of(file: &Path) -> std::io::Result<FileStamp> {
    let meta = std::fs::metadata(file)?;
    Ok((meta.len(), meta.modified().ok()))
}

pub struct ManifestSource {
    dir: PathBuf,
    poll: Duration,
}

impl ManifestSource {
    #[must_use]
    pub fn new(dir: PathBuf, poll: Duration) -> Self {
        Self { dir, poll }
    }

    /// Watches the directory forever, writing the store on every change.
    pub async fn run(self, store: Store) -> anyhow::Result<()> {
        let mut last_fingerprint = None;
        let mut last_good = LastGood::default();
        loop {
            let fingerprint = fingerprint(&self.dir)?;
            if last_fingerprint.as_ref() != Some(&fingerprint) {
                let state = load(&self.dir, &mut last_good)?;
                tracing::info!(
                    dir = %self.dir.display(),
                    services = state.services.len(),
                    endpoint_slices = state.endpoint_slices.len(),
                    nodes = state.nodes.len(),
                    service_cidrs = state.service_cidrs.len(),
                    "manifests loaded"
                );
                store.update(|s| {
                    replace_all(&mut s.services, state.services);
                    replace_all(&mut s.endpoint_slices, state.endpoint_slices);
                    replace_all(&mut s.nodes, state.nodes);
                    replace_all(&mut s.service_cidrs, state.service_cidrs);
                    s.refused = state.refused;
                });
                store.mark_complete();
                last_fingerprint = Some(fingerprint);
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

fn manifest_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("reading manifest directory {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// Name, size and modification time of every manifest file.
fn fingerprint(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Option<FileStamp>)>> {
    Ok(manifest_files(dir)?
        .into_iter()
        .map(|p| {
            let stamp = stamp_of(&p).ok();
            (p, stamp)
        })
        .collect())
}

/// The file's parse: the cached one while the file is unchanged, else a fresh one.
fn read_file(file: &Path, cache: &mut BTreeMap<PathBuf, ParsedFile>) -> std::io::Result<ParsedFile> {
    let stamp = stamp_of(file)?;
    if let Some(cached) = cache.get(file).filter(|c| c.stamp == stamp) {
        return Ok(cached.clone());
    }
    let parsed = ParsedFile::parse(&std::fs::read_to_string(file)?, stamp);
    cache.insert(file.to_owned(), parsed.clone());
    Ok(parsed)
}

/// Reads every file, keeping the last good version of anything that does not parse or check.
fn load(dir: &Path, last_good: &mut LastGood) -> anyhow::Result<ClusterState> {
    let mut state = ClusterState::default();
    let mut good: BTreeMap<Identity, (PathBuf, Parsed)> = BTreeMap::new();
    let mut kept: Vec<Identity> = Vec::new();
    let files = manifest_files(dir)?;
    last_good.parsed_files.retain(|f, _| files.contains(f));
    for file in files {
        let parsed_file = match read_file(&file, &mut last_good.parsed_files) {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "cannot read manifest; keeping its objects as they were");
                kept.extend(last_good.objects.iter().filter(|(_, (f, _))| *f == file).map(|(id, _)| id.clone()));
                continue;
            }
        };
        for (index, document) in parsed_file.documents.into_iter().enumerate() {
            let objects = match document {
                Document::Objects(objects) => objects,
                Document::Invalid(e) => {
                    tracing::error!(file = %file.display(), document = index, error = %e,
                        "manifest is not valid YAML; keeping the objects it had as they were");
                    kept.extend(last_good.objects.iter().filter(|(_, (f, _))| *f == file).map(|(id, _)| id.clone()));
                    break;
                }
            };
            for object in objects {
                match object {
                    Ok(None) => {}
                    Ok(Some(parsed)) => {
                        let id = parsed.identity();
                        good.insert(id, (file.clone(), parsed.clone()));
                        parsed.insert_into(&mut state);
                    }
                    Err((id, reason)) => {
                        let keeping = id.as_ref().is_some_and(|id| last_good.objects.contains_key(id));
                        tracing::error!(
                            file = %file.display(),
                            document = index,
                            object = %id.as_ref().map_or_else(|| "?".to_owned(), |(k, n)| format!("{k} {n}")),
                            error = %reason,
                            "rejected manifest object; {}",
                            if keeping { "keeping its previous version" } else { "it is not programmed" }
                        );
                        state.refused.push(id.clone().unwrap_or(("Unknown", format!("{}#{index}", file.display()))));
                        if let Some(id) = id.filter(|_| keeping) {
                            kept.push(id);
                        }
                    }
                }
            }
        }
    }
    for id in kept {
        if good.contains_key(&id) {
            continue;
        }
        if let Some((file, parsed)) = last_good.objects.get(&id).cloned() {
            parsed.clone().insert_into(&mut state);
            good.insert(id, (file, parsed));
        }
    }
    last_good.objects = good;
    Ok(state)
}

/// A document, or the items of a `kind: List`.
fn items(value: Value) -> Vec<Value> {
    if value.get("kind").and_then(Value::as_str) == Some("List")
        && let Some(Value::Array(items)) = value.get("items")
    {
        return items.clone();
    }
    if value.is_null() { Vec::new() } else { vec![value] }
}

type ParseError = (Option<Identity>, String);

fn parse_object(value: Value) -> Result<Option<Parsed>, ParseError> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
    let namespace = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default");
    let namespaced = format!("{namespace}/{name}");
    match kind.as_str() {
        "Service" => {
            let id = Some(("Service", namespaced));
            let svc: Service = serde_json::from_value(value).map_err(|e| (id.clone(), e.to_string()))?;
            validate::service(&svc).map_err(|r| (id, format!("{}: {}", r.field, r.reason)))?;
            Ok(Some(Parsed::Service(ObjectKey::of(&svc.metadata), Arc::new(svc))))
        }
        "EndpointSlice" => {
            let id = Some(("EndpointSlice", namespaced));
            let slice: EndpointSlice = serde_json::from_value(value).map_err(|e| (id.clone(), e.to_string()))?;
            validate::endpoint_slice(&slice).map_err(|r| (id, format!("{}: {}", r.field, r.reason)))?;
            Ok(Some(Parsed::EndpointSlice(ObjectKey::of(&slice.metadata), Arc::new(slice))))
        }
        "Node" => {
            let id = Some(("Node", name.to_owned()));
            let node: Node = serde_json::from_value(value).map_err(|e| (id, e.to_string()))?;
            Ok(Some(Parsed::Node(node.metadata.name.clone().unwrap_or_default(), Arc::new(node))))
        }
        "ServiceCIDR" => {
            let id = Some(("ServiceCIDR", name.to_owned()));
            let cidr: ServiceCIDR = serde_json::from_value(value).map_err(|e| (id.clone(), e.to_string()))?;
            validate::service_cidr(&cidr).map_err(|r| (id, format!("{}: {}", r.field, r.reason)))?;
            Ok(Some(Parsed::ServiceCidr(cidr.metadata.name.clone().unwrap_or_default(), Arc::new(cidr))))
        }
        // Deployments, ConfigMaps and the like may sit in the same directory; they are not ours.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.32.0.5, ports: [{name: http, port: 80}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.200.1.10]}]\n";

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey { namespace: ns.into(), name: name.into() }
    }

    fn cluster_ip(state: &ClusterState, ns: &str, name: &str) -> String {
        state.services[&key(ns, name)].spec.as_ref().unwrap().cluster_ip.clone().unwrap()
    }

    #[test]
    fn reads_every_document_and_list_items_and_ignores_other_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}",
            SVC.replace("name: web", "name: api").replace("10.32.0.5", "10.32.0.6").replace('\n', "\n  ")
        );
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{SVC}---\n{SLICE}---\nkind: ConfigMap\nmetadata: {{name: x}}\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("b.yml"), list).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "kind: Service").unwrap();
        let state = load(dir.path(), &mut LastGood::default()).unwrap();
        assert_eq!(state.services.keys().cloned().collect::<Vec<_>>(), vec![key("shop", "api"), key("shop", "web")]);
        assert_eq!(state.endpoint_slices.keys().cloned().collect::<Vec<_>>(), vec![key("shop", "web-1")]);
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_version_and_other_objects_move_on() {
        let dir = tempfile::tempdir().unwrap();
        let other = SVC.replace("name: web", "name: db").replace("10.32.0.5", "10.32.0.7");
        std::fs::write(dir.path().join("web.yaml"), SVC).unwrap();
        std::fs::write(dir.path().join("db.yaml"), &other).unwrap();
        let mut last_good = LastGood::default();
        load(dir.path(), &mut last_good).unwrap();

        std::fs::write(dir.path().join("web.yaml"), SVC.replace("port: 80", "port: 70000")).unwrap();
        std::fs::write(dir.path().join("db.yaml"), other.replace("10.32.0.7", "10.32.0.8")).unwrap();
        let state = load(dir.path(), &mut last_good).unwrap();
        assert_eq!(cluster_ip(&state, "shop", "web"), "10.32.0.5", "the rejected edit must leave the old version");
        assert_eq!(cluster_ip(&state, "shop", "db"), "10.32.0.8", "a good edit elsewhere goes through");

        // Still kept on the next reload, and replaced once the file is fixed.
        let state = load(dir.path(), &mut last_good).unwrap();
        assert_eq!(cluster_ip(&state, "shop", "web"), "10.32.0.5");
        std::fs::write(dir.path().join("web.yaml"), SVC.replace("10.32.0.5", "10.32.0.9")).unwrap();
        let state = load(dir.path(), &mut last_good).unwrap();
        assert_eq!(cluster_ip(&state, "shop", "web"), "10.32.0.9");
    }

    #[test]
    fn a_new_object_that_is_bad_is_simply_not_there() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), SVC.replace("10.32.0.5", "not-an-ip")).unwrap();
        let state = load(dir.path(), &mut LastGood::default()).unwrap();
        assert!(state.services.is_empty());
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_all_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), format!("{SVC}---\n{SLICE}")).unwrap();
        let mut last_good = LastGood::default();
        load(dir.path(), &mut last_good).unwrap();
        std::fs::write(dir.path().join("web.yaml"), "kind: Service\nmetadata: {name: [unclosed\n").unwrap();
        let state = load(dir.path(), &mut last_good).unwrap();
        assert_eq!(state.services.len(), 1);
        assert_eq!(state.endpoint_slices.len(), 1);
    }

    #[test]
    fn removing_a_file_removes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), SVC).unwrap();
        let mut last_good = LastGood::default();
        load(dir.path(), &mut last_good).unwrap();
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        assert!(load(dir.path(), &mut last_good).unwrap().services.is_empty());
    }

    /// The examples in the repository must stay loadable and valid.
    #[test]
    fn the_shipped_examples_load_without_rejections() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
        let state = load(&dir, &mut LastGood::default()).unwrap();
        let d = crate::model::desired(&state, &crate::model::NodeIdentity::default());
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        assert_eq!(state.services.len(), 2);
        assert_eq!(d.table.frontends.len(), 3);
        assert!(d.table.frontends.values().all(|e| e.internal.endpoints.len() == 2));
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let err = load(Path::new("/nonexistent/manifests"), &mut LastGood::default()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/manifests"), "{err}");
    }
}
