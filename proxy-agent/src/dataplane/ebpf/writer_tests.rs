//! The writer against in-memory maps that check, after every single write, what a packet could see.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use proptest::prelude::*;

use super::*;
use crate::model::{FrontendEntry, FrontendKind, LbAlgorithm, ServicePortName};

/// In-memory maps. After every operation they assert the data path's invariant: a slot 0 with count `n`
/// has slots `1..=n`, each naming an existing backend, and its reverse-NAT entry exists.
#[derive(Default, Clone)]
struct CheckedMaps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    revnat: BTreeMap<u32, RevNat>,
    source_ranges: BTreeSet<(u32, Cidr)>,
    /// Maglev entries: (table, index) → backend id.
    maglev: BTreeMap<(u32, u32), u32>,
    next_ids: NextIds,
    ops: usize,
    /// Fail the operation with this number (counting from 0), to test recovery.
    fail_at: Option<usize>,
}

impl CheckedMaps {
    /// The size of the first table written (every table has the same).
    fn maglev_size(&self) -> usize {
        let Some(((first, _), _)) = self.maglev.first_key_value() else { return 0 };
        self.maglev.keys().filter(|(t, _)| t == first).count()
    }

    fn op(&mut self) -> anyhow::Result<()> {
        let n = self.ops;
        self.ops += 1;
        if self.fail_at == Some(n) {
            anyhow::bail!("injected failure at operation {n}");
        }
        Ok(())
    }

    fn check(&self) {
        for (key, value) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            assert!(self.revnat.contains_key(&value.rev_nat_id), "{key:?}: reverse-NAT entry missing");
            if value.flags & flags::HAS_INTERNAL_SCOPE != 0 {
                let internal = ServiceKey { scope: SCOPE_INTERNAL, ..*key };
                assert!(self.services.contains_key(&internal), "{key:?}: flag points at a missing internal scope");
            }
            if value.flags & flags::SOURCE_RANGES != 0 {
                assert!(
                    self.source_ranges.iter().any(|(id, _)| *id == value.rev_nat_id),
                    "{key:?}: flag points at missing source ranges"
                );
            }
            if value.flags & flags::MAGLEV != 0 {
                let table: Vec<u32> =
                    self.maglev.range((value.backend_id, 0)..(value.backend_id + 1, 0)).map(|(_, id)| *id).collect();
                assert!(!table.is_empty() && table.len() == self.maglev_size(), "{key:?}: Maglev table incomplete");
                assert!(
                    table.iter().all(|id| self.backends.contains_key(id)),
                    "{key:?}: Maglev entry names a missing backend"
                );
            }
            for slot in 1..=value.count {
                let slot_key = ServiceKey { slot, ..*key };
                let entry = self.services.get(&slot_key).unwrap_or_else(|| panic!("{key:?}: slot {slot} missing"));
                assert!(
                    self.backends.contains_key(&entry.backend_id),
                    "{slot_key:?}: backend {} missing",
                    entry.backend_id
                );
            }
        }
    }

    /// The table the maps encode, decoded the way the data path reads it: per frontend, the backends
    /// external and internal traffic get, and the external slot-0 flags.
    fn decode(&self) -> BTreeMap<Frontend, (Vec<Endpoint>, Vec<Endpoint>, u16)> {
        let backends_of = |key: &ServiceKey, count: u16| -> Vec<Endpoint> {
            let mut eps: Vec<Endpoint> = (1..=count)
                .map(|slot| {
                    let b = self.backends[&self.services[&ServiceKey { slot, ..*key }].backend_id];
                    Endpoint { addr: b.addr, port: u16::from_be(b.port), local: b.flags & FLAG_LOCAL != 0 }
                })
                .collect();
            eps.sort();
            eps
        };
        let mut out = BTreeMap::new();
        for (key, value) in self.services.iter().filter(|(k, _)| k.slot == 0 && k.scope == SCOPE_EXTERNAL) {
            let frontend = Frontend {
                addr: key.addr,
                port: u16::from_be(key.port),
                protocol: Protocol::from_number(key.proto).unwrap(),
            };
            let external = backends_of(key, value.count);
            let internal = if value.flags & flags::HAS_INTERNAL_SCOPE == 0 {
                external.clone()
            } else {
                let int_key = ServiceKey { scope: SCOPE_INTERNAL, ..*key };
                backends_of(&int_key, self.services[&int_key].count)
            };
            out.insert(frontend, (external, internal, value.flags));
        }
        out
    }

    /// Nothing is left that the table does not use. Terminating endpoints count as used.
    fn assert_no_garbage(&self, table: &ServiceTable) {
        let mut used_backends = BTreeSet::new();
        let mut used_revnat = BTreeSet::new();
        let terminating: BTreeSet<(IpAddr, u16)> =
            table.frontends.values().flat_map(|e| e.terminating.iter().map(|t| (t.addr, t.port))).collect();
        for (key, value) in &self.services {
            if key.slot == 0 {
                used_revnat.insert(value.rev_nat_id);
                let count = value.count;
                assert!(
                    !self.services.keys().any(|k| k.slot > count && ServiceKey { slot: 0, ..*k } == *key),
                    "{key:?}: slots past the count remain"
                );
            } else {
                assert!(self.services.contains_key(&ServiceKey { slot: 0, ..*key }), "{key:?}: slot without service");
                used_backends.insert(value.backend_id);
            }
        }
        for (id, b) in &self.backends {
            let addr = (b.addr, u16::from_be(b.port));
            assert!(used_backends.contains(id) || terminating.contains(&addr), "unused backend {id} remains");
        }
        assert_eq!(self.revnat.keys().copied().collect::<BTreeSet<_>>(), used_revnat, "unused reverse-NAT entries");
        assert!(self.source_ranges.iter().all(|(id, _)| used_revnat.contains(id)), "orphan source ranges");
    }
}

impl ServiceMaps for &mut CheckedMaps {
    fn put_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        self.op()?;
        self.backends.insert(id, backend);
        self.check();
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.op()?;
        self.backends.remove(&id);
        self.check();
        Ok(())
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        self.op()?;
        self.services.insert(*key, *value);
        self.check();
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        self.op()?;
        self.services.remove(key);
        self.check();
        Ok(())
    }
    fn put_revnat(&mut self, id: u32, revnat: RevNat) -> anyhow::Result<()> {
        self.op()?;
        self.revnat.insert(id, revnat);
        self.check();
        Ok(())
    }
    fn delete_revnat(&mut self, id: u32) -> anyhow::Result<()> {
        self.op()?;
        self.revnat.remove(&id);
        self.check();
        Ok(())
    }
    fn put_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()> {
        self.op()?;
        self.source_ranges.insert((rev_nat_id, range));
        self.check();
        Ok(())
    }
    fn delete_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()> {
        self.op()?;
        self.source_ranges.remove(&(rev_nat_id, range));
        self.check();
        Ok(())
    }
    fn put_maglev(&mut self, table: u32, entries: &[u32]) -> anyhow::Result<()> {
        self.op()?;
        for (index, id) in (0u32..).zip(entries) {
            self.maglev.insert((table, index), *id);
        }
        self.check();
        Ok(())
    }
    fn delete_maglev(&mut self, table: u32, size: u32) -> anyhow::Result<()> {
        self.op()?;
        for index in 0..size {
            self.maglev.remove(&(table, index));
        }
        self.check();
        Ok(())
    }
    fn put_next_ids(&mut self, ids: NextIds) -> anyhow::Result<()> {
        self.op()?;
        self.next_ids = ids;
        Ok(())
    }
    fn dump(&self) -> anyhow::Result<Contents> {
        Ok(Contents {
            next_ids: self.next_ids,
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            revnat: self.revnat.iter().map(|(k, v)| (*k, *v)).collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
        })
    }
}

fn expected(table: &ServiceTable) -> BTreeMap<Frontend, (Vec<Endpoint>, Vec<Endpoint>, u16)> {
    table
        .frontends
        .iter()
        .map(|(f, e)| {
            let mut flags = 0;
            if e.internal != e.external {
                flags |= flags::HAS_INTERNAL_SCOPE;
            }
            if e.masquerade_external {
                flags |= flags::MASQUERADE_EXTERNAL;
            }
            if e.external.reject_when_empty {
                flags |= flags::REJECT_WHEN_EMPTY;
            }
            if e.affinity_timeout.is_some() {
                flags |= flags::AFFINITY;
            }
            if !e.source_ranges.is_empty() {
                flags |= flags::SOURCE_RANGES;
            }
            if e.kind == FrontendKind::ClusterIp {
                flags |= flags::CLUSTER_IP;
            }
            (*f, (e.external.endpoints.clone(), e.internal.endpoints.clone(), flags))
        })
        .collect()
}

fn entry(name: String, external: Vec<Endpoint>, internal: Option<Vec<Endpoint>>) -> FrontendEntry {
    let external = BackendSet { endpoints: external, reject_when_empty: false };
    FrontendEntry {
        service: ServicePortName { namespace: "default".into(), name, port: String::new() },
        kind: FrontendKind::ClusterIp,
        internal: internal
            .map_or_else(|| external.clone(), |endpoints| BackendSet { endpoints, reject_when_empty: false }),
        external,
        terminating: Vec::new(),
        masquerade_external: false,
        affinity_timeout: None,
        lb_algorithm: None,
        source_ranges: Vec::new(),
    }
}

/// Small universes, so tables overlap a lot and every kind of change happens.
fn table_strategy() -> impl Strategy<Value = ServiceTable> {
    let frontend = (0u8..4, prop_oneof![Just(80u16), Just(53)], prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)])
        .prop_map(|(ip, port, protocol)| Frontend { addr: Ipv4Addr::new(10, 32, 0, 1 + ip).into(), port, protocol });
    // Locality follows the address, as it does in a cluster: an endpoint lives on one node.
    let endpoint = (0u8..6, prop_oneof![Just(8080u16), Just(53)]).prop_map(|(ip, port)| Endpoint {
        addr: Ipv4Addr::new(10, 200, 1, 1 + ip).into(),
        port,
        local: ip % 2 == 0,
    });
    let endpoints = prop::collection::btree_set(endpoint, 0..5).prop_map(|s| s.into_iter().collect::<Vec<_>>());
    let policy = (any::<bool>(), any::<bool>(), any::<bool>(), prop::option::of(1u32..100), 0usize..3, any::<bool>());
    let entry_strategy = (endpoints.clone(), endpoints.clone(), endpoints, policy).prop_map(
        |(external, internal, terminating, (split, masq, reject, affinity, ranges, reject_int))| {
            let mut e = entry(String::new(), external, split.then_some(internal));
            e.external.reject_when_empty = reject && e.external.endpoints.is_empty();
            e.internal.reject_when_empty = reject_int && e.internal.endpoints.is_empty();
            e.terminating = terminating;
            e.masquerade_external = masq;
            e.affinity_timeout = affinity;
            e.source_ranges =
                (0..ranges).map(|i| (Ipv4Addr::new(192, 0, 2, 0).into(), 24 + u8::try_from(i).unwrap())).collect();
            e
        },
    );
    prop::collection::btree_map(frontend, entry_strategy, 0..6)
        .prop_map(|m| ServiceTable { frontends: m, service_cidrs: Vec::new() })
}

proptest! {
    /// Any sequence of tables: every intermediate state is safe, and each apply ends exactly at its table.
    #[test]
    fn every_write_is_safe_and_each_apply_reaches_its_table(tables in prop::collection::vec(table_strategy(), 1..6)) {
        let mut maps = CheckedMaps::default();
        let mut writer = TableWriter::adopt(&mut maps).unwrap();
        for table in &tables {
            writer.apply(table).unwrap();
            drop(writer);
            prop_assert_eq!(maps.decode(), expected(table));
            maps.assert_no_garbage(table);
            writer = TableWriter::adopt(&mut maps).unwrap();
        }
    }

    /// A write that fails half-way leaves a safe state, and the next apply completes the job.
    #[test]
    fn a_failed_apply_is_safe_and_the_next_one_recovers(
        first in table_strategy(),
        second in table_strategy(),
        fail_at in 0usize..40,
    ) {
        let mut maps = CheckedMaps::default();
        TableWriter::adopt(&mut maps).unwrap().apply(&first).unwrap();
        maps.fail_at = Some(maps.ops + fail_at);
        let mut writer = TableWriter::adopt(&mut maps).unwrap();
        let _ = writer.apply(&second);
        writer.apply(&second).unwrap();
        drop(writer);
        prop_assert_eq!(maps.decode(), expected(&second));
        maps.assert_no_garbage(&second);
    }
}

/// The frontends whose entries differ between two tables: what the incremental model reports.
fn differing(before: &ServiceTable, after: &ServiceTable) -> BTreeSet<Frontend> {
    before
        .frontends
        .keys()
        .chain(after.frontends.keys())
        .filter(|f| before.frontends.get(f) != after.frontends.get(f))
        .copied()
        .collect()
}

proptest! {
    /// Writing only the frontends that changed ends at the same maps as writing the whole table, with every
    /// intermediate state safe; a failure part-way makes the next call apply the whole table.
    #[test]
    fn applying_only_the_changes_reaches_each_table(
        tables in prop::collection::vec(table_strategy(), 1..8),
        fail_at in prop::option::of(0usize..40),
    ) {
        let mut maps = CheckedMaps::default();
        let mut writer = TableWriter::adopt(&mut maps).unwrap();
        let mut before = ServiceTable::default();
        for (i, table) in tables.iter().enumerate() {
            let changed = differing(&before, table);
            if i == tables.len() / 2 && let Some(fail_at) = fail_at {
                writer.maps.fail_at = Some(writer.maps.ops + fail_at);
                let _ = writer.apply_changes(table, &changed);
                writer.maps.fail_at = None;
            }
            writer.apply_changes(table, &changed).unwrap();
            let services = writer.occupancy()[0];
            prop_assert_eq!(services, (proxy_common::maps::SERVICES, writer.maps.services.len()));
            prop_assert_eq!(writer.maps.decode(), expected(table));
            writer.maps.assert_no_garbage(table);
            before = table.clone();
        }
    }
}

/// (service IP, port, backend IPs)
type TableSpec<'a> = &'a [([u8; 4], u16, &'a [[u8; 4]])];

fn table(entries: TableSpec<'_>) -> ServiceTable {
    let mut t = ServiceTable::default();
    for (ip, port, backends) in entries {
        let f = Frontend { addr: Ipv4Addr::from(*ip).into(), port: *port, protocol: Protocol::Tcp };
        let backends =
            backends.iter().map(|b| Endpoint { addr: Ipv4Addr::from(*b).into(), port: 8080, local: false }).collect();
        t.frontends.insert(f, entry("web".into(), backends, None));
    }
    t
}

#[test]
fn reapplying_the_same_table_writes_nothing_even_after_a_restart() {
    let t = table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 1], [10, 200, 1, 2]])]);
    let mut maps = CheckedMaps::default();
    let stats = TableWriter::adopt(&mut maps).unwrap().apply(&t).unwrap();
    // 2 backends, 1 reverse-NAT entry, 2 slots and slot 0.
    assert_eq!(stats, ApplyStats { writes: 6, deletes: 0 });
    let mut restarted = TableWriter::adopt(&mut maps).unwrap();
    assert_eq!(restarted.apply(&t).unwrap(), ApplyStats::default());
}

#[test]
fn one_endpoint_change_is_one_slot_write_and_one_backend_write() {
    let before = table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 1], [10, 200, 1, 2]])]);
    let after = table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 1], [10, 200, 1, 3]])]);
    let mut maps = CheckedMaps::default();
    let mut writer = TableWriter::adopt(&mut maps).unwrap();
    writer.apply(&before).unwrap();
    // New backend, its slot, and the old backend's removal.
    assert_eq!(writer.apply(&after).unwrap(), ApplyStats { writes: 2, deletes: 1 });
}

#[test]
fn backend_ids_are_not_reused_even_across_a_restart() {
    let mut maps = CheckedMaps::default();
    TableWriter::adopt(&mut maps)
        .unwrap()
        .apply(&table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 1], [10, 200, 1, 2]])]))
        .unwrap();
    TableWriter::adopt(&mut maps).unwrap().apply(&table(&[([10, 32, 0, 1], 80, &[])])).unwrap();
    // A new agent: no backend left in the map, yet the next one must not get id 1 or 2 back.
    TableWriter::adopt(&mut maps).unwrap().apply(&table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 9]])])).unwrap();
    assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), vec![3]);
}

/// Two Services selecting one pod: the pod has an id per Service, so the pod leaving one Service deletes
/// that Service's id (its flows move on) and leaves the other's; a restarted writer keeps both ids.
#[test]
fn each_service_port_has_its_own_backend_ids() {
    let pod = Endpoint { addr: Ipv4Addr::new(10, 200, 1, 1).into(), port: 53, local: false };
    let other = Endpoint { addr: Ipv4Addr::new(10, 200, 1, 2).into(), port: 53, local: false };
    let fa = Frontend { addr: Ipv4Addr::new(10, 32, 0, 10).into(), port: 53, protocol: Protocol::Udp };
    let fb = Frontend { addr: Ipv4Addr::new(10, 32, 0, 11).into(), port: 53, protocol: Protocol::Udp };
    let both = |a: Vec<Endpoint>| {
        let mut t = ServiceTable::default();
        t.frontends.insert(fa, entry("dns".into(), a, None));
        t.frontends.insert(fb, entry("dns-canary".into(), vec![pod], None));
        t
    };
    let mut maps = CheckedMaps::default();
    let mut writer = TableWriter::adopt(&mut maps).unwrap();
    writer.apply(&both(vec![pod])).unwrap();
    assert_eq!(writer.maps.backends.len(), 2, "one id per Service for the same pod");
    let id_of = |maps: &CheckedMaps, f: Frontend| {
        let key = ServiceKey::new(f.addr, f.port.to_be(), 17, SCOPE_EXTERNAL, 1);
        maps.services[&key].backend_id
    };
    let (a_before, b_before) = (id_of(writer.maps, fa), id_of(writer.maps, fb));
    assert_ne!(a_before, b_before);
    let changed: BTreeSet<Frontend> = [fa].into();
    writer.apply_changes(&both(vec![other]), &changed).unwrap();
    assert!(!writer.maps.backends.contains_key(&a_before), "the pod left dns: its dns id is gone");
    assert!(writer.maps.backends.contains_key(&b_before), "dns-canary still has the pod under its own id");
    drop(writer);
    let (a_now, b_now) = (id_of(&maps, fa), id_of(&maps, fb));
    let stats = TableWriter::adopt(&mut maps).unwrap().apply(&both(vec![other])).unwrap();
    assert_eq!(stats, ApplyStats::default(), "a restarted writer adopts every id");
    assert_eq!((id_of(&maps, fa), id_of(&maps, fb)), (a_now, b_now));
    maps.assert_no_garbage(&both(vec![other]));
}

/// A Maglev frontend: its table is written whole before slot 0 names it; a change of backends writes a new
/// table, points slot 0 at it, then deletes the old one (the checked maps verify after every write that a
/// Maglev slot 0 names a complete table of existing backends); an unchanged apply, or a restarted writer,
/// writes nothing; removing the frontend removes its table.
#[test]
fn a_maglev_table_is_swapped_whole() {
    let settings = MaglevSettings { external_default: LbAlgorithm::Maglev, table_size: 251 };
    let lb = Frontend { addr: Ipv4Addr::new(192, 0, 2, 10).into(), port: 80, protocol: Protocol::Tcp };
    let eps = |n: u8| {
        (1..=n).map(|i| Endpoint { addr: Ipv4Addr::new(10, 200, 1, i).into(), port: 8080, local: false }).collect()
    };
    let with = |n: u8| {
        let mut e = entry("web".into(), eps(n), None);
        e.kind = FrontendKind::LoadBalancer;
        let mut t = ServiceTable::default();
        t.frontends.insert(lb, e);
        t
    };
    let mut maps = CheckedMaps::default();
    let mut writer = TableWriter::adopt(&mut maps).unwrap().with_maglev(settings);
    writer.apply(&with(3)).unwrap();
    assert_eq!(writer.maps.maglev.len(), 251);
    assert_eq!(writer.apply(&with(3)).unwrap(), ApplyStats::default(), "unchanged: nothing written");
    let changed: BTreeSet<Frontend> = [lb].into();
    writer.apply_changes(&with(4), &changed).unwrap();
    assert_eq!(writer.maps.maglev.len(), 251, "the old table is gone once the new one is in use");
    drop(writer);
    let stats = TableWriter::adopt(&mut maps).unwrap().with_maglev(settings).apply(&with(4)).unwrap();
    assert_eq!(stats, ApplyStats::default(), "a restarted writer keeps the table");
    TableWriter::adopt(&mut maps).unwrap().with_maglev(settings).apply(&ServiceTable::default()).unwrap();
    assert!(maps.maglev.is_empty(), "a removed frontend's table is deleted");
    // A ClusterIP stays random unless its Service asks.
    let mut t = table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 1]])]);
    TableWriter::adopt(&mut maps).unwrap().with_maglev(settings).apply(&t).unwrap();
    assert!(maps.maglev.is_empty());
    t.frontends.values_mut().for_each(|e| e.lb_algorithm = Some(LbAlgorithm::Maglev));
    TableWriter::adopt(&mut maps).unwrap().with_maglev(settings).apply(&t).unwrap();
    assert_eq!(maps.maglev.len(), 251, "the annotation asks for Maglev");
}

#[test]
fn backend_ids_are_not_reused_after_a_backend_is_removed() {
    let mut maps = CheckedMaps::default();
    let mut writer = TableWriter::adopt(&mut maps).unwrap();
    writer.apply(&table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 1]])])).unwrap();
    writer.apply(&table(&[([10, 32, 0, 1], 80, &[])])).unwrap();
    writer.apply(&table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 9]])])).unwrap();
    drop(writer);
    assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), vec![2]);
}

#[test]
fn a_table_larger_than_the_maps_is_refused_before_any_write() {
    let mut big = ServiceTable::default();
    for i in 0..=capacity::REVNAT {
        let f = Frontend { addr: Ipv4Addr::from(0x0a20_0000 + i).into(), port: 80, protocol: Protocol::Tcp };
        let backend = Endpoint { addr: Ipv4Addr::from(0x0a00_0000 + i).into(), port: 80, local: false };
        big.frontends.insert(f, entry("big".into(), vec![backend], None));
    }
    let mut maps = CheckedMaps::default();
    let err = TableWriter::adopt(&mut maps).unwrap().apply(&big).unwrap_err();
    assert!(err.to_string().contains("reverse-NAT"), "{err}");
    assert_eq!(maps.ops, 0, "nothing may be written");
}

#[test]
fn a_full_reconcile_repairs_entries_removed_behind_the_writers_back() {
    let t = table(&[([10, 32, 0, 1], 80, &[[10, 200, 1, 1], [10, 200, 1, 2]])]);
    let mut maps = CheckedMaps::default();
    let mut writer = TableWriter::adopt(&mut maps).unwrap();
    writer.apply(&t).unwrap();
    // Someone deletes slot 2 and adds a stray backend (the writer's memory still says all is well).
    writer.maps.services.retain(|k, _| k.slot != 2);
    writer
        .maps
        .services
        .get_mut(&ServiceKey::new(Ipv4Addr::new(10, 32, 0, 1).into(), 80u16.to_be(), 6, SCOPE_EXTERNAL, 0))
        .unwrap()
        .count = 1;
    writer.maps.backends.insert(999, Backend { addr: Ipv4Addr::new(1, 0, 0, 0).into(), port: 1, proto: 6, flags: 0 });
    assert_eq!(writer.apply(&t).unwrap(), ApplyStats::default(), "a plain apply trusts its memory");
    writer.reread().unwrap();
    let stats = writer.apply(&t).unwrap();
    assert_eq!(stats, ApplyStats { writes: 2, deletes: 1 }, "slot 2 and the count back; the stray backend gone");
    drop(writer);
    assert_eq!(maps.decode(), expected(&t));
    maps.assert_no_garbage(&t);
}

/// Maps that accept every write and keep nothing: the writer's own cost, without the kernel's.
struct NullMaps;

impl ServiceMaps for NullMaps {
    fn put_backend(&mut self, _: u32, _: Backend) -> anyhow::Result<()> {
        Ok(())
    }
    fn delete_backend(&mut self, _: u32) -> anyhow::Result<()> {
        Ok(())
    }
    fn put_service(&mut self, _: &ServiceKey, _: &ServiceValue) -> anyhow::Result<()> {
        Ok(())
    }
    fn delete_service(&mut self, _: &ServiceKey) -> anyhow::Result<()> {
        Ok(())
    }
    fn put_revnat(&mut self, _: u32, _: RevNat) -> anyhow::Result<()> {
        Ok(())
    }
    fn delete_revnat(&mut self, _: u32) -> anyhow::Result<()> {
        Ok(())
    }
    fn put_source_range(&mut self, _: u32, _: Cidr) -> anyhow::Result<()> {
        Ok(())
    }
    fn delete_source_range(&mut self, _: u32, _: Cidr) -> anyhow::Result<()> {
        Ok(())
    }
    fn put_maglev(&mut self, _: u32, _: &[u32]) -> anyhow::Result<()> {
        Ok(())
    }
    fn delete_maglev(&mut self, _: u32, _: u32) -> anyhow::Result<()> {
        Ok(())
    }
    fn put_next_ids(&mut self, _: NextIds) -> anyhow::Result<()> {
        Ok(())
    }
    fn dump(&self) -> anyhow::Result<Contents> {
        Ok(Contents::default())
    }
}

/// Not a test: the writer's own time for a large table. `cargo test --release -p proxy-agent
/// writer_at_scale -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn writer_at_scale() {
    let mut t = ServiceTable::default();
    for i in 0..100_000u32 {
        let f = Frontend { addr: Ipv4Addr::from(0x0a60_0000 + i).into(), port: 80, protocol: Protocol::Tcp };
        let eps = (0..10).map(|k| Endpoint {
            addr: Ipv4Addr::from(0x0a40_0000 + i * 16 + k).into(),
            port: 8080,
            local: false,
        });
        t.frontends.insert(f, entry(format!("svc-{i}"), eps.collect(), None));
    }
    let before = crate::testing::resident_mib();
    let mut writer = TableWriter::adopt(NullMaps).unwrap();
    let started = std::time::Instant::now();
    let stats = writer.apply(&t).unwrap();
    eprintln!(
        "100000 frontends × 10: {} writes in {:?} of the writer's own time; its memory {:.0} MiB",
        stats.writes,
        started.elapsed(),
        crate::testing::resident_mib() - before
    );
}
