//! The Kubernetes source against an in-process API server that speaks the list/watch protocol: list then
//! watch, bookmarks, a dropped watch connection, `410 Gone` followed by a relist, and a kind whose list is
//! slow. The real kube-rs client and watcher run unchanged; only the server is ours.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    response::Response,
};
use serde_json::{Value, json};

use super::*;
use crate::store::Snapshot;

/// What one watch request gets.
enum Watch {
    /// These events, then the connection closes (as an API server or a proxy may do at any time).
    Events(Vec<Value>),
    /// `410 Gone`: the resource version is too old; the client must list again.
    Gone,
    /// Nothing, and the connection stays open.
    Hang,
}

#[derive(Default)]
struct Kind {
    /// One answer per list request; the last one repeats.
    lists: VecDeque<Vec<Value>>,
    watches: VecDeque<Watch>,
    list_delay: Duration,
}

/// The server's script per kind, and every request it was sent (method, path, whether a watch).
#[derive(Default)]
struct ServerState {
    kinds: HashMap<&'static str, Kind>,
    requests: Vec<(axum::http::Method, String, bool)>,
}

type Server = Arc<Mutex<ServerState>>;

fn service(name: &str, rv: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string()},
           "spec": {"clusterIP": format!("10.32.0.{rv}"), "ports": [{"name": "http", "port": 80}]}})
}

fn slice(name: &str, svc: &str, rv: u32) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string(),
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": [{"addresses": [format!("10.200.1.{rv}")]}]})
}

fn node(rv: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", "resourceVersion": rv.to_string()}})
}

fn event(kind: &str, object: &Value) -> Value {
    json!({"type": kind, "object": object})
}

fn bookmark(api_version: &str, kind: &str, rv: u32) -> Value {
    event(
        "BOOKMARK",
        &json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}}),
    )
}

async fn handle(
    State(server): State<Server>,
    Query(query): Query<HashMap<String, String>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let path = uri.path();
    let watch = query.get("watch").map(String::as_str) == Some("true");
    server.lock().unwrap().requests.push((method, path.to_owned(), watch));
    let kind = if path.ends_with("/services") {
        "services"
    } else if path.ends_with("/endpointslices") {
        "endpointslices"
    } else if path.ends_with("/servicecidrs") {
        "servicecidrs"
    } else {
        "nodes"
    };
    // A kind the test gave no objects is one this API server does not serve (ServiceCIDRs before 1.33).
    if !server.lock().unwrap().kinds.contains_key(kind) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                            "message": "the server could not find the requested resource", "code": 404});
        return Response::builder()
            .status(404)
            .header("content-type", "application/json")
            .body(Body::from(status.to_string()))
            .unwrap();
    }
    if watch {
        let action =
            server.lock().unwrap().kinds.get_mut(kind).and_then(|k| k.watches.pop_front()).unwrap_or(Watch::Hang);
        let body = match action {
            Watch::Events(events) => Body::from(events.iter().map(|e| e.to_string() + "\n").collect::<String>()),
            Watch::Gone => Body::from(format!(
                "{}\n",
                event(
                    "ERROR",
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "message": "too old resource version", "reason": "Expired", "code": 410})
                )
            )),
            Watch::Hang => Body::from_stream(futures::stream::pending::<Result<String, std::io::Error>>()),
        };
        return Response::builder().header("content-type", "application/json").body(body).unwrap();
    }
    let (items, delay) = {
        let mut guard = server.lock().unwrap();
        let k = guard.kinds.get_mut(kind).unwrap();
        let items = if k.lists.len() > 1 { k.lists.pop_front().unwrap() } else { k.lists[0].clone() };
        (items, k.list_delay)
    };
    tokio::time::sleep(delay).await;
    let rv =
        items.iter().filter_map(|i| i["metadata"]["resourceVersion"].as_str()?.parse::<u32>().ok()).max().unwrap_or(1);
    let list_kind = match kind {
        "services" => "ServiceList",
        "endpointslices" => "EndpointSliceList",
        "servicecidrs" => "ServiceCIDRList",
        _ => "NodeList",
    };
    let body =
        json!({"kind": list_kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items});
    Response::builder().header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

async fn start(server: Server) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(handle).with_state(server);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client(addr: SocketAddr) -> Client {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    Client::try_from(config).unwrap()
}

fn service_names(s: &Snapshot) -> BTreeSet<String> {
    s.state.services.keys().map(|k| k.name.to_string()).collect()
}

/// Waits (bounded) until the store satisfies `done`.
async fn wait_for(rx: &mut tokio::sync::watch::Receiver<Snapshot>, what: &str, done: impl Fn(&Snapshot) -> bool) {
    let reached = matches!(tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| done(s))).await, Ok(Ok(_)));
    assert!(reached, "timed out waiting for {what}; store: {:?}", service_names(&rx.borrow()));
}

#[tokio::test]
async fn list_watch_bookmarks_drops_and_410_gone_end_in_the_servers_state() {
    let server: Server = Arc::default();
    {
        let mut s = server.lock().unwrap();
        s.kinds.insert(
            "services",
            Kind {
                // First list, then the relist after 410 Gone (b was deleted and c created meanwhile).
                lists: VecDeque::from([vec![service("a", 10)], vec![service("a", 10), service("c", 14)]]),
                watches: VecDeque::from([
                    Watch::Events(vec![event("ADDED", &service("b", 11)), bookmark("v1", "Service", 12)]),
                    Watch::Gone,
                    Watch::Hang,
                ]),
                ..Kind::default()
            },
        );
        s.kinds.insert(
            "endpointslices",
            Kind {
                lists: VecDeque::from([vec![slice("a-1", "a", 20)]]),
                watches: VecDeque::from([Watch::Events(vec![event("MODIFIED", &slice("a-1", "a", 21))]), Watch::Hang]),
                ..Kind::default()
            },
        );
        s.kinds.insert(
            "nodes",
            Kind {
                lists: VecDeque::from([vec![node(30)]]),
                watches: VecDeque::from([Watch::Hang]),
                // The Node list is slow: nothing may be programmed before it arrives.
                list_delay: Duration::from_millis(500),
            },
        );
    }
    let addr = start(server.clone()).await;
    let (store, mut rx) = Store::new();
    let source = tokio::spawn(run(client(addr), "node1".into(), store));

    // Services and slices are listed long before the Node: the view is not complete until it is.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!rx.borrow().complete, "complete before every kind was listed");
    wait_for(&mut rx, "the first complete view", |s| s.complete).await;
    assert_eq!(rx.borrow().state.nodes.len(), 1);

    // The watch added b; then the connection dropped, the next watch got 410 Gone, and the relist shows
    // that b is gone and c exists.
    wait_for(&mut rx, "the relist after 410 Gone", |s| {
        service_names(s) == BTreeSet::from(["a".to_owned(), "c".to_owned()])
    })
    .await;
    wait_for(&mut rx, "the slice update", |s| {
        s.state.endpoint_slices.values().any(|e| e.metadata.resource_version.as_deref() == Some("21"))
    })
    .await;
    source.abort();
}

/// The same objects give the same desired table, whether they come from the API server or from manifests.
#[tokio::test]
async fn the_api_and_the_manifest_source_give_identical_tables() {
    let cidr = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                      "metadata": {"name": "kubernetes", "resourceVersion": "40"},
                      "spec": {"cidrs": ["10.32.0.0/16", "fd00:10:96::/112"]}});
    let objects = [service("a", 10), service("c", 14), slice("a-1", "a", 20), slice("c-1", "c", 21), node(30), cidr];
    let server: Server = Arc::default();
    {
        let mut s = server.lock().unwrap();
        s.kinds.insert(
            "services",
            Kind { lists: VecDeque::from([vec![objects[0].clone(), objects[1].clone()]]), ..Kind::default() },
        );
        s.kinds.insert(
            "endpointslices",
            Kind { lists: VecDeque::from([vec![objects[2].clone(), objects[3].clone()]]), ..Kind::default() },
        );
        s.kinds.insert("nodes", Kind { lists: VecDeque::from([vec![objects[4].clone()]]), ..Kind::default() });
        s.kinds.insert("servicecidrs", Kind { lists: VecDeque::from([vec![objects[5].clone()]]), ..Kind::default() });
    }
    let addr = start(server).await;
    let (store, mut rx) = Store::new();
    let source = tokio::spawn(run(client(addr), "node1".into(), store));
    wait_for(&mut rx, "the API view", |s| s.complete && !s.state.service_cidrs.is_empty()).await;
    let from_api = rx.borrow().state.clone();
    source.abort();

    let dir = tempfile::tempdir().unwrap();
    let yaml: Vec<String> = objects.iter().map(|o| serde_saphyr::to_string(o).unwrap()).collect();
    std::fs::write(dir.path().join("all.yaml"), yaml.join("---\n")).unwrap();
    let (store, mut rx) = Store::new();
    let manifests = tokio::spawn(
        crate::source::manifests::ManifestSource::new(dir.path().into(), Duration::from_millis(50)).run(store),
    );
    wait_for(&mut rx, "the manifest view", |s| s.complete).await;
    let from_files = rx.borrow().state.clone();
    manifests.abort();

    let node = crate::model::NodeIdentity { name: "node1".into(), ..Default::default() };
    let (api_table, file_table) = (crate::model::desired(&from_api, &node), crate::model::desired(&from_files, &node));
    assert_eq!(api_table.table.frontends.len(), 2);
    let v6: std::net::IpAddr = "fd00:10:96::".parse().unwrap();
    assert_eq!(api_table.table.service_cidrs, vec![(std::net::Ipv4Addr::new(10, 32, 0, 0).into(), 16), (v6, 112)]);
    assert_eq!(api_table, file_table);
}

/// The ClusterRole in deploy/ grants exactly the API calls the real watchers make: every request the agent
/// sent to the server is mapped to (API group, resource, verb) and compared with the role's rules, both
/// ways, so a watcher added without its permission, or a permission nothing uses, fails here.
#[tokio::test]
async fn the_deployed_cluster_role_grants_exactly_what_the_watchers_call() {
    use k8s_openapi::api::rbac::v1::ClusterRole;

    let server: Server = Arc::default();
    {
        let mut s = server.lock().unwrap();
        s.kinds.insert("services", Kind { lists: VecDeque::from([vec![service("a", 10)]]), ..Kind::default() });
        s.kinds
            .insert("endpointslices", Kind { lists: VecDeque::from([vec![slice("a-1", "a", 20)]]), ..Kind::default() });
        s.kinds.insert("nodes", Kind { lists: VecDeque::from([vec![node(30)]]), ..Kind::default() });
        let cidr = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                          "metadata": {"name": "kubernetes", "resourceVersion": "40"},
                          "spec": {"cidrs": ["10.32.0.0/16"]}});
        s.kinds.insert("servicecidrs", Kind { lists: VecDeque::from([vec![cidr]]), ..Kind::default() });
    }
    let addr = start(server.clone()).await;
    let (store, mut rx) = Store::new();
    let source = tokio::spawn(run(client(addr), "node1".into(), store));
    wait_for(&mut rx, "the first complete view", |s| s.complete).await;
    wait_for(&mut rx, "the ServiceCIDR", |s| s.state.service_cidrs.contains_key("kubernetes")).await;
    // Bounded: each watcher starts its watch right after its list.
    for _ in 0..100 {
        if server.lock().unwrap().requests.iter().filter(|r| r.2).count() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    source.abort();

    let mut called = BTreeSet::new();
    for (method, path, watch) in &server.lock().unwrap().requests {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => (String::new(), rest),
            ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
            _ => panic!("unexpected request {method} {path}"),
        };
        // `namespaces/NS/RESOURCE[/NAME]` or `RESOURCE[/NAME]`.
        let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 { &rest[2..] } else { rest };
        let verb = match (method.as_str(), rest.len(), *watch) {
            ("GET", _, true) => "watch",
            ("GET", 1, false) => "list",
            ("GET", _, false) => "get",
            ("POST", _, _) => "create",
            ("PUT", _, _) => "update",
            ("PATCH", _, _) => "patch",
            ("DELETE", _, _) => "delete",
            _ => panic!("unexpected request {method} {path}"),
        };
        called.insert((group, rest[0].to_owned(), verb.to_owned()));
    }

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/clusterrole.yaml");
    let role: ClusterRole = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    assert_eq!(called.len(), 8, "list and watch on four kinds: {called:?}");
    assert_eq!(granted, called, "deploy/base/clusterrole.yaml must grant exactly the calls made");
}
