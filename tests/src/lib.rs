//! A Kubernetes-like cluster made of network namespaces, for the integration tests, the demo and the
//! benchmarks.
//!
//! "Kubernetes The Hard Way" addressing: nodes on 10.240.0.0/24, pods on 10.200.N.0/24, Services on
//! 10.32.0.0/24. Everything lives in namespaces the lab creates; nothing is added to the root namespace,
//! and [`Lab`]'s `Drop` removes every namespace, process and mount it made, on success, failure or panic.

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod bpf;
pub mod build;
pub mod bulk;
pub mod cmd;
pub mod daemon;
pub mod echo;
pub mod echo6;
pub mod flow_capacity;
pub mod fuzz;
pub mod image;
pub mod lab;
pub mod leaks;
pub mod manifests;
pub mod netns;
pub mod rawtcp;
pub mod snmp;
pub mod traffic;

pub use lab::{Lab, LabSpec, PodRef};
