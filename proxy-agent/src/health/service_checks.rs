//! healthCheckNodePort servers: one listener per Service with externalTrafficPolicy Local, answering as
//! kube-proxy does so cloud load balancers send traffic only to nodes with local endpoints.
//!
//! Any path: `200` with `{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": true}`
//! when the node has a local endpoint, `503` with the same body when it has none.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::model::HealthCheck;

type Shared = Arc<RwLock<HealthCheck>>;

struct Server {
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

/// The running health-check servers, by port.
#[derive(Default)]
pub struct ServiceHealthServers {
    servers: BTreeMap<u16, Server>,
    bind: Option<Ipv4Addr>,
}

impl ServiceHealthServers {
    /// Servers listen on `bind` (all addresses when `None`).
    #[must_use]
    pub fn new(bind: Option<Ipv4Addr>) -> Self {
        Self { servers: BTreeMap::new(), bind }
    }

    /// Starts, updates and stops servers so that exactly `checks` are served.
    pub async fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, server| {
            let keep = checks.contains_key(port);
            if !keep {
                server.task.abort();
                tracing::info!(port, "stopped health check server");
            }
            keep
        });
        for (&port, check) in checks {
            if let Some(server) = self.servers.get(&port) {
                *server.state.write().expect("health state lock") = check.clone();
                continue;
            }
            let addr = SocketAddr::from((self.bind.unwrap_or(Ipv4Addr::UNSPECIFIED), port));
            let listener = match super::listen(addr).await {
                Ok(l) => l,
                Err(e) => {
                    // kube-proxy logs and goes on; the next sync tries again.
                    tracing::error!(service = %check.service, port, error = %e, "cannot listen for healthCheckNodePort");
                    continue;
                }
            };
            let state: Shared = Arc::new(RwLock::new(check.clone()));
            let app = Router::new().fallback(answer).with_state(state.clone());
            let service = check.service.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(%service, port, error = %e, "health check server failed");
                }
            });
            tracing::info!(service = %check.service, port, "serving healthCheckNodePort");
            self.servers.insert(port, Server { state, task });
        }
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

async fn answer(State(state): State<Shared>) -> Response {
    let check = state.read().expect("health state lock").clone();
    let (namespace, name) = check.service.split_once('/').unwrap_or(("", &check.service));
    let body = serde_json::json!({
        "service": { "namespace": namespace, "name": name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if check.local_endpoints > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert("X-Load-Balancing-Endpoint-Weight", HeaderValue::from(check.local_endpoints));
    response
}
