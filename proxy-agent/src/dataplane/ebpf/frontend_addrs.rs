//! The `FRONTEND_ADDRS` and `FRONTEND_ADDRS6` maps: every address a ClusterIP, external IP or load-balancer IP lives on, with what
//! lives there (`proxy_common::frontend_addr`). The data path uses it twice. A later IPv4 fragment that
//! arrived before its first and is bound for a Service is dropped (without ports it cannot be translated,
//! and it must not leave by the default route), while the node's other fragments pass. And a packet to a
//! ClusterIP on a port or protocol no Service defines is refused (ICMP port unreachable), as kube-proxy's
//! nftables mode does. NodePort addresses are the node's own and are left out: a packet to them is
//! delivered locally, never forwarded.
//!
//! Kept after the service maps are written, from the same table: a moment's lag only changes what happens
//! to such a packet, never to a translated flow. The data path also asks the FIB whether such a fragment
//! would be forwarded at all, so an external IP that is one of the node's own addresses costs the node's
//! own traffic nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use anyhow::Context as _;
use proxy_common::frontend_addr;

use crate::model::{Frontend, FrontendKind, ServiceTable};

/// The addresses the map holds, each with its `proxy_common::frontend_addr` bits.
pub trait AddrMap {
    fn put(&mut self, addr: IpAddr, bits: u32) -> anyhow::Result<()>;
    fn delete(&mut self, addr: IpAddr) -> anyhow::Result<()>;
    fn entries(&self) -> anyhow::Result<Vec<(IpAddr, u32)>>;
}

/// How many counted frontends an address has, and how many of them are ClusterIPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    frontends: u32,
    cluster_ips: u32,
}

impl Count {
    fn bits(self) -> u32 {
        let cluster_ip = if self.cluster_ips > 0 { frontend_addr::CLUSTER_IP } else { 0 };
        frontend_addr::SERVICE | cluster_ip
    }

    fn add(&mut self, kind: FrontendKind, by: i32) {
        self.frontends = self.frontends.saturating_add_signed(by);
        if kind == FrontendKind::ClusterIp {
            self.cluster_ips = self.cluster_ips.saturating_add_signed(by);
        }
    }
}

pub struct FrontendAddrs<M> {
    map: M,
    /// Frontends counted (with their kind), and each address's counts, as the map holds them.
    counted: HashMap<Frontend, FrontendKind>,
    counts: HashMap<IpAddr, Count>,
}

fn counts_for(kind: FrontendKind) -> bool {
    kind != FrontendKind::NodePort
}

impl<M: AddrMap> FrontendAddrs<M> {
    /// What a previous agent left stays until the first whole table is applied.
    pub fn new(map: M) -> Self {
        Self { map, counted: HashMap::new(), counts: HashMap::new() }
    }

    /// After a whole table was applied: the map is read back and made to hold exactly the table's
    /// addresses and bits, whatever it held (left by a previous agent, or by a sync that failed part-way).
    pub fn sync_all(&mut self, table: &ServiceTable) -> anyhow::Result<()> {
        let mut counts: HashMap<IpAddr, Count> = HashMap::new();
        let mut counted = HashMap::new();
        for (frontend, entry) in &table.frontends {
            if counts_for(entry.kind) {
                counted.insert(*frontend, entry.kind);
                counts.entry(frontend.addr).or_default().add(entry.kind, 1);
            }
        }
        // Until this succeeds, the next incremental sync must not trust the counts.
        self.counted.clear();
        self.counts.clear();
        let held: BTreeMap<IpAddr, u32> = self.map.entries()?.into_iter().collect();
        for (addr, count) in &counts {
            if held.get(addr) != Some(&count.bits()) {
                self.map.put(*addr, count.bits())?;
            }
        }
        for addr in held.keys().filter(|a| !counts.contains_key(a)) {
            self.map.delete(*addr)?;
        }
        self.counts = counts;
        self.counted = counted;
        Ok(())
    }

    /// After only the `changed` frontends were applied. Counts change only once the map did.
    pub fn sync_changed(&mut self, table: &ServiceTable, changed: &BTreeSet<Frontend>) -> anyhow::Result<()> {
        for frontend in changed {
            let wanted = table.frontends.get(frontend).map(|e| e.kind).filter(|k| counts_for(*k));
            let held = self.counted.get(frontend).copied();
            if wanted == held {
                continue;
            }
            let addr = frontend.addr;
            let before = self.counts.get(&addr).copied().unwrap_or_default();
            let mut after = before;
            if let Some(kind) = held {
                after.add(kind, -1);
            }
            if let Some(kind) = wanted {
                after.add(kind, 1);
            }
            if after.frontends == 0 {
                self.map.delete(addr)?;
                self.counts.remove(&addr);
            } else {
                if before.frontends == 0 || before.bits() != after.bits() {
                    self.map.put(addr, after.bits())?;
                }
                self.counts.insert(addr, after);
            }
            match wanted {
                Some(kind) => self.counted.insert(*frontend, kind),
                None => self.counted.remove(frontend),
            };
        }
        Ok(())
    }

    #[cfg(test)]
    fn map(&self) -> &M {
        &self.map
    }
}

/// The pinned maps, one per family.
pub struct AyaAddrMap {
    pub v4: aya::maps::HashMap<aya::maps::MapData, u32, u32>,
    pub v6: aya::maps::HashMap<aya::maps::MapData, proxy_common::addr::In6, u32>,
}

fn absent_ok(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

impl AddrMap for AyaAddrMap {
    fn put(&mut self, addr: IpAddr, bits: u32) -> anyhow::Result<()> {
        use super::maps::MapAddr as _;
        match addr {
            IpAddr::V4(_) => self.v4.insert(&u32::from_ip(addr).unwrap_or_default(), &bits, 0),
            IpAddr::V6(_) => self.v6.insert(&proxy_common::addr::In6::from_ip(addr).unwrap_or_default(), &bits, 0),
        }
        .with_context(|| format!("writing {addr} to the frontend-address map"))
    }

    fn delete(&mut self, addr: IpAddr) -> anyhow::Result<()> {
        use super::maps::MapAddr as _;
        match addr {
            IpAddr::V4(_) => absent_ok(self.v4.remove(&u32::from_ip(addr).unwrap_or_default())),
            IpAddr::V6(_) => absent_ok(self.v6.remove(&proxy_common::addr::In6::from_ip(addr).unwrap_or_default())),
        }
        .with_context(|| format!("deleting {addr} from the frontend-address map"))
    }

    fn entries(&self) -> anyhow::Result<Vec<(IpAddr, u32)>> {
        use super::maps::MapAddr as _;
        let mut out = Vec::new();
        for e in &self.v4 {
            let (k, v) = e.context("reading FRONTEND_ADDRS")?;
            out.push((k.to_ip(), v));
        }
        for e in &self.v6 {
            let (k, v) = e.context("reading FRONTEND_ADDRS6")?;
            out.push((k.to_ip(), v));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{BackendSet, FrontendEntry, Protocol, ServicePortName};

    #[derive(Default)]
    struct Memory(BTreeMap<IpAddr, u32>);

    impl AddrMap for Memory {
        fn put(&mut self, addr: IpAddr, bits: u32) -> anyhow::Result<()> {
            self.0.insert(addr, bits);
            Ok(())
        }
        fn delete(&mut self, addr: IpAddr) -> anyhow::Result<()> {
            self.0.remove(&addr);
            Ok(())
        }
        fn entries(&self) -> anyhow::Result<Vec<(IpAddr, u32)>> {
            Ok(self.0.iter().map(|(a, b)| (*a, *b)).collect())
        }
    }

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend { addr: Ipv4Addr::new(10, 32, 0, last).into(), port, protocol: Protocol::Tcp }
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
                lb_algorithm: None,
                source_ranges: Vec::new(),
            };
            t.frontends.insert(*f, entry);
        }
        t
    }

    fn last_octet(addr: &IpAddr) -> u8 {
        match addr {
            IpAddr::V4(a) => a.octets()[3],
            IpAddr::V6(a) => a.octets()[15],
        }
    }

    fn held(addrs: &FrontendAddrs<Memory>) -> Vec<u8> {
        addrs.map().0.keys().map(last_octet).collect()
    }

    #[test]
    fn an_address_is_held_while_any_of_its_frontends_is_not_a_node_port() {
        let (a80, a53, b80, node) = (frontend(1, 80), frontend(1, 53), frontend(2, 80), frontend(9, 30080));
        let mut addrs = FrontendAddrs::new(Memory::default());
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
    fn an_address_is_marked_a_cluster_ip_while_one_of_its_frontends_is() {
        let (cip, ext) = (frontend(1, 80), frontend(1, 443));
        let bits = |addrs: &FrontendAddrs<Memory>| addrs.map().0.get(&IpAddr::from([10, 32, 0, 1])).copied();
        let mut addrs = FrontendAddrs::new(Memory::default());
        addrs.sync_all(&table(&[(ext, FrontendKind::ExternalIp)])).unwrap();
        assert_eq!(bits(&addrs), Some(frontend_addr::SERVICE));
        let both = table(&[(cip, FrontendKind::ClusterIp), (ext, FrontendKind::ExternalIp)]);
        addrs.sync_changed(&both, &[cip].into()).unwrap();
        assert_eq!(bits(&addrs), Some(frontend_addr::SERVICE | frontend_addr::CLUSTER_IP));
        addrs.sync_changed(&table(&[(cip, FrontendKind::ClusterIp)]), &[ext].into()).unwrap();
        assert_eq!(bits(&addrs), Some(frontend_addr::SERVICE | frontend_addr::CLUSTER_IP));
        addrs.sync_changed(&table(&[(ext, FrontendKind::ExternalIp)]), &[cip, ext].into()).unwrap();
        assert_eq!(bits(&addrs), Some(frontend_addr::SERVICE), "the ClusterIP went, the external IP stays");
    }

    #[test]
    fn a_restarted_agent_keeps_what_it_finds_until_a_whole_table_says_otherwise() {
        let mut left = Memory::default();
        left.put(IpAddr::from([10, 32, 0, 1]), frontend_addr::SERVICE).unwrap();
        left.put(IpAddr::from([10, 32, 0, 7]), frontend_addr::SERVICE).unwrap();
        let mut addrs = FrontendAddrs::new(left);
        addrs.sync_all(&table(&[(frontend(1, 80), FrontendKind::ClusterIp)])).unwrap();
        assert_eq!(held(&addrs), [1], "the stale 10.32.0.7 goes, 10.32.0.1 stays");
        assert_eq!(
            addrs.map().0[&IpAddr::from([10, 32, 0, 1])],
            frontend_addr::SERVICE | frontend_addr::CLUSTER_IP,
            "and gets the bits it lacked"
        );
    }

    /// A map that fails its next write, as a full or broken map would.
    #[derive(Default)]
    struct Flaky {
        inner: Memory,
        fail_next: bool,
    }

    impl AddrMap for Flaky {
        fn put(&mut self, addr: IpAddr, bits: u32) -> anyhow::Result<()> {
            if std::mem::take(&mut self.fail_next) {
                anyhow::bail!("injected failure");
            }
            self.inner.put(addr, bits)
        }
        fn delete(&mut self, addr: IpAddr) -> anyhow::Result<()> {
            if std::mem::take(&mut self.fail_next) {
                anyhow::bail!("injected failure");
            }
            self.inner.delete(addr)
        }
        fn entries(&self) -> anyhow::Result<Vec<(IpAddr, u32)>> {
            self.inner.entries()
        }
    }

    #[test]
    fn a_failed_write_is_repaired_by_the_next_whole_table() {
        let (a, b) = (frontend(1, 80), frontend(2, 80));
        let mut addrs = FrontendAddrs::new(Flaky::default());
        addrs.sync_all(&table(&[(a, FrontendKind::ClusterIp)])).unwrap();
        let both = table(&[(a, FrontendKind::ClusterIp), (b, FrontendKind::ClusterIp)]);
        addrs.map.fail_next = true;
        assert!(addrs.sync_changed(&both, &[b].into()).is_err());
        // The sync loop answers a failure with a whole-table sync.
        addrs.sync_all(&both).unwrap();
        assert_eq!(addrs.map().inner.0.keys().map(last_octet).collect::<Vec<_>>(), [1, 2]);
        addrs.map.fail_next = true;
        assert!(addrs.sync_changed(&table(&[(b, FrontendKind::ClusterIp)]), &[a].into()).is_err());
        addrs.sync_all(&table(&[(b, FrontendKind::ClusterIp)])).unwrap();
        assert_eq!(addrs.map().inner.0.keys().map(last_octet).collect::<Vec<_>>(), [2]);
    }
}
