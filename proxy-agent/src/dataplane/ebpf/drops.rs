//! `proxy_agent_packet_drops_total{reason}`: the data path's per-CPU drop counters (`proxy_common::drop`),
//! read from the pinned `DROPS` map at every scrape, so the figures are the kernel's own, live, and survive
//! agent restarts as the map does.

use std::path::{Path, PathBuf};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};
use proxy_common::drop;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Reads the drop counters of the maps pinned under a bpffs directory.
#[derive(Debug)]
pub struct DropCounters {
    pin: PathBuf,
}

impl DropCounters {
    #[must_use]
    pub fn new(pin_dir: &Path) -> Self {
        Self { pin: super::pins::path(pin_dir, proxy_common::maps::DROPS) }
    }

    /// Each reason's count, summed over CPUs, in `proxy_common::drop` order.
    pub fn read(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
        let data = aya::maps::MapData::from_pin(&self.pin)?;
        let counters: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::from_map_data(data)?)?;
        drop::NAMES.iter().zip(0u32..).map(|(name, index)| Ok((*name, counters.get(&index, 0)?.iter().sum()))).collect()
    }
}

impl Collector for DropCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = match self.read() {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(pin = %self.pin.display(), error = %e, "cannot read the data path's drop counters");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "proxy_agent_packet_drops",
            "Packets (and node socket calls) the eBPF data path dropped or refused, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in counts {
            let label = ReasonLabel { reason };
            ConstCounter::new(count).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}
