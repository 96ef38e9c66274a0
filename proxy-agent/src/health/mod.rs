//! HTTP health endpoints with kube-proxy's semantics.

pub mod proxy;
pub mod service_checks;
