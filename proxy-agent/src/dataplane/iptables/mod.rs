//! The iptables fallback dataplane (issue 6, in progress): kube-proxy's own chain layout and names, so
//! `iptables-save | grep KUBE` reads as users know it. So far: the chain naming, verified against names
//! kube-proxy produces.

pub mod naming;
