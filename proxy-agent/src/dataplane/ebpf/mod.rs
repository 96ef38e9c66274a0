//! The eBPF dataplane: the embedded object, its pinned maps, and its TC programs on pod interfaces.

mod attach;
mod drops;
pub mod flow_table;
mod frontend_addrs;
mod maglev;
mod maps;
pub mod sockets;
pub mod writer;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub use attach::{InterfacePatterns, InterfaceRoles, Role, XdpSetting};
pub use drops::DropCounters;
pub use flow_table::{FlowTableMetrics, FlowTableStats};
pub use maglev::is_prime;

use super::{ApplyStats, Dataplane};
use crate::model::ServiceTable;

/// The object built from proxy-ebpf by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

pub struct EbpfDataplane {
    ebpf: aya::Ebpf,
    writer: writer::TableWriter<maps::AyaServiceMaps>,
    frontend_addrs: frontend_addrs::FrontendAddrs<frontend_addrs::AyaAddrMap>,
    attachments: attach::Attachments,
    roles: InterfaceRoles,
    pin_dir: PathBuf,
}

/// Node-wide settings of the data path.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// The address SNATed flows leave with: the node's primary IPv4.
    pub snat_addr: Option<std::net::Ipv4Addr>,
    /// SNAT ports, above the kernel's default ephemeral range (32768–60999) so they never collide with the
    /// node's own sockets.
    pub snat_ports: (u16, u16),
    /// kube-proxy's `masqueradeAll`.
    pub masquerade_all: bool,
    /// kube-proxy's `clusterCIDR`, for local-traffic detection.
    pub cluster_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// The cgroup (v2) whose processes' sockets get Service translation (the node's own traffic).
    pub socket_cgroup: Option<PathBuf>,
    pub xdp: XdpSetting,
    /// Conntrack lifetimes by flow state.
    pub timeouts: proxy_common::conntrack::Timeouts,
    /// How many flows the connection tables hold (two `CONNTRACK` entries each).
    pub max_flows: u32,
    /// Which frontends use Maglev tables, and their size.
    pub maglev: writer::MaglevSettings,
}

/// The sizes of the per-flow maps for a table of `max_flows` flows: two conntrack entries per flow (forward
/// and reply), two SNAT entries per SNATed flow (out and in), and fragment records for one datagram in
/// sixteen flows being in pieces at once (never fewer than the build's default).
#[must_use]
pub fn flow_table_sizes(max_flows: u32) -> [(&'static str, u32); 3] {
    use proxy_common::{capacity, maps};
    [
        (maps::CONNTRACK, max_flows.saturating_mul(2)),
        (maps::SNAT, max_flows.saturating_mul(2)),
        (maps::FRAGS, (max_flows / 16).max(capacity::FRAGS)),
    ]
}

/// Registers the eBPF dataplane's scrape-time metrics: drops by reason and the per-flow tables.
pub fn register_collectors(
    registry: &mut prometheus_client::registry::Registry,
    pin_dir: &Path,
    flow_stats: std::sync::Arc<FlowTableStats>,
) {
    registry.register_collector(Box::new(DropCounters::new(pin_dir)));
    registry.register_collector(Box::new(FlowTableMetrics::new(pin_dir, flow_stats)));
}

/// A prefix length as a mask in network byte order.
fn prefix_mask(len: u8) -> u32 {
    let host_order = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
    host_order.to_be()
}

fn write_config(ebpf: &mut aya::Ebpf, settings: &NodeSettings) -> anyhow::Result<()> {
    let map = ebpf.map_mut(proxy_common::maps::CONFIG).context("map CONFIG missing from the eBPF object")?;
    let mut config: aya::maps::Array<_, proxy_common::config::Config> =
        aya::maps::Array::try_from(map).context("map CONFIG has an unexpected type")?;
    let value = proxy_common::config::Config {
        netns_cookie: sockets::netns_cookie()?,
        cluster_addr: settings.cluster_cidr.map_or(0, |(a, len)| u32::from_ne_bytes(a.octets()) & prefix_mask(len)),
        cluster_mask: settings.cluster_cidr.map_or(0, |(_, len)| prefix_mask(len)),
        maglev_table_size: settings.maglev.table_size,
        snat_addr: settings.snat_addr.map_or(0, |a| u32::from_ne_bytes(a.octets())),
        snat_port_min: settings.snat_ports.0,
        snat_port_max: settings.snat_ports.1,
        flags: if settings.masquerade_all { proxy_common::config::FLAG_MASQUERADE_ALL } else { 0 },
        timeouts: settings.timeouts,
    };
    config.set(0, &value, 0).context("writing CONFIG")
}

impl EbpfDataplane {
    /// Loads the programs and opens the maps pinned under `pin_dir`, creating them if they are not there.
    /// Maps a previous agent pinned are adopted as they are: nothing live is flushed.
    /// The conntrack sweep runs on a thread of its own from here on, counting into `flow_stats`.
    pub fn start(
        pin_dir: &Path,
        roles: InterfaceRoles,
        settings: &NodeSettings,
        flow_stats: std::sync::Arc<FlowTableStats>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(pin_dir).with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        let mut ebpf = load_replacing_incompatible_pins(pin_dir, &flow_table_sizes(settings.max_flows))?;
        attach::load_programs(&mut ebpf)?;
        write_config(&mut ebpf, settings)?;
        if let Some(cgroup) = &settings.socket_cgroup {
            sockets::attach(&mut ebpf, cgroup, &pin_dir.join("links"))?;
            tracing::info!(cgroup = %cgroup.display(), "node traffic to Services is translated at the socket");
        } else {
            tracing::warn!(
                "no cgroup v2 for the socket programs: the node's own traffic to Services is not translated"
            );
        }
        let writer =
            writer::TableWriter::adopt(maps::AyaServiceMaps::take_from(&mut ebpf)?)?.with_maglev(settings.maglev);
        flow_table::Sweeper::open(pin_dir, settings.timeouts, flow_stats)?.spawn();
        let addr_map = ebpf
            .take_map(proxy_common::maps::FRONTEND_ADDRS)
            .context("map FRONTEND_ADDRS missing from the eBPF object")?;
        let addr_map = aya::maps::HashMap::try_from(addr_map).context("map FRONTEND_ADDRS has an unexpected type")?;
        let frontend_addrs = frontend_addrs::FrontendAddrs::new(frontend_addrs::AyaAddrMap(addr_map));
        let mut dataplane = Self {
            ebpf,
            writer,
            frontend_addrs,
            attachments: attach::Attachments::new(settings.xdp, pin_dir.join("links"))?,
            roles,
            pin_dir: pin_dir.to_owned(),
        };
        dataplane.housekeeping()?;
        Ok(dataplane)
    }
}

/// Loads the object, adopting the pinned maps a previous agent left. A pinned map whose layout differs from
/// this build's (an upgrade that changed a key, value, size or flag) cannot be adopted: its pin is removed and
/// a new map is created in its place. Its entries are lost (the service maps are rewritten by the first sync;
/// a lost conntrack map breaks the node's established translated flows), so this is logged loudly. The old
/// programs keep the old map until the new programs replace them.
fn load_replacing_incompatible_pins(pin_dir: &Path, sizes: &[(&'static str, u32)]) -> anyhow::Result<aya::Ebpf> {
    let mut replaced = Vec::new();
    loop {
        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, size) in sizes {
            loader.map_max_entries(name, *size);
        }
        match loader.load(OBJECT) {
            Ok(ebpf) => return Ok(ebpf),
            Err(aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap {
                name,
                property,
                expected,
                actual,
            })) if !replaced.contains(&name) => {
                tracing::warn!(
                    map = %name,
                    property,
                    expected,
                    actual,
                    "a pinned map from another version has a different layout; replacing it, its entries are lost"
                );
                let pin = pin_dir.join(&name);
                std::fs::remove_file(&pin).with_context(|| format!("removing incompatible pin {}", pin.display()))?;
                replaced.push(name);
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("loading the eBPF object (maps pinned under {})", pin_dir.display()));
            }
        }
    }
}

/// kube-proxy's `--cleanup` for this dataplane: unpins every map and link under `pin_dir`, which detaches
/// the programs and frees the maps once nothing else holds them.
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        let stats = self.writer.apply(table)?;
        self.frontend_addrs.sync_all(table)?;
        Ok(stats)
    }

    fn apply_changes(
        &mut self,
        table: &ServiceTable,
        changed: &std::collections::BTreeSet<crate::model::Frontend>,
    ) -> anyhow::Result<ApplyStats> {
        let stats = self.writer.apply_changes(table, changed)?;
        self.frontend_addrs.sync_changed(table, changed)?;
        Ok(stats)
    }

    fn apply_full(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        self.writer.reread()?;
        let stats = self.writer.apply(table)?;
        self.frontend_addrs.sync_all(table)?;
        Ok(stats)
    }

    fn occupancy(&self) -> Vec<(&'static str, usize)> {
        self.writer.occupancy()
    }

    fn housekeeping(&mut self) -> anyhow::Result<()> {
        let added = self.attachments.refresh(&mut self.ebpf, &self.roles)?;
        if !added.is_empty() {
            tracing::info!(
                interfaces = ?added,
                total = self.attachments.len(),
                pins = %self.pin_dir.display(),
                "attached service programs to interfaces"
            );
        }
        Ok(())
    }
}
