//! The `FRONTEND_ADDRS` map: every address a ClusterIP, external IP or load-balancer IP lives on, so the
//! data path can tell a later IPv4 fragment that arrived before its first fragment and is bound for a
//! Service (dropped: without ports it cannot be translated, and it must not leave by the default route)
//! from the node's other traffic (passed). NodePort addresses are the node's own and are left out: a
//! packet to them is delivered locally, never forwarded.
//!
//! Kept after the service maps are written, from the same table: a moment's lag only changes what happens
//! to such a fragment, never to a translated flow.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use anyhow::Context as _;

use crate::model::{Frontend, FrontendKind, ServiceTable};

/// The addresses the map must hold, by the frontends that put them there.
pub trait AddrMap {
    fn put(&mut self, addr: Ipv4Addr) -> anyhow::Result<()>;
    fn delete(&mut self, addr: Ipv4Addr) -> anyhow::Result<()>;
    fn keys(&self) -> anyhow::Result<Vec<Ipv4Addr>>;
}

pub struct FrontendAddrs<M> {
    map: M,
    /// Frontends counted, and how many of them each address has.
    counted: HashSet<Frontend>,
    counts: HashMap<Ipv4Addr, u32>,
    /// Addresses found in the map at start-up that no applied table has claimed yet.
    adopted: BTreeSet<Ipv4Addr>,
}

fn counts_for(kind: FrontendKind) -> bool {
    kind != FrontendKind::NodePort
}

impl<M: AddrMap> FrontendAddrs<M> {
    /// Adopts what a previous agent left: kept until the first whole table says otherwise.
    pub fn adopt(map: M) -> anyhow::Result<Self> {
        let adopted = map.keys()?.into_iter().collect();
        Ok(Self { map, counted: HashSet::new(), counts: HashMap::new(), adopted })
    }

    /// After a whole table was applied.
    pub fn sync_all(&mut self, table: &ServiceTable) -> anyhow::Result<()> {
        let mut counts: HashMap<Ipv4Addr, u32> = HashMap::new();
        let mut counted = HashSet::new();
        for (frontend, entry) in &table.frontends {
            if counts_for(entry.kind) {
                counted.insert(*frontend);
                *counts.entry(frontend.addr).or_default() += 1;
            }
        }
        for addr in counts.keys().filter(|a| !self.counts.contains_key(a) && !self.adopted.contains(a)) {
            self.map.put(*addr)?;
        }
        let gone: Vec<Ipv4Addr> =
            self.counts.keys().chain(&self.adopted).filter(|a| !counts.contains_key(a)).copied().collect();
        for addr in gone {
            self.map.delete(addr)?;
        }
        self.adopted.clear();
        self.counts = counts;
        self.counted = counted;
        Ok(())
    }

    /// After only the `changed` frontends were applied.
    pub fn sync_changed(&mut self, table: &ServiceTable, changed: &BTreeSet<Frontend>) -> anyhow::Result<()> {
        for frontend in changed {
            let wanted = table.frontends.get(frontend).is_some_and(|e| counts_for(e.kind));
            if wanted && !self.counted.contains(frontend) {
                let count = self.counts.entry(frontend.addr).or_default();
                if *count == 0 && !self.adopted.remove(&frontend.addr) {
                    self.map.put(frontend.addr)?;
                }
                *count += 1;
                self.counted.insert(*frontend);
            } else if !wanted && self.counted.remove(frontend) {
                let count = self.counts.get_mut(&frontend.addr).context("a counted frontend has a count")?;
                *count -= 1;
                if *count == 0 {
                    self.counts.remove(&frontend.addr);
                    self.map.delete(frontend.addr)?;
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn map(&self) -> &M {
        &self.map
    }
}

/// The pinned map.
pub struct AyaAddrMap(pub aya::maps::HashMap<aya::maps::MapData, u32, u32>);

fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

impl AddrMap for AyaAddrMap {
    fn put(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
        self.0.insert(&be(addr), &1, 0).with_context(|| format!("writing {addr} to FRONTEND_ADDRS"))
    }

    fn delete(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
        match self.0.remove(&be(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {addr} from FRONTEND_ADDRS")),
        }
    }

    fn keys(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
        self.0.keys().map(|k| Ok(Ipv4Addr::from(k.context("reading FRONTEND_ADDRS")?.to_ne_bytes()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSet, FrontendEntry, Protocol, ServicePortName};

    #[derive(Default)]
    struct Memory(BTreeSet<Ipv4Addr>);

    impl AddrMap for Memory {
        fn put(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
            self.0.insert(addr);
            Ok(())
        }
        fn delete(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
            self.0.remove(&addr);
            Ok(())
        }
        fn keys(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
            Ok(self.0.iter().copied().collect())
        }
    }

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend { addr: Ipv4Addr::new(10, 32, 0, last), port, protocol: Protocol::Tcp }
    }

    fn table(entries: &[(Frontend, FrontendKind)]) -> ServiceTable {
        let mut t = ServiceTable::default();
        for (f, kind) in entries {
            let entry = FrontendEntry {
                service: ServicePortName { namespace: "default".into(), name: "svc".into(), port: String::new() },
                kind: *kind,
                external: BackendSet::default(),
                internal: BackendSet::default(),
                terminating: Vec::new(),
                masquerade_external: false,
                affinity_timeout: None,
                source_ranges: Vec::new(),
            };
            t.frontends.insert(*f, entry);
        }
        t
    }

    fn held(addrs: &FrontendAddrs<Memory>) -> Vec<u8> {
        addrs.map().0.iter().map(|a| a.octets()[3]).collect()
    }

    #[test]
    fn an_address_is_held_while_any_of_its_frontends_is_not_a_node_port() {
        let (a80, a53, b80, node) = (frontend(1, 80), frontend(1, 53), frontend(2, 80), frontend(9, 30080));
        let mut addrs = FrontendAddrs::adopt(Memory::default()).unwrap();
        let all = table(&[
            (a80, FrontendKind::ClusterIp),
            (a53, FrontendKind::ClusterIp),
            (b80, FrontendKind::LoadBalancer),
            (node, FrontendKind::NodePort),
        ]);
        addrs.sync_all(&all).unwrap();
        assert_eq!(held(&addrs), [1, 2], "NodePort addresses are the node's own: not held");

        let without_a80 = table(&[(a53, FrontendKind::ClusterIp), (b80, FrontendKind::LoadBalancer)]);
        addrs.sync_changed(&without_a80, &[a80, node].into()).unwrap();
        assert_eq!(held(&addrs), [1, 2], "10.32.0.1 still has a frontend");
        let only_b = table(&[(b80, FrontendKind::LoadBalancer)]);
        addrs.sync_changed(&only_b, &[a53].into()).unwrap();
        assert_eq!(held(&addrs), [2]);
        addrs
            .sync_changed(&table(&[(b80, FrontendKind::LoadBalancer), (a80, FrontendKind::ExternalIp)]), &[a80].into())
            .unwrap();
        assert_eq!(held(&addrs), [1, 2]);
    }

    #[test]
    fn a_restarted_agent_keeps_what_it_finds_until_a_whole_table_says_otherwise() {
        let mut left = Memory::default();
        left.put(Ipv4Addr::new(10, 32, 0, 1)).unwrap();
        left.put(Ipv4Addr::new(10, 32, 0, 7)).unwrap();
        let mut addrs = FrontendAddrs::adopt(left).unwrap();
        addrs.sync_all(&table(&[(frontend(1, 80), FrontendKind::ClusterIp)])).unwrap();
        assert_eq!(held(&addrs), [1], "the stale 10.32.0.7 goes, 10.32.0.1 stays");
    }
}
