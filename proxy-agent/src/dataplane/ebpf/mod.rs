//! The eBPF dataplane: the embedded object, its pinned maps, and its TC programs on pod interfaces.

mod attach;
mod maps;
pub mod writer;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub use attach::InterfacePatterns;

use super::{ApplyStats, Dataplane};
use crate::model::ServiceTable;

/// The object built from proxy-ebpf by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

pub struct EbpfDataplane {
    ebpf: aya::Ebpf,
    writer: writer::TableWriter<maps::AyaServiceMaps>,
    attachments: attach::Attachments,
    patterns: InterfacePatterns,
    pin_dir: PathBuf,
}

impl EbpfDataplane {
    /// Loads the programs and opens the maps pinned under `pin_dir`, creating them if they are not there.
    /// Maps a previous agent pinned are adopted as they are: nothing live is flushed.
    pub fn start(pin_dir: &Path, patterns: InterfacePatterns) -> anyhow::Result<Self> {
        std::fs::create_dir_all(pin_dir).with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .with_context(|| format!("loading the eBPF object (maps pinned under {})", pin_dir.display()))?;
        attach::load_programs(&mut ebpf)?;
        let writer = writer::TableWriter::adopt(maps::AyaServiceMaps::take_from(&mut ebpf)?)?;
        let mut dataplane =
            Self { ebpf, writer, attachments: attach::Attachments::default(), patterns, pin_dir: pin_dir.to_owned() };
        dataplane.housekeeping()?;
        Ok(dataplane)
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        self.writer.apply(table)
    }

    fn housekeeping(&mut self) -> anyhow::Result<()> {
        let added = self.attachments.refresh(&mut self.ebpf, &self.patterns)?;
        if !added.is_empty() {
            tracing::info!(
                interfaces = ?added,
                total = self.attachments.len(),
                pins = %self.pin_dir.display(),
                "attached service programs to pod interfaces"
            );
        }
        Ok(())
    }
}
