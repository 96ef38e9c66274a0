//! `/healthz` and `/livez`, as kube-proxy serves them (port 10256): healthy unless a change has waited for
//! a sync longer than the timeout — also before the first sync, as kube-proxy's are: an agent restarted
//! while the API server is away serves what its predecessor programmed (pinned maps, rules), and neither
//! restarting it nor draining the node would help. `/healthz` also reports 503 when the node is being
//! deleted, so load balancers drain it first; `/livez` does not, so the agent is not restarted for it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use k8s_openapi::jiff::Timestamp;

use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet programmed arrived.
    pending_since: Option<SystemTime>,
    node_eligible: bool,
}

pub struct ProxyHealth {
    progress: Mutex<Progress>,
    timeout: Duration,
}

impl ProxyHealth {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self { progress: Mutex::new(Progress { node_eligible: true, ..Progress::default() }), timeout }
    }

    /// A change arrived that the next sync must program.
    pub fn queued(&self, at: SystemTime) {
        let mut p = self.progress.lock().expect("health lock");
        p.pending_since.get_or_insert(at);
    }

    /// Everything up to now is programmed.
    pub fn updated(&self, at: SystemTime) {
        let mut p = self.progress.lock().expect("health lock");
        p.last_updated = Some(at);
        p.pending_since = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.progress.lock().expect("health lock").node_eligible = eligible;
    }

    /// Healthy unless a change has waited longer than the timeout.
    fn healthy(&self, now: SystemTime) -> (bool, Progress) {
        let p = *self.progress.lock().expect("health lock");
        let waiting_too_long =
            p.pending_since.is_some_and(|t| now.duration_since(t).unwrap_or_default() > self.timeout);
        (!waiting_too_long, p)
    }

    fn answer(&self, with_node: bool) -> (StatusCode, Json<serde_json::Value>) {
        let now = SystemTime::now();
        let (healthy, p) = self.healthy(now);
        let healthy = healthy && (!with_node || p.node_eligible);
        let stamp = |t: SystemTime| Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default();
        let mut body = serde_json::json!({
            "lastUpdated": p.last_updated.map(stamp).unwrap_or_default(),
            "currentTime": stamp(now),
        });
        if with_node {
            body["nodeEligible"] = serde_json::Value::Bool(p.node_eligible);
        }
        (if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
    }
}

/// How long a server whose port was taken waits before trying again (kube-proxy's 5 s).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds `bind` for server `name`. With `hard_fail` (kube-proxy's `bindAddressHardFail`) a failure stops
/// start-up; otherwise it is logged, the agent goes on serving traffic, and the bind is retried every 5 s
/// until the port is free, as kube-proxy does.
async fn bind_listener(
    name: &'static str,
    bind: SocketAddr,
    hard_fail: bool,
) -> anyhow::Result<impl Future<Output = tokio::net::TcpListener>> {
    let first = super::listen(bind).await;
    if hard_fail {
        first.as_ref().map_err(|e| anyhow::anyhow!("{name} on {bind}: {e}"))?;
    }
    Ok(async move {
        let mut attempt = first;
        loop {
            match attempt {
                Ok(listener) => return listener,
                Err(e) => {
                    tracing::error!(server = name, %bind, error = %e, "cannot bind; retrying in 5 s");
                    tokio::time::sleep(BIND_RETRY).await;
                    attempt = super::listen(bind).await;
                }
            }
        }
    })
}

/// Serves `/healthz` and `/livez` on `bind`.
pub async fn serve_health(
    bind: SocketAddr,
    hard_fail: bool,
    health: Arc<ProxyHealth>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind_listener("healthz", bind, hard_fail).await?;
    let app = Router::new()
        .route("/healthz", get(|State(h): State<Arc<ProxyHealth>>| async move { h.answer(true) }))
        .route("/livez", get(|State(h): State<Arc<ProxyHealth>>| async move { h.answer(false) }))
        .with_state(health);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener.await, app).await {
            tracing::error!(error = %e, "healthz server failed");
        }
    }))
}

/// Serves Prometheus metrics at `/metrics` on `bind`.
pub async fn serve_metrics(
    bind: SocketAddr,
    hard_fail: bool,
    metrics: Arc<Metrics>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind_listener("metrics", bind, hard_fail).await?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], m.encode())
            }),
        )
        .with_state(metrics);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener.await, app).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_until_a_change_waits_too_long() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(h.healthy(t0).0, "healthy with nothing to do, as kube-proxy is (the API may be away)");
        h.queued(t0);
        assert!(!h.healthy(t0 + Duration::from_secs(61)).0, "the first view waiting 61 s for its sync is not");
        h.updated(t0);
        assert!(h.healthy(t0).0);
        h.queued(t0 + Duration::from_secs(10));
        assert!(h.healthy(t0 + Duration::from_secs(30)).0, "a fresh change is fine");
        assert!(!h.healthy(t0 + Duration::from_secs(100)).0, "a change waiting 90 s is not");
        h.updated(t0 + Duration::from_secs(101));
        assert!(h.healthy(t0 + Duration::from_secs(102)).0);
    }
}
