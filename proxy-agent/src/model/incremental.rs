//! The model, kept up to date change by change.
//!
//! [`desired`](super::desired) recomputes every Service from scratch; at 100k Services that is far too slow
//! to run for each endpoint that moves. [`IncrementalModel`] gives the same answer but only recomputes the
//! Services whose object, slices or node context changed since the last update, found by diffing two
//! versions of the (structure-sharing) cluster state, and reports which frontends changed so the dataplane
//! can write only those. Its output is checked against `desired` by the tests, change sequence by change
//! sequence.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use imbl::ordmap::DiffItem;

use super::{
    Frontend, FrontendEntry, HealthCheck, NodeIdentity, Protocol, Rejection, ServiceTable,
    build::{self, Claim, NodeContext, ServiceOutput},
    validate::{self, CheckedSlice},
};
use crate::store::{ClusterState, ObjectKey};

/// Where a claim sits in the order that decides conflicts: Service, port, position within the port.
type ClaimOrder = (ObjectKey, usize, usize);

type BackendKey = (Ipv4Addr, u16, Protocol);

/// What one Service contributes now.
enum ServiceState {
    Rejected(Rejection),
    Checked(ServiceOutput),
}

/// What one EndpointSlice is to the model now.
enum SliceState {
    /// Belongs to this Service.
    Of(ObjectKey),
    Rejected(Rejection),
    /// Not ours (another address type).
    Ignored,
}

pub struct IncrementalModel {
    node: NodeIdentity,
    context: NodeContext,
    /// The state the outputs below reflect.
    state: Arc<ClusterState>,
    slices: HashMap<ObjectKey, SliceState>,
    slices_by_service: HashMap<ObjectKey, BTreeMap<ObjectKey, CheckedSlice>>,
    services: HashMap<ObjectKey, ServiceState>,
    /// Who claims each frontend, in conflict order: the first one is programmed. The claims themselves
    /// live in `services`.
    claims: HashMap<Frontend, BTreeSet<ClaimOrder>>,
    /// Every Service serving each healthCheckNodePort: the last one answers, as in `desired`.
    health_claims: BTreeMap<u16, BTreeMap<ObjectKey, HealthCheck>>,
    table: ServiceTable,
    health_checks: BTreeMap<u16, HealthCheck>,
    /// How many programmed frontends use each backend.
    backend_refs: HashMap<BackendKey, usize>,
}

impl IncrementalModel {
    #[must_use]
    pub fn new(node: NodeIdentity) -> Self {
        Self {
            node,
            context: NodeContext::default(),
            state: Arc::default(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            services: HashMap::new(),
            claims: HashMap::new(),
            health_claims: BTreeMap::new(),
            table: ServiceTable::default(),
            health_checks: BTreeMap::new(),
            backend_refs: HashMap::new(),
        }
    }

    /// Brings the model to `state` and returns the frontends whose entry changed, appeared or went away.
    pub fn update(&mut self, state: &Arc<ClusterState>) -> BTreeSet<Frontend> {
        let context = NodeContext::of(state, &self.node);
        let mut changed = BTreeSet::new();
        if context != self.context {
            // Zone or NodePort addresses moved: every Service's entries may differ. Start over; the old
            // table's frontends are all reported, so those that disappear are removed.
            changed.extend(self.table.frontends.keys().copied());
            *self = Self { context, ..Self::new(self.node.clone()) };
        }
        let previous = Arc::clone(&self.state);
        let mut dirty: BTreeSet<ObjectKey> = BTreeSet::new();
        for item in previous.endpoint_slices.diff(&state.endpoint_slices) {
            let (key, new) = match item {
                DiffItem::Add(key, new) | DiffItem::Update { new: (key, new), .. } => (key, Some(new)),
                DiffItem::Remove(key, _) => (key, None),
            };
            self.forget_slice(key, &mut dirty);
            if let Some(slice) = new {
                self.learn_slice(key, slice, &mut dirty);
            }
        }
        for item in previous.services.diff(&state.services) {
            let key = match item {
                DiffItem::Add(key, _) | DiffItem::Update { new: (key, _), .. } | DiffItem::Remove(key, _) => key,
            };
            dirty.insert(key.clone());
        }
        let mut touched_frontends = BTreeSet::new();
        let mut touched_ports = BTreeSet::new();
        for key in &dirty {
            self.withdraw(key, &mut touched_frontends, &mut touched_ports);
            if let Some(svc) = state.services.get(key) {
                self.contribute(key, svc, &mut touched_frontends, &mut touched_ports);
            }
        }
        for frontend in touched_frontends {
            if self.settle_frontend(frontend) {
                changed.insert(frontend);
            }
        }
        for port in touched_ports {
            match self.health_claims.get(&port).and_then(|c| c.values().next_back()) {
                Some(check) => drop(self.health_checks.insert(port, check.clone())),
                None => drop(self.health_checks.remove(&port)),
            }
        }
        self.state = Arc::clone(state);
        changed
    }

    #[must_use]
    pub fn table(&self) -> &ServiceTable {
        &self.table
    }

    #[must_use]
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
    }

    /// How many distinct backends (address, port, protocol) the table uses.
    #[must_use]
    pub fn distinct_backends(&self) -> usize {
        self.backend_refs.len()
    }

    /// Everything left out and why: rejected objects, unprogrammable ports, and claims that lost a conflict.
    #[must_use]
    pub fn rejected(&self) -> Vec<Rejection> {
        let mut out: Vec<Rejection> = self
            .slices
            .values()
            .filter_map(|s| match s {
                SliceState::Rejected(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        for state in self.services.values() {
            match state {
                ServiceState::Rejected(r) => out.push(r.clone()),
                ServiceState::Checked(output) => out.extend(output.rejected.iter().cloned()),
            }
        }
        for claims in self.claims.values().filter(|c| c.len() > 1) {
            let mut in_order = claims.iter().filter_map(|order| Some((order, self.claim(order)?)));
            let Some((_, winner)) = in_order.next() else { continue };
            out.extend(in_order.map(|((service, ..), claim)| build::conflict(service, claim, &winner.entry.service)));
        }
        out.sort();
        out
    }

    fn forget_slice(&mut self, key: &ObjectKey, dirty: &mut BTreeSet<ObjectKey>) {
        if let Some(SliceState::Of(service)) = self.slices.remove(key) {
            if let Some(slices) = self.slices_by_service.get_mut(&service) {
                slices.remove(key);
                if slices.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            dirty.insert(service);
        }
    }

    fn learn_slice(
        &mut self,
        key: &ObjectKey,
        slice: &k8s_openapi::api::discovery::v1::EndpointSlice,
        dirty: &mut BTreeSet<ObjectKey>,
    ) {
        let state = match validate::endpoint_slice(slice) {
            Ok(Some(checked)) => {
                let service = checked.service_key();
                self.slices_by_service.entry(service.clone()).or_default().insert(key.clone(), checked);
                dirty.insert(service.clone());
                SliceState::Of(service)
            }
            Ok(None) => SliceState::Ignored,
            Err(rejection) => SliceState::Rejected(rejection),
        };
        self.slices.insert(key.clone(), state);
    }

    /// Takes back everything a Service contributed.
    fn withdraw(&mut self, key: &ObjectKey, frontends: &mut BTreeSet<Frontend>, ports: &mut BTreeSet<u16>) {
        let Some(ServiceState::Checked(output)) = self.services.remove(key) else { return };
        for (position, claim) in output.claims.iter().enumerate() {
            if let Some(claims) = self.claims.get_mut(&claim.frontend) {
                claims.remove(&(key.clone(), claim.port_index, position));
                if claims.is_empty() {
                    self.claims.remove(&claim.frontend);
                }
            }
            frontends.insert(claim.frontend);
        }
        if let Some((port, _)) = output.health_check {
            if let Some(claims) = self.health_claims.get_mut(&port) {
                claims.remove(key);
                if claims.is_empty() {
                    self.health_claims.remove(&port);
                }
            }
            ports.insert(port);
        }
    }

    /// Computes a Service's contribution from its object, its slices and the node, and records it.
    fn contribute(
        &mut self,
        key: &ObjectKey,
        svc: &k8s_openapi::api::core::v1::Service,
        frontends: &mut BTreeSet<Frontend>,
        ports: &mut BTreeSet<u16>,
    ) {
        let checked = match validate::service(svc) {
            Ok(checked) => checked,
            Err(rejection) => {
                self.services.insert(key.clone(), ServiceState::Rejected(rejection));
                return;
            }
        };
        let slices: Vec<&CheckedSlice> =
            self.slices_by_service.get(key).map(|s| s.values().collect()).unwrap_or_default();
        let output = build::service_output(&checked, &slices, &self.context);
        for (position, claim) in output.claims.iter().enumerate() {
            self.claims.entry(claim.frontend).or_default().insert((key.clone(), claim.port_index, position));
            frontends.insert(claim.frontend);
        }
        if let Some((port, check)) = &output.health_check {
            self.health_claims.entry(*port).or_default().insert(key.clone(), check.clone());
            ports.insert(*port);
        }
        self.services.insert(key.clone(), ServiceState::Checked(output));
    }

    fn claim(&self, (service, _, position): &ClaimOrder) -> Option<&Claim> {
        match self.services.get(service)? {
            ServiceState::Checked(output) => output.claims.get(*position),
            ServiceState::Rejected(_) => None,
        }
    }

    /// Programs the first claim on `frontend`, or removes it if none is left. True if its entry changed.
    fn settle_frontend(&mut self, frontend: Frontend) -> bool {
        let wanted: Option<&FrontendEntry> =
            self.claims.get(&frontend).and_then(|c| c.first()).and_then(|order| self.claim(order)).map(|c| &c.entry);
        let current = self.table.frontends.get(&frontend);
        if wanted == current {
            return false;
        }
        let wanted = wanted.cloned();
        if let Some(old) = self.table.frontends.remove(&frontend) {
            count_backends(&mut self.backend_refs, frontend, &old, false);
        }
        if let Some(new) = wanted {
            count_backends(&mut self.backend_refs, frontend, &new, true);
            self.table.frontends.insert(frontend, new);
        }
        true
    }
}

/// Adds or removes one frontend's references to its backends.
fn count_backends(refs: &mut HashMap<BackendKey, usize>, frontend: Frontend, entry: &FrontendEntry, add: bool) {
    let keys: BTreeSet<BackendKey> = entry.all_endpoints().map(|e| (e.addr, e.port, frontend.protocol)).collect();
    for key in keys {
        if add {
            *refs.entry(key).or_default() += 1;
        } else if let Some(count) = refs.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                refs.remove(&key);
            }
        }
    }
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
