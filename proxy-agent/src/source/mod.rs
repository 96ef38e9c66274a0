//! Sources of cluster state. Each writes the same [`Store`](crate::store::Store); nothing downstream knows
//! which one is in use.

pub mod kubernetes;
pub mod manifests;
