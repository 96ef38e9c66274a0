//! The model: a pure function from the cluster state and this node's identity to the desired service table.
//!
//! No I/O happens here, so everything in this module is tested without a cluster or a kernel.

mod build;
mod table;
pub mod validate;

pub use build::desired;
pub use table::{Endpoint, Frontend, FrontendEntry, Protocol, ServicePortName, ServiceTable};
pub use validate::Rejection;

/// Who "this node" is; the model needs it for node-local policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
}

#[cfg(test)]
mod tests;
