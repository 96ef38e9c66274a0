//! HTTP health endpoints with kube-proxy's semantics.

pub mod service_checks;
