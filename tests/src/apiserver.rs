//! A stand-in Kubernetes API server for outage tests. It lists the lab's manifests (Services,
//! EndpointSlices, Nodes) as the API does and holds watches open without events, inside a node's network
//! namespace on loopback. Stopping it drops every connection and refuses new ones — what an agent's kube-rs
//! client sees in a real outage — and starting it again serves whatever the manifests say by then: the
//! client's relist picks up the changes made meanwhile.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use axum::{Router, body::Body, extract::Query, response::Response};
use serde_json::{Value, json};

pub struct ApiServer {
    ns: String,
    port: u16,
    manifests: PathBuf,
    /// Grows with every list, as resource versions do.
    version: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// The objects of `kind` (`Service`, `EndpointSlice`, `Node`) in every manifest file of `dir`.
fn objects(dir: &Path, kind: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let Ok(values) = serde_saphyr::from_multiple::<Value>(&text) else { continue };
        for value in values {
            if value["kind"] == kind {
                out.push(value);
            }
        }
    }
    out
}

fn handle(manifests: &Path, version: &AtomicU64, query: &HashMap<String, String>, uri: &axum::http::Uri) -> Response {
    let path = uri.path();
    let (kind, list_kind) = if path.ends_with("/services") {
        ("Service", "ServiceList")
    } else if path.ends_with("/endpointslices") {
        ("EndpointSlice", "EndpointSliceList")
    } else if path.ends_with("/servicecidrs") {
        ("ServiceCIDR", "ServiceCIDRList")
    } else {
        ("Node", "NodeList")
    };
    if query.get("watch").map(String::as_str) == Some("true") {
        let body = Body::from_stream(futures::stream::pending::<Result<String, std::io::Error>>());
        return Response::builder().header("content-type", "application/json").body(body).expect("response");
    }
    let rv = version.fetch_add(1, Ordering::Relaxed).to_string();
    let items: Vec<Value> = objects(manifests, kind)
        .into_iter()
        .map(|mut o| {
            o["metadata"]["resourceVersion"] = Value::String(rv.clone());
            if o["metadata"]["namespace"].is_null() && kind != "Node" && kind != "ServiceCIDR" {
                o["metadata"]["namespace"] = Value::String("default".into());
            }
            o
        })
        .collect();
    let body = json!({"kind": list_kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items});
    Response::builder().header("content-type", "application/json").body(Body::from(body.to_string())).expect("response")
}

impl ApiServer {
    /// Serves `manifests` on 127.0.0.1:`port` in namespace `ns`.
    pub fn start(ns: &str, port: u16, manifests: &Path) -> anyhow::Result<Self> {
        let mut server = Self {
            ns: ns.to_owned(),
            port,
            manifests: manifests.to_owned(),
            version: Arc::new(AtomicU64::new(1)),
            runtime: None,
        };
        server.resume()?;
        Ok(server)
    }

    /// The address clients in the namespace use.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)))
    }

    /// A kubeconfig naming this server, without credentials.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: lab\nclusters: [{{name: lab, cluster: {{server: '{}'}}}}]\nusers: [{{name: lab, user: {{}}}}]\ncontexts: [{{name: lab, context: {{cluster: lab, user: lab}}}}]\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The outage: every connection dropped, new ones refused.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Back, on the same address.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.stop();
        let port = self.port;
        let listener = crate::netns::in_netns(&self.ns, move || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
            socket.listen(128)?;
            socket.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpListener::from(socket))
        })??;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let (manifests, version) = (Arc::new(self.manifests.clone()), self.version.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            let app = Router::new().fallback(move |Query(q): Query<HashMap<String, String>>, uri: axum::http::Uri| {
                let (manifests, version) = (manifests.clone(), version.clone());
                async move { handle(&manifests, &version, &q, &uri) }
            });
            let _ = axum::serve(listener, app).await;
        });
        self.runtime = Some(runtime);
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
