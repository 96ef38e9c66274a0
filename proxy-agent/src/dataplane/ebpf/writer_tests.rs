//! The writer against in-memory maps that check, after every single write, what a packet could see.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use proptest::prelude::*;

use super::*;
use crate::model::{FrontendEntry, ServicePortName};

/// In-memory maps. After every operation they assert the data path's invariant: a slot 0 with count `n`
/// has slots `1..=n`, each naming an existing backend, and its reverse-NAT entry exists.
#[derive(Default, Clone)]
struct CheckedMaps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    revnat: BTreeMap<u32, RevNat>,
    ops: usize,
    /// Fail the operation with this number (counting from 0), to test recovery.
    fail_at: Option<usize>,
}

impl CheckedMaps {
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

    /// The table the maps encode, decoded the way the data path reads it.
    fn decode(&self) -> BTreeMap<Frontend, Vec<Endpoint>> {
        let mut out = BTreeMap::new();
        for (key, value) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            let frontend = Frontend {
                addr: Ipv4Addr::from(key.addr.to_ne_bytes()),
                port: u16::from_be(key.port),
                protocol: Protocol::from_number(key.proto).unwrap(),
            };
            let mut backends: Vec<Endpoint> = (1..=value.count)
                .map(|slot| {
                    let b = self.backends[&self.services[&ServiceKey { slot, ..*key }].backend_id];
                    Endpoint { addr: Ipv4Addr::from(b.addr.to_ne_bytes()), port: u16::from_be(b.port) }
                })
                .collect();
            backends.sort();
            out.insert(frontend, backends);
        }
        out
    }

    /// Nothing is left that the table does not use.
    fn assert_no_garbage(&self) {
        let mut used_backends = BTreeSet::new();
        let mut used_revnat = BTreeSet::new();
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
        assert_eq!(self.backends.keys().copied().collect::<BTreeSet<_>>(), used_backends, "unused backends remain");
        assert_eq!(self.revnat.keys().copied().collect::<BTreeSet<_>>(), used_revnat, "unused reverse-NAT entries");
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
    fn dump(&self) -> anyhow::Result<Contents> {
        Ok(Contents {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            revnat: self.revnat.iter().map(|(k, v)| (*k, *v)).collect(),
        })
    }
}

fn expected(table: &ServiceTable) -> BTreeMap<Frontend, Vec<Endpoint>> {
    table.frontends.iter().map(|(f, e)| (*f, e.backends.clone())).collect()
}

/// Small universes, so tables overlap a lot and every kind of change happens.
fn table_strategy() -> impl Strategy<Value = ServiceTable> {
    let frontend = (0u8..4, prop_oneof![Just(80u16), Just(53)], prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)])
        .prop_map(|(ip, port, protocol)| Frontend { addr: Ipv4Addr::new(10, 32, 0, 1 + ip), port, protocol });
    let endpoint = (0u8..6, prop_oneof![Just(8080u16), Just(53)])
        .prop_map(|(ip, port)| Endpoint { addr: Ipv4Addr::new(10, 200, 1, 1 + ip), port });
    prop::collection::btree_map(frontend, prop::collection::btree_set(endpoint, 0..5), 0..6).prop_map(|m| {
        ServiceTable {
            frontends: m
                .into_iter()
                .map(|(f, eps)| {
                    let service = ServicePortName {
                        namespace: "default".into(),
                        name: format!("svc-{}", f.addr),
                        port: String::new(),
                    };
                    (f, FrontendEntry { service, backends: eps.into_iter().collect() })
                })
                .collect(),
        }
    })
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
            maps.assert_no_garbage();
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
        maps.assert_no_garbage();
    }
}

/// (service IP, port, backend IPs)
type TableSpec<'a> = &'a [([u8; 4], u16, &'a [[u8; 4]])];

fn table(entries: TableSpec<'_>) -> ServiceTable {
    let mut t = ServiceTable::default();
    for (ip, port, backends) in entries {
        let f = Frontend { addr: Ipv4Addr::from(*ip), port: *port, protocol: Protocol::Tcp };
        let backends = backends.iter().map(|b| Endpoint { addr: Ipv4Addr::from(*b), port: 8080 }).collect();
        let service = ServicePortName { namespace: "default".into(), name: "web".into(), port: String::new() };
        t.frontends.insert(f, FrontendEntry { service, backends });
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
    let service = ServicePortName { namespace: "default".into(), name: "big".into(), port: String::new() };
    let many: Vec<Endpoint> =
        (0..=capacity::REVNAT).map(|i| Endpoint { addr: Ipv4Addr::from(0x0a00_0000 + i), port: 80 }).collect();
    for i in 0..=capacity::REVNAT {
        let f = Frontend { addr: Ipv4Addr::from(0x0a20_0000 + i), port: 80, protocol: Protocol::Tcp };
        big.frontends.insert(f, FrontendEntry { service: service.clone(), backends: vec![many[i as usize]] });
    }
    let mut maps = CheckedMaps::default();
    let err = TableWriter::adopt(&mut maps).unwrap().apply(&big).unwrap_err();
    assert!(err.to_string().contains("reverse-NAT"), "{err}");
    assert_eq!(maps.ops, 0, "nothing may be written");
}
