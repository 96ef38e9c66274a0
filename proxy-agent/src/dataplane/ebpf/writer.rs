//! Turns a desired [`ServiceTable`] into the fewest map writes, in a safe order.
//!
//! The order is what keeps traffic safe while the maps change under it:
//! - adding: backends, then the reverse-NAT entry, then backend slots `1..=n`, then slot 0 with count `n`;
//! - shrinking: slot 0 with the new count first, then the slots past it, then unused backends;
//! - removing: slot 0, then the slots, then the reverse-NAT entry, then unused backends.
//!
//! So a packet never reads a count that points at a missing slot, nor a slot that names a missing backend.
//! The writer is generic over [`ServiceMaps`], so the ordering is tested against an in-memory map that
//! checks those invariants after every single write.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proxy_common::{
    backend::Backend,
    capacity,
    revnat::RevNat,
    service::{ServiceKey, ServiceValue},
};

use crate::model::{Endpoint, Frontend, Protocol, ServiceTable};

use super::ApplyStats;

/// Everything in the three service maps, as read back at start-up.
#[derive(Clone, Debug, Default)]
pub struct Contents {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, Backend)>,
    pub revnat: Vec<(u32, RevNat)>,
}

/// The maps the writer drives. Implemented over aya's maps, and in memory for tests.
pub trait ServiceMaps {
    fn put_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()>;
    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()>;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> anyhow::Result<()>;
    fn delete_service(&mut self, key: &ServiceKey) -> anyhow::Result<()>;
    fn put_revnat(&mut self, id: u32, revnat: RevNat) -> anyhow::Result<()>;
    fn delete_revnat(&mut self, id: u32) -> anyhow::Result<()>;
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

/// What is programmed for one frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Programmed {
    rev_nat_id: u32,
    /// The count in slot 0, if slot 0 is written.
    slot0: Option<u16>,
    /// Slot → backend id, for every slot entry present (including any past `count` left by a crash).
    slots: BTreeMap<u16, u32>,
}

type BackendKey = (Endpoint, Protocol);

pub struct TableWriter<M> {
    maps: M,
    frontends: BTreeMap<Frontend, Programmed>,
    backend_ids: HashMap<BackendKey, u32>,
    next_backend_id: u32,
    next_rev_nat_id: u32,
    /// Reverse-NAT ids found in the maps that no frontend uses (left by a crash); removed on the next apply.
    orphan_rev_nat: BTreeSet<u32>,
}

fn be_addr(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn service_key(f: Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(be_addr(f.addr), f.port.to_be(), f.protocol.number(), slot)
}

impl<M: ServiceMaps> TableWriter<M> {
    /// Takes over whatever the maps hold (a previous agent's work), so the first apply only writes the
    /// difference and live flows are never flushed.
    pub fn adopt(maps: M) -> anyhow::Result<Self> {
        let contents = maps.dump()?;
        let mut frontends: BTreeMap<Frontend, Programmed> = BTreeMap::new();
        for (key, value) in &contents.services {
            let Some(protocol) = Protocol::from_number(key.proto) else { continue };
            let frontend = Frontend {
                addr: std::net::Ipv4Addr::from(key.addr.to_ne_bytes()),
                port: u16::from_be(key.port),
                protocol,
            };
            let p = frontends.entry(frontend).or_default();
            if key.slot == 0 {
                p.slot0 = Some(value.count);
                p.rev_nat_id = value.rev_nat_id;
            } else {
                p.slots.insert(key.slot, value.backend_id);
            }
        }
        let mut backend_ids = HashMap::new();
        for (id, b) in &contents.backends {
            let Some(protocol) = Protocol::from_number(b.proto) else { continue };
            let ep = Endpoint { addr: std::net::Ipv4Addr::from(b.addr.to_ne_bytes()), port: u16::from_be(b.port) };
            backend_ids.insert((ep, protocol), *id);
        }
        let used_rev: BTreeSet<u32> = frontends.values().map(|p| p.rev_nat_id).collect();
        let orphan_rev_nat = contents.revnat.iter().map(|(id, _)| *id).filter(|id| !used_rev.contains(id)).collect();
        let max_backend = contents.backends.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let max_rev = contents.revnat.iter().map(|(id, _)| *id).chain(used_rev).max().unwrap_or(0);
        Ok(Self {
            maps,
            frontends,
            backend_ids,
            next_backend_id: max_backend + 1,
            next_rev_nat_id: max_rev + 1,
            orphan_rev_nat,
        })
    }

    /// Programs `table`, writing only what differs from what is programmed.
    pub fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        check_capacity(table)?;
        let mut stats = ApplyStats::default();

        // 1. Frontends no longer wanted, first, so their entries make room for new ones. Within each: slot 0
        //    first, so no new flow starts while the rest goes.
        let gone: Vec<Frontend> = self.frontends.keys().filter(|f| !table.frontends.contains_key(f)).copied().collect();
        for frontend in gone {
            self.remove_frontend(frontend, &mut stats)?;
        }
        for id in std::mem::take(&mut self.orphan_rev_nat) {
            self.maps.delete_revnat(id)?;
            stats.deletes += 1;
        }

        // 2. Backends before any slot that names them.
        let mut wanted_backends: BTreeSet<u32> = BTreeSet::new();
        for (frontend, entry) in &table.frontends {
            for ep in &entry.backends {
                let id = self.backend_id(*ep, frontend.protocol, &mut stats)?;
                wanted_backends.insert(id);
            }
        }

        // 3. New and changed frontends.
        for (frontend, entry) in &table.frontends {
            let ids: Vec<u32> = entry.backends.iter().map(|ep| self.backend_ids[&(*ep, frontend.protocol)]).collect();
            self.program_frontend(*frontend, &ids, &mut stats)?;
        }

        // 4. Backends no slot points at any more.
        let unused: Vec<(BackendKey, u32)> =
            self.backend_ids.iter().filter(|(_, id)| !wanted_backends.contains(id)).map(|(k, id)| (*k, *id)).collect();
        for (key, id) in unused {
            self.maps.delete_backend(id)?;
            self.backend_ids.remove(&key);
            stats.deletes += 1;
        }
        Ok(stats)
    }

    fn backend_id(&mut self, ep: Endpoint, protocol: Protocol, stats: &mut ApplyStats) -> anyhow::Result<u32> {
        if let Some(id) = self.backend_ids.get(&(ep, protocol)) {
            return Ok(*id);
        }
        // Ids are never reused while the agent runs, so a conntrack entry naming a deleted backend can
        // never be mistaken for a new, unrelated one.
        let id = self.next_backend_id;
        let backend = Backend { addr: be_addr(ep.addr), port: ep.port.to_be(), proto: protocol.number(), flags: 0 };
        self.maps.put_backend(id, backend)?;
        self.next_backend_id += 1;
        self.backend_ids.insert((ep, protocol), id);
        stats.writes += 1;
        Ok(id)
    }

    fn program_frontend(&mut self, frontend: Frontend, ids: &[u32], stats: &mut ApplyStats) -> anyhow::Result<()> {
        let count = u16::try_from(ids.len()).map_err(|_| anyhow::anyhow!("{frontend}: more than 65535 backends"))?;
        if !self.frontends.contains_key(&frontend) {
            let rev_nat_id = self.next_rev_nat_id;
            let revnat = RevNat { addr: be_addr(frontend.addr), port: frontend.port.to_be(), pad: 0 };
            self.maps.put_revnat(rev_nat_id, revnat)?;
            self.next_rev_nat_id += 1;
            stats.writes += 1;
            self.frontends.insert(frontend, Programmed { rev_nat_id, slot0: None, slots: BTreeMap::new() });
        }
        let Self { maps, frontends, .. } = self;
        let programmed = frontends.get_mut(&frontend).expect("inserted above");
        let rev_nat_id = programmed.rev_nat_id;

        for (slot, id) in (1..=count).zip(ids) {
            if programmed.slots.get(&slot) != Some(id) {
                let value = ServiceValue { backend_id: *id, rev_nat_id, count: 0, flags: 0 };
                maps.put_service(&service_key(frontend, slot), &value)?;
                programmed.slots.insert(slot, *id);
                stats.writes += 1;
            }
        }
        if programmed.slot0 != Some(count) {
            let value = ServiceValue { backend_id: 0, rev_nat_id, count, flags: 0 };
            maps.put_service(&service_key(frontend, 0), &value)?;
            programmed.slot0 = Some(count);
            stats.writes += 1;
        }
        let extra: Vec<u16> = programmed.slots.range(count + 1..).map(|(slot, _)| *slot).collect();
        for slot in extra {
            maps.delete_service(&service_key(frontend, slot))?;
            programmed.slots.remove(&slot);
            stats.deletes += 1;
        }
        Ok(())
    }

    fn remove_frontend(&mut self, frontend: Frontend, stats: &mut ApplyStats) -> anyhow::Result<()> {
        let Some(programmed) = self.frontends.get_mut(&frontend) else { return Ok(()) };
        if programmed.slot0.is_some() {
            self.maps.delete_service(&service_key(frontend, 0))?;
            programmed.slot0 = None;
            stats.deletes += 1;
        }
        while let Some((slot, _)) = programmed.slots.pop_last() {
            if let Err(e) = self.maps.delete_service(&service_key(frontend, slot)) {
                programmed.slots.insert(slot, 0);
                return Err(e);
            }
            stats.deletes += 1;
        }
        self.maps.delete_revnat(programmed.rev_nat_id)?;
        stats.deletes += 1;
        self.frontends.remove(&frontend);
        Ok(())
    }
}

fn check_capacity(table: &ServiceTable) -> Result<(), TooLarge> {
    let slots: usize = table.frontends.values().map(|e| 1 + e.backends.len()).sum();
    let checks = [
        ("service", slots, capacity::SERVICES),
        ("backend", table.distinct_backends(), capacity::BACKENDS),
        ("reverse-NAT", table.frontends.len(), capacity::REVNAT),
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
