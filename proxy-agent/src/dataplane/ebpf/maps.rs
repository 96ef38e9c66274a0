//! The service maps of the loaded object, behind [`ServiceMaps`].

use anyhow::Context as _;
use aya::maps::{
    HashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use proxy_common::{
    backend::Backend,
    ids::NextIds,
    maglev::MaglevKey,
    maps as names,
    revnat::RevNat,
    service::{ServiceKey, ServiceValue},
    source_range::{SourceRangeKey, prefix_len},
};

use super::writer::{Cidr, Contents, ServiceMaps};

pub struct AyaServiceMaps {
    ids: aya::maps::Array<MapData, NextIds>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    revnat: HashMap<MapData, u32, RevNat>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    maglev: HashMap<MapData, MaglevKey, u32>,
}

fn range_key(rev_nat_id: u32, (addr, len): Cidr) -> Key<SourceRangeKey> {
    Key::new(
        prefix_len(len),
        SourceRangeKey { rev_nat_id: rev_nat_id.to_be(), addr: u32::from_ne_bytes(super::ipv4(addr).octets()) },
    )
}

fn take<K: aya::Pod, V: aya::Pod>(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<HashMap<MapData, K, V>> {
    let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
    HashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type or key/value size"))
}

/// Deleting an entry that is already gone is success: the writer's goal is its absence.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl AyaServiceMaps {
    pub fn take_from(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            ids: {
                let map = ebpf.take_map(names::IDS).context("map IDS missing from the eBPF object")?;
                aya::maps::Array::try_from(map).context("map IDS has an unexpected type")?
            },
            services: take(ebpf, names::SERVICES)?,
            maglev: take(ebpf, names::MAGLEV)?,
            backends: take(ebpf, names::BACKENDS)?,
            revnat: take(ebpf, names::REVNAT)?,
            source_ranges: {
                let map =
                    ebpf.take_map(names::SOURCE_RANGES).context("map SOURCE_RANGES missing from the eBPF object")?;
                LpmTrie::try_from(map).context("map SOURCE_RANGES has an unexpected type or key/value size")?
            },
        })
    }
}

impl ServiceMaps for AyaServiceMaps {
    fn put_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        self.backends.insert(&id, &backend, 0).with_context(|| format!("writing backend {id}"))
    }

    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
        absent_ok(self.backends.remove(&id)).with_context(|| format!("deleting backend {id}"))
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        self.services.insert(key, value, 0).with_context(|| format!("writing service entry {key:?}"))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        absent_ok(self.services.remove(key)).with_context(|| format!("deleting service entry {key:?}"))
    }

    fn put_revnat(&mut self, id: u32, revnat: RevNat) -> anyhow::Result<()> {
        self.revnat.insert(&id, &revnat, 0).with_context(|| format!("writing reverse-NAT entry {id}"))
    }

    fn delete_revnat(&mut self, id: u32) -> anyhow::Result<()> {
        absent_ok(self.revnat.remove(&id)).with_context(|| format!("deleting reverse-NAT entry {id}"))
    }

    fn put_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()> {
        self.source_ranges
            .insert(&range_key(rev_nat_id, range), &1, 0)
            .with_context(|| format!("writing source range {}/{} of {rev_nat_id}", range.0, range.1))
    }

    fn delete_source_range(&mut self, rev_nat_id: u32, range: Cidr) -> anyhow::Result<()> {
        absent_ok(self.source_ranges.remove(&range_key(rev_nat_id, range)))
            .with_context(|| format!("deleting source range {}/{} of {rev_nat_id}", range.0, range.1))
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
        let mut source_ranges = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.context("reading SOURCE_RANGES")?;
            let len = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(32);
            let data = key.data();
            source_ranges
                .push((u32::from_be(data.rev_nat_id), (std::net::Ipv4Addr::from(data.addr.to_ne_bytes()).into(), len)));
        }
        Ok(Contents {
            services: self.services.iter().collect::<Result<_, _>>().context("reading SERVICES")?,
            backends: self.backends.iter().collect::<Result<_, _>>().context("reading BACKENDS")?,
            revnat: self.revnat.iter().collect::<Result<_, _>>().context("reading REVNAT")?,
            source_ranges,
            next_ids: self.ids.get(&0, 0).context("reading IDS")?,
        })
    }
}
