//! The model computed from scratch: the specification the agent's [`IncrementalModel`](super::IncrementalModel)
//! is held to, and the easiest form to test kube-proxy's rules on.

use std::collections::BTreeMap;

use super::{
    HealthCheck, NodeIdentity, ServiceTable,
    build::{NodeContext, conflict, service_output},
    validate::{self, CheckedSlice, Rejection},
};
use crate::store::{ClusterState, ObjectKey};

/// The model's answer: the table to program, the health checks to serve, and what was left out and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub table: ServiceTable,
    /// healthCheckNodePort → what it reports (Services with externalTrafficPolicy Local).
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub rejected: Vec<Rejection>,
}

/// Computes this node's desired service table from scratch. Pure: same input, same output. This is the
/// specification: the agent runs [`IncrementalModel`](super::IncrementalModel), which the tests hold to
/// giving the same answer after every change.
#[must_use]
pub fn desired(state: &ClusterState, node: &NodeIdentity) -> Desired {
    let mut out = Desired::default();
    let context = NodeContext::of(state, node);
    let (cidrs, rejected) = super::service_cidrs(state, node);
    out.table.service_cidrs = cidrs;
    out.rejected.extend(rejected);

    let mut slices_by_service: BTreeMap<ObjectKey, Vec<CheckedSlice>> = BTreeMap::new();
    for slice in state.endpoint_slices.values() {
        match validate::endpoint_slice(slice) {
            Ok(Some(checked)) => slices_by_service.entry(checked.service_key()).or_default().push(checked),
            Ok(None) => {}
            Err(rejection) => out.rejected.push(rejection),
        }
    }

    for (key, svc) in &state.services {
        let checked = match validate::service(svc) {
            Ok(checked) => checked,
            Err(rejection) => {
                out.rejected.push(rejection);
                continue;
            }
        };
        let slices: Vec<&CheckedSlice> = slices_by_service.get(key).map(|s| s.iter().collect()).unwrap_or_default();
        let output = service_output(&checked, &slices, &context);
        out.rejected.extend(output.rejected);
        for claim in output.claims {
            if let Some(owner) = out.table.frontends.get(&claim.frontend) {
                out.rejected.push(conflict(key, &claim, &owner.service));
                continue;
            }
            out.table.frontends.insert(claim.frontend, claim.entry);
        }
        if let Some((port, check)) = output.health_check {
            out.health_checks.insert(port, check);
        }
    }
    out
}
