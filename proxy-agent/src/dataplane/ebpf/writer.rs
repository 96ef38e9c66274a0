//! Turns a desired [`ServiceTable`] into the fewest map writes, in a safe order.
//!
//! The order is what keeps traffic safe while the maps change under it:
//! - adding: backends, then the reverse-NAT entry and source ranges, then backend slots `1..=n`, then slot 0
//!   with count `n`; a frontend's internal scope before the external slot 0 that points at it;
//! - shrinking: slot 0 with the new count first, then the slots past it, then unused backends;
//! - removing: slot 0, then the slots, then source ranges and the reverse-NAT entry, then unused backends.
//!
//! So a packet never reads a count that points at a missing slot, a slot that names a missing backend, or a
//! flag that points at a missing scope or range.
//!
//! Backend ids are per Service port: two Services selecting one pod give it two ids. A flow is bound to its
//! Service's id, so when the pod leaves one Service (its id is deleted) that Service's UDP flows move on,
//! even while the other Service keeps the pod (as kube-proxy's conntrack cleanup moves them).
//! The writer is generic over [`ServiceMaps`], so the ordering is tested against an in-memory map that
//! checks those invariants after every single write.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

// Seeded per process, so keys taken from cluster objects cannot be chosen to collide; several times faster
// than std's SipHash on these small keys.
use foldhash::{HashMap, HashMapExt as _};

use proxy_common::{
    backend::FLAG_LOCAL,
    capacity,
    ids::NextIds,
    service::{SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceValue, flags},
};

use crate::model::{
    BackendSet, Endpoint, Frontend, FrontendEntry, FrontendKind, LbAlgorithm, Protocol, ServicePortName, ServiceTable,
};

use super::ApplyStats;

/// A source range: address and prefix length.
pub use crate::model::Cidr;

/// The maps' keys and values as the writer deals in them: with an address of either family. The maps
/// ([`ServiceMaps`]) write each into its family's map (`SERVICES` or `SERVICES6`, ...), so the writer's
/// ordering rules and id numbering hold for both families at once.
pub type ServiceKey = proxy_common::service::ServiceKey<IpAddr>;
pub type Backend = proxy_common::backend::Backend<IpAddr>;
pub type RevNat = proxy_common::revnat::RevNat<IpAddr>;

/// Everything in the service maps, as read back at start-up.
#[derive(Clone, Debug, Default)]
pub struct Contents {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, Backend)>,
    pub revnat: Vec<(u32, RevNat)>,
    pub source_ranges: Vec<(u32, Cidr)>,
    /// The id counters a previous agent left.
    pub next_ids: NextIds,
}

/// The maps the writer drives. Implemented over aya's maps, and in memory for tests.
pub trait ServiceMaps {
    fn put_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()>;
    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()>;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> anyhow::Result<()>;
    fn delete_service(&mut self, key: &ServiceKey) -> anyhow::Result<()>;
    fn put_revnat(&mut self, id: u32, revnat: RevNat) -> anyhow::Result<()>;
    fn delete_revnat(&mut self, id: u32) -> anyhow::Result<()>;
    fn put_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()>;
    fn delete_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()>;
    /// Writes Maglev table `table` whole: entry `i` names backend `entries[i]`.
    fn put_maglev(&mut self, table: u32, entries: &[u32]) -> anyhow::Result<()>;
    /// Deletes the `size` entries of Maglev table `table`.
    fn delete_maglev(&mut self, table: u32, size: u32) -> anyhow::Result<()>;
    fn put_next_ids(&mut self, ids: NextIds) -> anyhow::Result<()>;
    fn dump(&self) -> anyhow::Result<Contents>;
}

/// A desired table that does not fit the maps. Nothing is written when this is returned.
#[derive(Debug, thiserror::Error)]
#[error("the service table needs {needed} {what} entries but the map holds {capacity}; nothing was changed")]
pub struct TooLarge {
    pub what: &'static str,
    pub needed: usize,
    pub capacity: u32,
}

/// One scope of one frontend, as the maps hold it.
type ScopedFrontend = (Frontend, u8);

/// What is programmed for one scope of a frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Programmed {
    /// Slot 0, if written.
    slot0: Option<ServiceValue>,
    /// Slot → backend id, for every slot entry present (including any past the count left by a crash).
    slots: BTreeMap<u16, u32>,
}

/// What one scope of a frontend should hold.
struct Wanted {
    slot0: ServiceValue,
    backend_ids: Vec<u32>,
    /// For a Maglev scope: its backends' addresses and ports, in slot order (the table is built from them).
    maglev: Option<Vec<(IpAddr, u16)>>,
}

/// How the writer builds Maglev tables: the node's default for external frontends, and the table size.
#[derive(Clone, Copy, Debug)]
pub struct MaglevSettings {
    /// For NodePort, external and load-balancer frontends whose Service does not choose.
    pub external_default: LbAlgorithm,
    /// Entries per table (a prime).
    pub table_size: u32,
}

impl Default for MaglevSettings {
    fn default() -> Self {
        Self { external_default: LbAlgorithm::Random, table_size: proxy_common::maglev::DEFAULT_TABLE_SIZE }
    }
}

/// A Service port, by a number the writer hands out (names are long; keys are many).
type Group = u32;

/// A backend of one Service port: the group, and the endpoint's address, port and protocol.
type BackendKey = (Group, IpAddr, u16, Protocol);

/// A backend id found in the maps, by a frontend whose slots name it and the endpoint it holds.
type AdoptedKey = (Frontend, IpAddr, u16, Protocol);

pub struct TableWriter<M> {
    maps: M,
    scopes: BTreeMap<ScopedFrontend, Programmed>,
    rev_nat_ids: BTreeMap<Frontend, u32>,
    source_ranges: BTreeMap<u32, BTreeSet<Cidr>>,
    backends: HashMap<BackendKey, (u32, Backend)>,
    /// Service port → group.
    groups: HashMap<ServicePortName, Group>,
    next_group: Group,
    /// Backend ids found in the maps (after a start or re-read) that no Service port has claimed yet, and
    /// the frontends' slots that name them: the first whole apply gives each to the Service port of a
    /// frontend that names it, and deletes the rest.
    unclaimed: HashMap<u32, Backend>,
    adopted: HashMap<AdoptedKey, u32>,
    /// Ids found in the maps that no slot names (a terminating endpoint's, or one a crash left), by endpoint.
    adopted_unslotted: HashMap<(IpAddr, u16, Protocol), u32>,
    next_backend_id: u32,
    next_rev_nat_id: u32,
    maglev: MaglevSettings,
    /// Maglev tables in the map (one per Maglev scope), and the next table id.
    maglev_tables: usize,
    next_maglev_table: u32,
    /// Reverse-NAT ids found in the maps that no frontend uses (left by a crash); removed on the next apply.
    orphan_rev_nat: BTreeSet<u32>,
    /// The counters as last persisted.
    persisted_ids: NextIds,
    /// Entries in the services map (slot 0s and slots), kept as they are written: the occupancy metric is
    /// read after every sync, and counting would walk the whole table.
    service_entries: usize,
    /// What each applied frontend uses, so a change to a few frontends is checked and cleaned up without
    /// walking the whole table. `None` until a whole table has been applied (after a start or re-read).
    usage: Option<Usage>,
}

/// Map space and backends used by the applied table, per frontend and in total.
#[derive(Default)]
struct Usage {
    frontends: HashMap<Frontend, FrontendUsage>,
    backend_refs: HashMap<BackendKey, usize>,
    slots: usize,
    ranges: usize,
}

#[derive(Clone, Default)]
struct FrontendUsage {
    backends: BTreeSet<BackendKey>,
    slots: usize,
    ranges: usize,
}

impl FrontendUsage {
    fn of(group: Group, frontend: Frontend, entry: &FrontendEntry) -> Self {
        Self {
            backends: entry.all_endpoints().map(|ep| (group, ep.addr, ep.port, frontend.protocol)).collect(),
            slots: slots_needed(entry),
            ranges: entry.source_ranges.len(),
        }
    }
}

impl Usage {
    fn of(table: &ServiceTable, groups: &HashMap<ServicePortName, Group>) -> Self {
        let mut usage = Self::default();
        for (frontend, entry) in &table.frontends {
            usage.set(*frontend, Some(FrontendUsage::of(groups[&entry.service], *frontend, entry)));
        }
        usage
    }

    /// Replaces what one frontend uses; returns the backends it let go of that nothing else used then.
    fn set(&mut self, frontend: Frontend, new: Option<FrontendUsage>) -> Vec<BackendKey> {
        let mut released = Vec::new();
        if let Some(old) = self.frontends.remove(&frontend) {
            self.slots -= old.slots;
            self.ranges -= old.ranges;
            for key in old.backends {
                if let Some(count) = self.backend_refs.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        self.backend_refs.remove(&key);
                        released.push(key);
                    }
                }
            }
        }
        if let Some(new) = new {
            self.slots += new.slots;
            self.ranges += new.ranges;
            for key in &new.backends {
                *self.backend_refs.entry(*key).or_default() += 1;
            }
            self.frontends.insert(frontend, new);
        }
        released
    }
}

fn service_key((f, scope): ScopedFrontend, slot: u16) -> ServiceKey {
    ServiceKey::new(f.addr, f.port.to_be(), f.protocol.number(), scope, slot)
}

fn backend_value(ep: Endpoint, protocol: Protocol) -> Backend {
    Backend {
        addr: ep.addr,
        port: ep.port.to_be(),
        proto: protocol.number(),
        flags: if ep.local { FLAG_LOCAL } else { 0 },
    }
}

/// The slot-0 flags shared by both scopes.
fn common_flags(entry: &FrontendEntry, set: &BackendSet) -> u16 {
    let mut f = 0;
    if set.reject_when_empty {
        f |= flags::REJECT_WHEN_EMPTY;
    }
    if entry.affinity_timeout.is_some() {
        f |= flags::AFFINITY;
    }
    f
}

impl<M: ServiceMaps> TableWriter<M> {
    /// Takes over whatever the maps hold (a previous agent's work), so the first apply only writes the
    /// difference and live flows are never flushed.
    pub fn adopt(maps: M) -> anyhow::Result<Self> {
        let known = Known::read(&maps.dump()?);
        Ok(Self {
            maps,
            service_entries: known.service_entries(),
            scopes: known.scopes,
            rev_nat_ids: known.rev_nat_ids,
            source_ranges: known.source_ranges,
            backends: HashMap::new(),
            groups: HashMap::new(),
            next_group: 0,
            unclaimed: known.backends,
            adopted: known.adopted,
            adopted_unslotted: known.adopted_unslotted,
            next_backend_id: (known.max_backend + 1).max(known.next_ids.backend),
            next_rev_nat_id: (known.max_rev_nat + 1).max(known.next_ids.rev_nat),
            maglev: MaglevSettings::default(),
            maglev_tables: known.maglev_tables.len(),
            next_maglev_table: known.maglev_tables.iter().max().map_or(1, |m| m + 1),
            orphan_rev_nat: known.orphan_rev_nat,
            persisted_ids: known.next_ids,
            usage: None,
        })
    }

    /// How Maglev tables are chosen and sized.
    #[must_use]
    pub fn with_maglev(mut self, settings: MaglevSettings) -> Self {
        self.maglev = settings;
        self
    }

    /// Forgets what the writer believes is programmed and reads it back from the maps, keeping its id
    /// counters (ids are never reused while the agent runs).
    pub fn reread(&mut self) -> anyhow::Result<()> {
        let known = Known::read(&self.maps.dump()?);
        self.next_backend_id = self.next_backend_id.max(known.max_backend + 1);
        self.next_rev_nat_id = self.next_rev_nat_id.max(known.max_rev_nat + 1);
        self.service_entries = known.service_entries();
        self.maglev_tables = known.maglev_tables.len();
        self.next_maglev_table = self.next_maglev_table.max(known.maglev_tables.iter().max().map_or(1, |m| m + 1));
        self.scopes = known.scopes;
        self.rev_nat_ids = known.rev_nat_ids;
        self.source_ranges = known.source_ranges;
        self.backends.clear();
        self.unclaimed = known.backends;
        self.adopted = known.adopted;
        self.adopted_unslotted = known.adopted_unslotted;
        self.orphan_rev_nat = known.orphan_rev_nat;
        self.usage = None;
        Ok(())
    }

    /// Entries in use per map.
    pub fn occupancy(&self) -> Vec<(&'static str, usize)> {
        vec![
            (proxy_common::maps::SERVICES, self.service_entries),
            (proxy_common::maps::BACKENDS, self.backends.len() + self.unclaimed.len()),
            (proxy_common::maps::REVNAT, self.rev_nat_ids.len()),
            (proxy_common::maps::SOURCE_RANGES, self.source_ranges.values().map(BTreeSet::len).sum()),
        ]
    }

    /// Programs `table`, writing only what differs from what is programmed.
    pub fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        // Groups of Service ports no longer in the table are forgotten here (changes only ever add).
        let names: std::collections::HashSet<&ServicePortName> = table.frontends.values().map(|e| &e.service).collect();
        self.groups.retain(|name, _| names.contains(name));
        for entry in table.frontends.values() {
            self.group_of(&entry.service);
        }
        let usage = Usage::of(table, &self.groups);
        fits(usage.slots, usage.backend_refs.len(), table.frontends.len(), usage.ranges)?;
        let mut stats = ApplyStats::default();

        // 1. Frontends no longer wanted at all, first, so their entries make room for new ones.
        let gone: BTreeSet<Frontend> = self
            .rev_nat_ids
            .keys()
            .chain(self.scopes.keys().map(|(f, _)| f))
            .filter(|f| !table.frontends.contains_key(f))
            .copied()
            .collect();
        for frontend in gone {
            self.remove_frontend(frontend, &mut stats)?;
        }
        for id in std::mem::take(&mut self.orphan_rev_nat) {
            self.set_source_ranges(id, &BTreeSet::new(), &mut stats)?;
            self.maps.delete_revnat(id)?;
            stats.deletes += 1;
        }

        // 2. Backends before any slot that names them; terminating endpoints stay for established flows.
        for (frontend, entry) in &table.frontends {
            let group = self.groups[&entry.service];
            for ep in entry.all_endpoints() {
                self.ensure_backend(group, *frontend, *ep, &mut stats)?;
            }
        }

        // 3. New and changed frontends.
        for (frontend, entry) in &table.frontends {
            self.program_frontend(*frontend, entry, &mut stats)?;
        }
        self.persist_ids()?;

        // 4. Backends nothing refers to any more.
        let unused: Vec<(BackendKey, u32)> = self
            .backends
            .iter()
            .filter(|(k, _)| !usage.backend_refs.contains_key(k))
            .map(|(k, (id, _))| (*k, *id))
            .collect();
        for (key, id) in unused {
            self.maps.delete_backend(id)?;
            self.backends.remove(&key);
            stats.deletes += 1;
        }
        // Ids found in the maps that no Service port claimed.
        for id in self.unclaimed.keys().copied().collect::<Vec<_>>() {
            self.maps.delete_backend(id)?;
            self.unclaimed.remove(&id);
            stats.deletes += 1;
        }
        self.adopted.clear();
        self.adopted_unslotted.clear();
        self.usage = Some(usage);
        Ok(stats)
    }

    /// Programs the frontends in `changed` as `table` has them (removing those it no longer has), trusting
    /// that every other frontend is already programmed as `table` says. Costs time in proportion to the
    /// change, not the table. Falls back to [`TableWriter::apply`] until a whole table has been applied.
    pub fn apply_changes(&mut self, table: &ServiceTable, changed: &BTreeSet<Frontend>) -> anyhow::Result<ApplyStats> {
        if self.usage.is_none() {
            return self.apply(table);
        }
        for entry in changed.iter().filter_map(|f| table.frontends.get(f)) {
            self.group_of(&entry.service);
        }
        let usage = self.usage.as_ref().expect("checked above");
        check_capacity_after(usage, table, changed, &self.groups)?;
        let mut usage = self.usage.take().expect("checked above");
        let result = self.apply_changes_with(&mut usage, table, changed);
        // On error the usage no longer matches the maps; the next call applies the whole table.
        if result.is_ok() {
            self.usage = Some(usage);
        }
        result
    }

    fn apply_changes_with(
        &mut self,
        usage: &mut Usage,
        table: &ServiceTable,
        changed: &BTreeSet<Frontend>,
    ) -> anyhow::Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        for frontend in changed.iter().filter(|f| !table.frontends.contains_key(f)) {
            self.remove_frontend(*frontend, &mut stats)?;
        }
        let present: Vec<(Frontend, &FrontendEntry)> =
            changed.iter().filter_map(|f| table.frontends.get(f).map(|e| (*f, e))).collect();
        for (frontend, entry) in &present {
            let group = self.groups[&entry.service];
            for ep in entry.all_endpoints() {
                self.ensure_backend(group, *frontend, *ep, &mut stats)?;
            }
        }
        for (frontend, entry) in &present {
            self.program_frontend(*frontend, entry, &mut stats)?;
        }
        self.persist_ids()?;
        let mut released = Vec::new();
        for frontend in changed {
            let new = table
                .frontends
                .get(frontend)
                .map(|entry| FrontendUsage::of(self.groups[&entry.service], *frontend, entry));
            released.extend(usage.set(*frontend, new));
        }
        // A backend one changed frontend let go of may have been taken up by another.
        released.retain(|key| !usage.backend_refs.contains_key(key));
        for key in released {
            if let Some((id, _)) = self.backends.get(&key).copied() {
                self.maps.delete_backend(id)?;
                self.backends.remove(&key);
                stats.deletes += 1;
            }
        }
        Ok(stats)
    }

    /// Removes every entry of a frontend: external scope first (its slot 0 is what new flows find).
    fn remove_frontend(&mut self, frontend: Frontend, stats: &mut ApplyStats) -> anyhow::Result<()> {
        for scope in [SCOPE_EXTERNAL, SCOPE_INTERNAL] {
            self.remove_scope((frontend, scope), stats)?;
        }
        tracing::debug!(%frontend, "frontend removed");
        if let Some(id) = self.rev_nat_ids.get(&frontend).copied() {
            self.set_source_ranges(id, &BTreeSet::new(), stats)?;
            self.maps.delete_revnat(id)?;
            self.rev_nat_ids.remove(&frontend);
            stats.deletes += 1;
        }
        Ok(())
    }

    /// Writes what differs for one frontend whose backends exist. The internal scope is written before the
    /// external slot 0 that points at it, and removed only after that slot 0 stopped pointing at it.
    fn program_frontend(
        &mut self,
        frontend: Frontend,
        entry: &FrontendEntry,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<()> {
        let rev_nat_id = self.ensure_rev_nat(frontend, stats)?;
        let ranges: BTreeSet<Cidr> = entry.source_ranges.iter().copied().collect();
        let mut ext_flags = common_flags(entry, &entry.external);
        if entry.masquerade_external {
            ext_flags |= flags::MASQUERADE_EXTERNAL;
        }
        if entry.kind == FrontendKind::ClusterIp {
            ext_flags |= flags::CLUSTER_IP;
        }
        if !ranges.is_empty() {
            ext_flags |= flags::SOURCE_RANGES;
            self.set_source_ranges(rev_nat_id, &ranges, stats)?;
        }
        let internal_differs = entry.internal != entry.external;
        if internal_differs {
            ext_flags |= flags::HAS_INTERNAL_SCOPE;
            let wanted = self.wanted(
                entry,
                &entry.internal,
                frontend.protocol,
                rev_nat_id,
                common_flags(entry, &entry.internal),
            );
            self.program_scope((frontend, SCOPE_INTERNAL), &wanted, stats)?;
        }
        let wanted = self.wanted(entry, &entry.external, frontend.protocol, rev_nat_id, ext_flags);
        let before = *stats;
        self.program_scope((frontend, SCOPE_EXTERNAL), &wanted, stats)?;
        if *stats != before {
            tracing::debug!(
                service = %entry.service,
                %frontend,
                backends = entry.external.endpoints.len(),
                "frontend programmed"
            );
        }
        if !internal_differs {
            self.remove_scope((frontend, SCOPE_INTERNAL), stats)?;
        }
        if ranges.is_empty() {
            self.set_source_ranges(rev_nat_id, &ranges, stats)?;
        }
        Ok(())
    }

    /// Persists the id counters before anything is deleted: an id must never come back after a restart
    /// while a conntrack entry may still name it.
    fn persist_ids(&mut self) -> anyhow::Result<()> {
        let ids = NextIds { backend: self.next_backend_id, rev_nat: self.next_rev_nat_id };
        if ids != self.persisted_ids {
            self.maps.put_next_ids(ids)?;
            self.persisted_ids = ids;
        }
        Ok(())
    }

    fn wanted(
        &self,
        entry: &FrontendEntry,
        set: &BackendSet,
        protocol: Protocol,
        rev_nat_id: u32,
        flags: u16,
    ) -> Wanted {
        let group = self.groups[&entry.service];
        let backend_ids: Vec<u32> =
            set.endpoints.iter().map(|ep| self.backends[&(group, ep.addr, ep.port, protocol)].0).collect();
        let count = u16::try_from(backend_ids.len()).unwrap_or(u16::MAX);
        let algorithm = entry.lb_algorithm.unwrap_or(if entry.kind == FrontendKind::ClusterIp {
            LbAlgorithm::Random
        } else {
            self.maglev.external_default
        });
        let maglev = (algorithm == LbAlgorithm::Maglev && !set.endpoints.is_empty())
            .then(|| set.endpoints.iter().map(|ep| (ep.addr, ep.port)).collect::<Vec<_>>());
        let slot0 = ServiceValue {
            backend_id: 0,
            rev_nat_id,
            count,
            flags: if maglev.is_some() { flags | flags::MAGLEV } else { flags },
            affinity_timeout: entry.affinity_timeout.unwrap_or(0),
        };
        Wanted { slot0, backend_ids, maglev }
    }

    /// The table id a Maglev scope's slot 0 names: its current table when its backends are unchanged,
    /// else a new table, written whole before slot 0 points at it (the data path then sees the old table
    /// or the new one, never a mix).
    fn maglev_table(&mut self, programmed: &Programmed, wanted: &Wanted) -> anyhow::Result<Option<u32>> {
        let Some(addrs) = &wanted.maglev else { return Ok(None) };
        let current = programmed.slot0.filter(|s| s.flags & flags::MAGLEV != 0).map(|s| s.backend_id);
        let same_backends = programmed.slot0.is_some_and(|s| s.count == wanted.slot0.count)
            && (1..=wanted.slot0.count)
                .zip(&wanted.backend_ids)
                .all(|(slot, id)| programmed.slots.get(&slot) == Some(id));
        if let Some(table) = current.filter(|_| same_backends) {
            return Ok(Some(table));
        }
        let size = self.maglev.table_size;
        let needed = (self.maglev_tables + 1) * size as usize;
        if needed > capacity::MAGLEV as usize {
            return Err(TooLarge { what: "Maglev", needed, capacity: capacity::MAGLEV }.into());
        }
        let entries: Vec<u32> = super::maglev::table(addrs, size).into_iter().map(|i| wanted.backend_ids[i]).collect();
        let table = self.next_maglev_table;
        self.next_maglev_table += 1;
        self.maps.put_maglev(table, &entries)?;
        self.maglev_tables += 1;
        Ok(Some(table))
    }

    /// Deletes the Maglev table a scope's old slot 0 named, once nothing points at it.
    fn drop_maglev_table(&mut self, old_slot0: Option<ServiceValue>, kept: Option<u32>) -> anyhow::Result<()> {
        let Some(old) = old_slot0.filter(|s| s.flags & flags::MAGLEV != 0).map(|s| s.backend_id) else {
            return Ok(());
        };
        if Some(old) != kept {
            self.maps.delete_maglev(old, self.maglev.table_size)?;
            self.maglev_tables = self.maglev_tables.saturating_sub(1);
        }
        Ok(())
    }

    /// The group of a Service port, handed out on first sight.
    fn group_of(&mut self, service: &ServicePortName) -> Group {
        if let Some(group) = self.groups.get(service) {
            return *group;
        }
        let group = self.next_group;
        self.next_group += 1;
        self.groups.insert(service.clone(), group);
        group
    }

    fn ensure_backend(
        &mut self,
        group: Group,
        frontend: Frontend,
        ep: Endpoint,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<u32> {
        let protocol = frontend.protocol;
        let value = backend_value(ep, protocol);
        let key = (group, ep.addr, ep.port, protocol);
        // Known to this Service port, or found in the maps under one of its frontends' slots (a previous
        // agent's id: its flows keep it).
        let known = self.backends.get(&key).copied().or_else(|| {
            let slotted = self.adopted.get(&(frontend, ep.addr, ep.port, protocol));
            let id = *slotted.or_else(|| self.adopted_unslotted.get(&(ep.addr, ep.port, protocol)))?;
            Some((id, self.unclaimed.remove(&id)?))
        });
        if let Some((id, current)) = known {
            if current != value {
                self.maps.put_backend(id, value)?;
                stats.writes += 1;
            }
            self.backends.insert(key, (id, value));
            return Ok(id);
        }
        // Ids are never reused while the agent runs, so a conntrack entry naming a deleted backend can
        // never be mistaken for a new, unrelated one.
        let id = self.next_backend_id;
        self.maps.put_backend(id, value)?;
        self.next_backend_id += 1;
        self.backends.insert(key, (id, value));
        stats.writes += 1;
        Ok(id)
    }

    fn ensure_rev_nat(&mut self, frontend: Frontend, stats: &mut ApplyStats) -> anyhow::Result<u32> {
        if let Some(id) = self.rev_nat_ids.get(&frontend) {
            return Ok(*id);
        }
        let id = self.next_rev_nat_id;
        self.maps.put_revnat(id, RevNat { addr: frontend.addr, port: frontend.port.to_be(), pad: 0 })?;
        self.next_rev_nat_id += 1;
        self.rev_nat_ids.insert(frontend, id);
        stats.writes += 1;
        Ok(id)
    }

    fn set_source_ranges(&mut self, id: u32, wanted: &BTreeSet<Cidr>, stats: &mut ApplyStats) -> anyhow::Result<()> {
        let current = self.source_ranges.entry(id).or_default();
        for range in wanted.difference(&current.clone()) {
            self.maps.put_source_range(id, *range)?;
            current.insert(*range);
            stats.writes += 1;
        }
        for range in current.clone().difference(wanted) {
            self.maps.delete_source_range(id, *range)?;
            current.remove(range);
            stats.deletes += 1;
        }
        if current.is_empty() {
            self.source_ranges.remove(&id);
        }
        Ok(())
    }

    fn program_scope(&mut self, scoped: ScopedFrontend, wanted: &Wanted, stats: &mut ApplyStats) -> anyhow::Result<()> {
        let before = self.scopes.get(&scoped).cloned().unwrap_or_default();
        let table = self.maglev_table(&before, wanted)?;
        let mut slot0 = wanted.slot0;
        if let Some(table) = table {
            if before.slot0.is_none_or(|s| s.backend_id != table || s.flags & flags::MAGLEV == 0) {
                stats.writes += self.maglev.table_size as usize;
            }
            slot0.backend_id = table;
        }
        let programmed = self.scopes.entry(scoped).or_default();
        let count = slot0.count;
        for (slot, id) in (1..=count).zip(&wanted.backend_ids) {
            if programmed.slots.get(&slot) != Some(id) {
                let value = ServiceValue {
                    backend_id: *id,
                    rev_nat_id: slot0.rev_nat_id,
                    count: 0,
                    flags: 0,
                    affinity_timeout: 0,
                };
                self.maps.put_service(&service_key(scoped, slot), &value)?;
                if programmed.slots.insert(slot, *id).is_none() {
                    self.service_entries += 1;
                }
                stats.writes += 1;
            }
        }
        if programmed.slot0 != Some(slot0) {
            self.maps.put_service(&service_key(scoped, 0), &slot0)?;
            if programmed.slot0.replace(slot0).is_none() {
                self.service_entries += 1;
            }
            stats.writes += 1;
        }
        let extra: Vec<u16> = programmed.slots.range(count + 1..).map(|(slot, _)| *slot).collect();
        for slot in extra {
            self.maps.delete_service(&service_key(scoped, slot))?;
            programmed.slots.remove(&slot);
            self.service_entries -= 1;
            stats.deletes += 1;
        }
        self.drop_maglev_table(before.slot0, table)
    }

    fn remove_scope(&mut self, scoped: ScopedFrontend, stats: &mut ApplyStats) -> anyhow::Result<()> {
        let Some(programmed) = self.scopes.get_mut(&scoped) else { return Ok(()) };
        if let Some(old) = programmed.slot0 {
            self.maps.delete_service(&service_key(scoped, 0))?;
            programmed.slot0 = None;
            self.service_entries -= 1;
            stats.deletes += 1;
            self.drop_maglev_table(Some(old), None)?;
        }
        let Some(programmed) = self.scopes.get_mut(&scoped) else { return Ok(()) };
        while let Some((slot, id)) = programmed.slots.pop_last() {
            if let Err(e) = self.maps.delete_service(&service_key(scoped, slot)) {
                programmed.slots.insert(slot, id);
                return Err(e);
            }
            self.service_entries -= 1;
            stats.deletes += 1;
        }
        self.scopes.remove(&scoped);
        Ok(())
    }
}

/// What the maps hold, in the writer's terms.
struct Known {
    scopes: BTreeMap<ScopedFrontend, Programmed>,
    rev_nat_ids: BTreeMap<Frontend, u32>,
    source_ranges: BTreeMap<u32, BTreeSet<Cidr>>,
    backends: HashMap<u32, Backend>,
    adopted: HashMap<AdoptedKey, u32>,
    adopted_unslotted: HashMap<(IpAddr, u16, Protocol), u32>,
    /// Maglev table ids the slot 0s name.
    maglev_tables: BTreeSet<u32>,
    orphan_rev_nat: BTreeSet<u32>,
    max_backend: u32,
    max_rev_nat: u32,
    next_ids: NextIds,
}

impl Known {
    fn service_entries(&self) -> usize {
        self.scopes.values().map(|p| usize::from(p.slot0.is_some()) + p.slots.len()).sum()
    }

    fn read(contents: &Contents) -> Self {
        let mut scopes: BTreeMap<ScopedFrontend, Programmed> = BTreeMap::new();
        let mut rev_nat_ids = BTreeMap::new();
        for (key, value) in &contents.services {
            let Some(protocol) = Protocol::from_number(key.proto) else { continue };
            let frontend = Frontend { addr: key.addr, port: u16::from_be(key.port), protocol };
            let p = scopes.entry((frontend, key.scope)).or_default();
            if key.slot == 0 {
                p.slot0 = Some(*value);
                rev_nat_ids.insert(frontend, value.rev_nat_id);
            } else {
                p.slots.insert(key.slot, value.backend_id);
            }
        }
        let backends: HashMap<u32, Backend> = contents.backends.iter().copied().collect();
        let mut adopted = HashMap::new();
        let mut slotted = std::collections::HashSet::new();
        for ((frontend, _), p) in &scopes {
            for id in p.slots.values() {
                if let Some(b) = backends.get(id) {
                    adopted.insert((*frontend, b.addr, u16::from_be(b.port), frontend.protocol), *id);
                    slotted.insert(*id);
                }
            }
        }
        let adopted_unslotted = backends
            .iter()
            .filter(|(id, _)| !slotted.contains(*id))
            .filter_map(|(id, b)| Some(((b.addr, u16::from_be(b.port), Protocol::from_number(b.proto)?), *id)))
            .collect();
        let mut source_ranges: BTreeMap<u32, BTreeSet<Cidr>> = BTreeMap::new();
        for (id, range) in &contents.source_ranges {
            source_ranges.entry(*id).or_default().insert(*range);
        }
        let maglev_tables = scopes
            .values()
            .filter_map(|p| p.slot0.filter(|s| s.flags & flags::MAGLEV != 0).map(|s| s.backend_id))
            .collect();
        let used_rev: BTreeSet<u32> = rev_nat_ids.values().copied().collect();
        let orphan_rev_nat = contents.revnat.iter().map(|(id, _)| *id).filter(|id| !used_rev.contains(id)).collect();
        let max_backend = contents.backends.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let max_rev_nat = contents.revnat.iter().map(|(id, _)| *id).chain(used_rev).max().unwrap_or(0);
        Self {
            scopes,
            rev_nat_ids,
            source_ranges,
            backends,
            adopted,
            adopted_unslotted,
            maglev_tables,
            orphan_rev_nat,
            max_backend,
            max_rev_nat,
            next_ids: contents.next_ids,
        }
    }
}

/// Service-map entries one frontend needs: slot 0 and a slot per backend, for each scope it has.
fn slots_needed(e: &FrontendEntry) -> usize {
    1 + e.external.endpoints.len() + if e.internal == e.external { 0 } else { 1 + e.internal.endpoints.len() }
}

/// The capacity check for `table`, knowing that only the `changed` frontends differ from `usage`.
fn check_capacity_after(
    usage: &Usage,
    table: &ServiceTable,
    changed: &BTreeSet<Frontend>,
    groups: &HashMap<ServicePortName, Group>,
) -> Result<(), TooLarge> {
    let (mut slots, mut ranges) = (usage.slots, usage.ranges);
    let mut new_backends = BTreeSet::new();
    for frontend in changed {
        if let Some(old) = usage.frontends.get(frontend) {
            slots -= old.slots;
            ranges -= old.ranges;
        }
        if let Some(entry) = table.frontends.get(frontend) {
            let new = FrontendUsage::of(groups[&entry.service], *frontend, entry);
            slots += new.slots;
            ranges += new.ranges;
            new_backends.extend(new.backends.into_iter().filter(|k| !usage.backend_refs.contains_key(k)));
        }
    }
    // An upper bound for backends: those released by the change are still counted.
    fits(slots, usage.backend_refs.len() + new_backends.len(), table.frontends.len(), ranges)
}

fn fits(slots: usize, backends: usize, frontends: usize, ranges: usize) -> Result<(), TooLarge> {
    let checks = [
        ("service", slots, capacity::SERVICES),
        ("backend", backends, capacity::BACKENDS),
        ("reverse-NAT", frontends, capacity::REVNAT),
        ("source-range", ranges, capacity::SOURCE_RANGES),
    ];
    for (what, needed, capacity) in checks {
        if needed > capacity as usize {
            return Err(TooLarge { what, needed, capacity });
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
