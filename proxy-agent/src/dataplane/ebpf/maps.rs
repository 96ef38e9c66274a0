//! The service maps of the loaded object, behind [`ServiceMaps`]: each entry goes to its family's map
//! (`SERVICES` or `SERVICES6`, `BACKENDS` or `BACKENDS6`, ...), with the address in that family's form
//! ([`MapAddr`]). Backend and reverse-NAT ids and Maglev tables are numbered across both families, so
//! `IDS` and `MAGLEV` are shared.

use std::net::IpAddr;

use anyhow::Context as _;
use aya::maps::{
    HashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use proxy_common::{
    addr::In6,
    backend::Backend,
    ids::NextIds,
    maglev::MaglevKey,
    maps as names,
    revnat::RevNat,
    service::{ServiceKey, ServiceValue},
    source_range::{SourceRangeKey, prefix_len},
};

use super::writer::{self, Cidr, Contents, ServiceMaps};

/// An address as one family's maps hold it (`proxy_common::addr`).
pub trait MapAddr: proxy_common::pod::MapAddress + Copy + Eq {
    /// The family's address, or `None` for the other family's.
    fn from_ip(addr: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
}

impl MapAddr for u32 {
    fn from_ip(addr: IpAddr) -> Option<Self> {
        match addr {
            IpAddr::V4(a) => Some(u32::from_ne_bytes(a.octets())),
            IpAddr::V6(_) => None,
        }
    }

    fn to_ip(self) -> IpAddr {
        std::net::Ipv4Addr::from(self.to_ne_bytes()).into()
    }
}

impl MapAddr for In6 {
    fn from_ip(addr: IpAddr) -> Option<Self> {
        match addr {
            IpAddr::V6(a) => Some(In6::from_octets(a.octets())),
            IpAddr::V4(_) => None,
        }
    }

    fn to_ip(self) -> IpAddr {
        std::net::Ipv6Addr::from(self.octets()).into()
    }
}

/// One family's service maps.
struct FamilyMaps<A: MapAddr> {
    services: HashMap<MapData, ServiceKey<A>, ServiceValue>,
    backends: HashMap<MapData, u32, Backend<A>>,
    revnat: HashMap<MapData, u32, RevNat<A>>,
    source_ranges: LpmTrie<MapData, SourceRangeKey<A>, u32>,
}

impl<A: MapAddr> FamilyMaps<A> {
    fn take_from(ebpf: &mut aya::Ebpf, [services, backends, revnat, ranges]: [&str; 4]) -> anyhow::Result<Self> {
        Ok(Self {
            services: take(ebpf, services)?,
            backends: take(ebpf, backends)?,
            revnat: take(ebpf, revnat)?,
            source_ranges: {
                let map =
                    ebpf.take_map(ranges).with_context(|| format!("map {ranges} missing from the eBPF object"))?;
                LpmTrie::try_from(map)
                    .with_context(|| format!("map {ranges} has an unexpected type or key/value size"))?
            },
        })
    }

    fn dump_into(&self, contents: &mut Contents) -> anyhow::Result<()> {
        for entry in &self.services {
            let (key, value) = entry.context("reading the services map")?;
            contents.services.push((key.with_addr(key.addr.to_ip()), value));
        }
        for entry in &self.backends {
            let (id, b) = entry.context("reading the backends map")?;
            contents.backends.push((id, b.with_addr(b.addr.to_ip())));
        }
        for entry in &self.revnat {
            let (id, r) = entry.context("reading the reverse-NAT map")?;
            contents.revnat.push((id, writer::RevNat { addr: r.addr.to_ip(), port: r.port, pad: 0 }));
        }
        for key in self.source_ranges.keys() {
            let key = key.context("reading the source-range map")?;
            let len = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(u8::MAX);
            let data = key.data();
            contents.source_ranges.push((u32::from_be(data.rev_nat_id), (data.addr.to_ip(), len)));
        }
        Ok(())
    }
}

pub struct AyaServiceMaps {
    ids: aya::maps::Array<MapData, NextIds>,
    maglev: HashMap<MapData, MaglevKey, u32>,
    v4: FamilyMaps<u32>,
    v6: FamilyMaps<In6>,
}

fn range_key<A: MapAddr>(rev_nat_id: u32, addr: A, len: u8) -> Key<SourceRangeKey<A>> {
    Key::new(prefix_len(len), SourceRangeKey { rev_nat_id: rev_nat_id.to_be(), addr })
}

fn take<K: aya::Pod, V: aya::Pod>(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<HashMap<MapData, K, V>> {
    let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
    HashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type or key/value size"))
}

/// Deleting an entry that is already gone is success: the writer's goal is its absence. `Ok(false)`: it
/// was not there.
fn absent_ok(result: Result<(), MapError>) -> Result<bool, MapError> {
    match result {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Which family's maps an address goes to.
enum Family<A, B> {
    V4(A),
    V6(B),
}

fn family(addr: IpAddr) -> Family<u32, In6> {
    match addr {
        IpAddr::V4(_) => Family::V4(u32::from_ip(addr).unwrap_or_default()),
        IpAddr::V6(_) => Family::V6(In6::from_ip(addr).unwrap_or_default()),
    }
}

impl AyaServiceMaps {
    pub fn take_from(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            ids: {
                let map = ebpf.take_map(names::IDS).context("map IDS missing from the eBPF object")?;
                aya::maps::Array::try_from(map).context("map IDS has an unexpected type")?
            },
            maglev: take(ebpf, names::MAGLEV)?,
            v4: FamilyMaps::take_from(ebpf, [names::SERVICES, names::BACKENDS, names::REVNAT, names::SOURCE_RANGES])?,
            v6: FamilyMaps::take_from(
                ebpf,
                [names::SERVICES6, names::BACKENDS6, names::REVNAT6, names::SOURCE_RANGES6],
            )?,
        })
    }
}

impl ServiceMaps for AyaServiceMaps {
    fn put_backend(&mut self, id: u32, backend: writer::Backend) -> anyhow::Result<()> {
        match family(backend.addr) {
            Family::V4(a) => self.v4.backends.insert(&id, &backend.with_addr(a), 0),
            Family::V6(a) => self.v6.backends.insert(&id, &backend.with_addr(a), 0),
        }
        .with_context(|| format!("writing backend {id}"))
    }

    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
        // An id names a backend of one family: IPv4's map first (the common case), then IPv6's.
        if !absent_ok(self.v4.backends.remove(&id)).with_context(|| format!("deleting backend {id}"))? {
            absent_ok(self.v6.backends.remove(&id)).with_context(|| format!("deleting backend {id}"))?;
        }
        Ok(())
    }

    fn put_service(&mut self, key: &writer::ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        match family(key.addr) {
            Family::V4(a) => self.v4.services.insert(&key.with_addr(a), value, 0),
            Family::V6(a) => self.v6.services.insert(&key.with_addr(a), value, 0),
        }
        .with_context(|| format!("writing service entry {key:?}"))
    }

    fn delete_service(&mut self, key: &writer::ServiceKey) -> anyhow::Result<()> {
        match family(key.addr) {
            Family::V4(a) => absent_ok(self.v4.services.remove(&key.with_addr(a))),
            Family::V6(a) => absent_ok(self.v6.services.remove(&key.with_addr(a))),
        }
        .map(drop)
        .with_context(|| format!("deleting service entry {key:?}"))
    }

    fn put_revnat(&mut self, id: u32, revnat: writer::RevNat) -> anyhow::Result<()> {
        let (port, pad) = (revnat.port, 0);
        match family(revnat.addr) {
            Family::V4(addr) => self.v4.revnat.insert(&id, &RevNat { addr, port, pad }, 0),
            Family::V6(addr) => self.v6.revnat.insert(&id, &RevNat { addr, port, pad }, 0),
        }
        .with_context(|| format!("writing reverse-NAT entry {id}"))
    }

    fn delete_revnat(&mut self, id: u32) -> anyhow::Result<()> {
        if !absent_ok(self.v4.revnat.remove(&id)).with_context(|| format!("deleting reverse-NAT entry {id}"))? {
            absent_ok(self.v6.revnat.remove(&id)).with_context(|| format!("deleting reverse-NAT entry {id}"))?;
        }
        Ok(())
    }

    fn put_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()> {
        let (addr, len) = range;
        match family(addr) {
            Family::V4(a) => self.v4.source_ranges.insert(&range_key(rev_nat_id, a, len), &1, 0),
            Family::V6(a) => self.v6.source_ranges.insert(&range_key(rev_nat_id, a, len), &1, 0),
        }
        .with_context(|| format!("writing source range {addr}/{len} of {rev_nat_id}"))
    }

    fn delete_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()> {
        let (addr, len) = range;
        match family(addr) {
            Family::V4(a) => absent_ok(self.v4.source_ranges.remove(&range_key(rev_nat_id, a, len))),
            Family::V6(a) => absent_ok(self.v6.source_ranges.remove(&range_key(rev_nat_id, a, len))),
        }
        .map(drop)
        .with_context(|| format!("deleting source range {addr}/{len} of {rev_nat_id}"))
    }

    fn put_maglev(&mut self, table: u32, entries: &[u32]) -> anyhow::Result<()> {
        for (index, id) in (0u32..).zip(entries) {
            self.maglev
                .insert(&MaglevKey { table, index }, id, 0)
                .with_context(|| format!("writing Maglev table {table} entry {index}"))?;
        }
        Ok(())
    }

    fn delete_maglev(&mut self, table: u32, size: u32) -> anyhow::Result<()> {
        for index in 0..size {
            absent_ok(self.maglev.remove(&MaglevKey { table, index }))
                .with_context(|| format!("deleting Maglev table {table} entry {index}"))?;
        }
        Ok(())
    }

    fn put_next_ids(&mut self, ids: NextIds) -> anyhow::Result<()> {
        self.ids.set(0, &ids, 0).context("writing IDS")
    }

    fn dump(&self) -> anyhow::Result<Contents> {
        let mut contents = Contents { next_ids: self.ids.get(&0, 0).context("reading IDS")?, ..Contents::default() };
        self.v4.dump_into(&mut contents)?;
        self.v6.dump_into(&mut contents)?;
        Ok(contents)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::MapAddr;
    use proxy_common::addr::In6;

    #[test]
    fn addresses_round_trip_through_their_family_only() {
        let v4: IpAddr = Ipv4Addr::new(10, 32, 0, 1).into();
        let v6: IpAddr = "fd00:32::1".parse::<Ipv6Addr>().unwrap().into();
        // IPv4 keeps the packet's byte order: the first octet is the first byte in memory.
        assert_eq!(u32::from_ip(v4).unwrap().to_ne_bytes(), [10, 32, 0, 1]);
        assert_eq!(u32::from_ip(v4).unwrap().to_ip(), v4);
        assert_eq!(In6::from_ip(v6).unwrap().to_ip(), v6);
        assert_eq!(In6::from_ip(v6).unwrap().octets()[..2], [0xfd, 0x00]);
        assert_eq!(u32::from_ip(v6), None, "an IPv6 address never reaches an IPv4 map");
        assert_eq!(In6::from_ip(v4), None, "nor the reverse");
    }
}
