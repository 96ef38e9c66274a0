//! The model, kept up to date change by change.
//!
//! The specification, `reference::desired` (test-only), recomputes every Service from scratch; at 100k Services that is far too slow
//! to run for each endpoint that moves. [`IncrementalModel`] gives the same answer but only recomputes the
//! Services whose object, slices or node context changed since the last update, found by diffing two
//! versions of the (structure-sharing) cluster state, and reports which frontends changed so the dataplane
//! can write only those. Its output is checked against `desired` by the tests, change sequence by change
//! sequence.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

// Seeded per process, so keys taken from cluster objects cannot be chosen to collide; several times faster
// than std's SipHash on these small keys.
use foldhash::{HashMap, HashMapExt as _};

use imbl::ordmap::DiffItem;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    Frontend, FrontendEntry, HealthCheck, NodeIdentity, Protocol, Rejection, ServiceTable,
    build::{self, Claim, NodeContext, ServiceOutput},
    validate::{self, CheckedSlice},
};
use crate::store::{ClusterState, ObjectKey};

/// Where a claim sits in the order that decides conflicts: Service, port, position within the port.
type ClaimOrder = (ObjectKey, usize, usize);

type BackendKey = (std::net::IpAddr, u16, Protocol);

pub struct IncrementalModel {
    node: NodeIdentity,
    context: NodeContext,
    /// The state the outputs below reflect.
    state: Arc<ClusterState>,
    /// The checked slices of each Service, by key, sorted. The slices themselves are read (and checked
    /// again) from the state when their Service is recomputed: keeping checked copies of every slice would
    /// double the memory the cluster's endpoints take.
    slices_by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// What each checked Service contributes.
    services: HashMap<ObjectKey, ServiceOutput>,
    // What is left out, kept apart so that listing it never walks the whole cluster.
    rejected_slices: BTreeMap<ObjectKey, Rejection>,
    rejected_services: BTreeMap<ObjectKey, Rejection>,
    /// Checked Services with ports that cannot be programmed.
    services_with_rejected_ports: BTreeSet<ObjectKey>,
    /// Frontends claimed more than once.
    contested: BTreeSet<Frontend>,
    /// Who claims each frontend, sorted in conflict order: the first one is programmed. Nearly always one;
    /// the claims themselves live in `services`.
    claims: HashMap<Frontend, Vec<ClaimOrder>>,
    /// Every Service serving each healthCheckNodePort: the last one answers, as in `desired`.
    health_claims: BTreeMap<u16, BTreeMap<ObjectKey, HealthCheck>>,
    table: ServiceTable,
    health_checks: BTreeMap<u16, HealthCheck>,
    /// How many programmed frontends use each backend.
    backend_refs: HashMap<BackendKey, usize>,
    /// `ServiceCIDR` objects that could not be read.
    rejected_service_cidrs: Vec<Rejection>,
}

impl IncrementalModel {
    #[must_use]
    pub fn new(node: NodeIdentity) -> Self {
        let (service_cidrs, _) = super::service_cidrs(&ClusterState::default(), &node);
        Self {
            node,
            context: NodeContext::default(),
            state: Arc::default(),
            slices_by_service: HashMap::new(),
            services: HashMap::new(),
            rejected_slices: BTreeMap::new(),
            rejected_services: BTreeMap::new(),
            services_with_rejected_ports: BTreeSet::new(),
            contested: BTreeSet::new(),
            claims: HashMap::new(),
            health_claims: BTreeMap::new(),
            table: ServiceTable { service_cidrs, ..ServiceTable::default() },
            health_checks: BTreeMap::new(),
            backend_refs: HashMap::new(),
            rejected_service_cidrs: Vec::new(),
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
        if previous.service_cidrs != state.service_cidrs {
            (self.table.service_cidrs, self.rejected_service_cidrs) = super::service_cidrs(state, &self.node);
        }
        let mut dirty: BTreeSet<ObjectKey> = BTreeSet::new();
        for item in previous.endpoint_slices.diff(&state.endpoint_slices) {
            let (key, old, new) = match item {
                DiffItem::Add(key, new) => (key, None, Some(new)),
                DiffItem::Update { old: (key, old), new: (_, new) } => (key, Some(old), Some(new)),
                DiffItem::Remove(key, old) => (key, Some(old), None),
            };
            if let Some(old) = old {
                self.forget_slice(key, old, &mut dirty);
            }
            if let Some(new) = new {
                self.learn_slice(key, new, &mut dirty);
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
                self.contribute(state, key, svc, &mut touched_frontends, &mut touched_ports);
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
            .rejected_slices
            .values()
            .chain(self.rejected_services.values())
            .chain(&self.rejected_service_cidrs)
            .cloned()
            .collect();
        for key in &self.services_with_rejected_ports {
            out.extend(self.services.get(key).into_iter().flat_map(|o| o.rejected.iter().cloned()));
        }
        for claims in self.contested.iter().filter_map(|f| self.claims.get(f)) {
            let mut in_order = claims.iter().filter_map(|order| Some((order, self.claim(order)?)));
            let Some((_, winner)) = in_order.next() else { continue };
            out.extend(in_order.map(|((service, ..), claim)| build::conflict(service, claim, &winner.entry.service)));
        }
        out.sort();
        out
    }

    /// Takes back what the previous version of a slice (`old`) contributed.
    fn forget_slice(&mut self, key: &ObjectKey, old: &EndpointSlice, dirty: &mut BTreeSet<ObjectKey>) {
        self.rejected_slices.remove(key);
        if let Ok(Some(checked)) = validate::endpoint_slice(old) {
            let service = checked.service_key();
            if let Some(slices) = self.slices_by_service.get_mut(&service) {
                if let Ok(i) = slices.binary_search(key) {
                    slices.remove(i);
                }
                if slices.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            dirty.insert(service);
        }
    }

    fn learn_slice(&mut self, key: &ObjectKey, slice: &EndpointSlice, dirty: &mut BTreeSet<ObjectKey>) {
        match validate::endpoint_slice(slice) {
            Ok(Some(checked)) => {
                let service = checked.service_key();
                let slices = self.slices_by_service.entry(service.clone()).or_default();
                if let Err(i) = slices.binary_search(key) {
                    slices.insert(i, key.clone());
                }
                dirty.insert(service);
            }
            // Not ours: another address type.
            Ok(None) => {}
            Err(rejection) => drop(self.rejected_slices.insert(key.clone(), rejection)),
        }
    }

    /// Takes back everything a Service contributed.
    fn withdraw(&mut self, key: &ObjectKey, frontends: &mut BTreeSet<Frontend>, ports: &mut BTreeSet<u16>) {
        self.rejected_services.remove(key);
        self.services_with_rejected_ports.remove(key);
        let Some(output) = self.services.remove(key) else { return };
        for (position, claim) in output.claims.iter().enumerate() {
            if let Some(claims) = self.claims.get_mut(&claim.frontend) {
                if let Ok(i) = claims.binary_search(&(key.clone(), claim.port_index, position)) {
                    claims.remove(i);
                }
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
        state: &ClusterState,
        key: &ObjectKey,
        svc: &k8s_openapi::api::core::v1::Service,
        frontends: &mut BTreeSet<Frontend>,
        ports: &mut BTreeSet<u16>,
    ) {
        let checked = match validate::service(svc) {
            Ok(checked) => checked,
            Err(rejection) => {
                self.rejected_services.insert(key.clone(), rejection);
                return;
            }
        };
        let slices: Vec<CheckedSlice> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| validate::endpoint_slice(state.endpoint_slices.get(k)?).ok().flatten())
            .collect();
        let slices: Vec<&CheckedSlice> = slices.iter().collect();
        let output = build::service_output(&checked, &slices, &self.context);
        for (position, claim) in output.claims.iter().enumerate() {
            let claims = self.claims.entry(claim.frontend).or_default();
            let order = (key.clone(), claim.port_index, position);
            if let Err(i) = claims.binary_search(&order) {
                claims.insert(i, order);
            }
            frontends.insert(claim.frontend);
        }
        if let Some((port, check)) = &output.health_check {
            self.health_claims.entry(*port).or_default().insert(key.clone(), check.clone());
            ports.insert(*port);
        }
        if !output.rejected.is_empty() {
            self.services_with_rejected_ports.insert(key.clone());
        }
        self.services.insert(key.clone(), output);
    }

    fn claim(&self, (service, _, position): &ClaimOrder) -> Option<&Claim> {
        self.services.get(service)?.claims.get(*position)
    }

    /// Programs the first claim on `frontend`, or removes it if none is left. True if its entry changed.
    fn settle_frontend(&mut self, frontend: Frontend) -> bool {
        if self.claims.get(&frontend).is_some_and(|c| c.len() > 1) {
            self.contested.insert(frontend);
        } else {
            self.contested.remove(&frontend);
        }
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
    let mut keys: Vec<BackendKey> = entry.all_endpoints().map(|e| (e.addr, e.port, frontend.protocol)).collect();
    keys.sort_unstable();
    keys.dedup();
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
