//! Builds the desired service table from checked objects.

use std::collections::BTreeMap;

use super::{
    Endpoint, Frontend, FrontendEntry, NodeIdentity, ServicePortName, ServiceTable,
    validate::{self, CheckedServicePort, CheckedSlice, Rejection},
};
use crate::store::ClusterState;

/// The model's answer: the table to program, and the objects that were left out and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub table: ServiceTable,
    pub rejected: Vec<Rejection>,
}

/// Computes this node's desired service table. Pure: same input, same output.
#[must_use]
pub fn desired(state: &ClusterState, _node: &NodeIdentity) -> Desired {
    let mut rejected = Vec::new();

    let mut slices_by_service: BTreeMap<(String, String), Vec<CheckedSlice>> = BTreeMap::new();
    for slice in state.endpoint_slices.values() {
        match validate::endpoint_slice(slice) {
            Ok(Some(checked)) => slices_by_service
                .entry((checked.namespace.clone(), checked.service_name.clone()))
                .or_default()
                .push(checked),
            Ok(None) => {}
            Err(rejection) => rejected.push(rejection),
        }
    }

    let mut table = ServiceTable::default();
    for svc in state.services.values() {
        let checked = match validate::service(svc) {
            Ok(checked) => checked,
            Err(rejection) => {
                rejected.push(rejection);
                continue;
            }
        };
        let slices =
            slices_by_service.get(&(checked.namespace.clone(), checked.name.clone())).map_or(&[][..], Vec::as_slice);
        for (i, port) in checked.ports.iter().enumerate() {
            let entry = FrontendEntry {
                service: ServicePortName {
                    namespace: checked.namespace.clone(),
                    name: checked.name.clone(),
                    port: port.name.clone(),
                },
                backends: backends_of(port, slices),
            };
            for addr in &checked.cluster_ips {
                let frontend = Frontend { addr: *addr, port: port.port, protocol: port.protocol };
                if let Some(owner) = table.frontends.get(&frontend) {
                    rejected.push(Rejection {
                        kind: "Service",
                        object: format!("{}/{}", checked.namespace, checked.name),
                        field: format!("spec.ports[{i}]"),
                        reason: format!("{frontend} is already used by {}", owner.service),
                    });
                    continue;
                }
                table.frontends.insert(frontend, entry.clone());
            }
        }
    }
    Desired { table, rejected }
}

/// The endpoints new flows to one Service port may use, following kube-proxy: ready endpoints; if none is
/// ready, those that are serving while terminating; never a non-serving one. The EndpointSlice port whose
/// name and protocol match the Service port carries the resolved target port.
fn backends_of(port: &CheckedServicePort, slices: &[CheckedSlice]) -> Vec<Endpoint> {
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
    for slice in slices {
        let Some(slice_port) = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol) else {
            continue;
        };
        for ep in &slice.endpoints {
            let bucket = if ep.ready {
                &mut ready
            } else if ep.serving && ep.terminating {
                &mut terminating
            } else {
                continue;
            };
            bucket.extend(ep.addresses.iter().map(|addr| Endpoint { addr: *addr, port: slice_port.port }));
        }
    }
    let mut chosen = if ready.is_empty() { terminating } else { ready };
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}
