//! The eBPF dataplane: the embedded object, its pinned maps, and its TC programs on pod interfaces.

mod attach;
mod drops;
mod egress_snat;
pub mod flow_table;
mod frontend_addrs;
pub mod handover;
pub mod interfaces;
mod ipv6_programs;
mod maglev;
mod maps;
pub mod pins;
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
    socket_cgroup: Option<PathBuf>,
    /// An upgrade is under way: this build's maps are being filled while the previous programs serve.
    upgrading: bool,
    /// What `CONFIG` holds.
    config: proxy_common::config::Config,
    /// Netfilter rules served Services when this agent started: they keep the flows they translated, and
    /// go once the first table is in (`handover`).
    take_over: Option<handover::TakeOver>,
    /// Flows the kernel's NAT translated may be alive, and `handover::keep_conntrack` keeps conntrack on for
    /// them: released once a sweep pass after this pass count finds none.
    kernel_nat: Option<u64>,
    flow_stats: std::sync::Arc<FlowTableStats>,
    /// What `EGRESS_SNAT` and `CONFIG.snat_addrs` hold.
    egress_snat: egress_snat::EgressSnat,
    /// What `EGRESS_SNAT6` and `CONFIG6.snat_addrs` hold.
    egress_snat6: egress_snat::EgressSnat<std::net::Ipv6Addr>,
    /// What `CONFIG6` holds.
    config6: proxy_common::config::Config6,
    /// The IPv6 programs' tail-call tables, pinned once this build's programs serve (`ipv6_programs`).
    ipv6_programs: ipv6_programs::Ipv6Programs,
}

/// Node-wide settings of the data path.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// The address SNATed flows leave with: the node's primary IPv4.
    pub snat_addr: Option<std::net::Ipv4Addr>,
    /// The address SNATed IPv6 flows leave with: the node's primary IPv6.
    pub snat_addr6: Option<std::net::Ipv6Addr>,
    /// SNAT ports, above the kernel's default ephemeral range (32768–60999) so they never collide with the
    /// node's own sockets.
    pub snat_ports: (u16, u16),
    /// kube-proxy's `masqueradeAll`.
    pub masquerade_all: bool,
    /// kube-proxy's `clusterCIDR`, for local-traffic detection.
    pub cluster_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// Its IPv6 CIDR, on a dual-stack or IPv6 cluster.
    pub cluster_cidr6: Option<(std::net::Ipv6Addr, u8)>,
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
/// sixteen flows being in pieces at once (never fewer than the build's default). IPv6's tables get the
/// same sizes on a node with an IPv6 address or an IPv6 `clusterCIDR` (`ipv6`), and the least the kernel's
/// LRU works with otherwise: those maps are allocated whole (~30 MiB each at the default size), and a node gaining IPv6
/// later resizes them at its next start, as any resize.
#[must_use]
pub fn flow_table_sizes(max_flows: u32, ipv6: bool) -> [(&'static str, u32); 6] {
    use proxy_common::{capacity, maps};
    let cpus = crate::conntrack_settings::cpus();
    let flows6 = if ipv6 { max_flows } else { 0 };
    [
        (maps::CONNTRACK, capacity::lru_entries(max_flows, 2, cpus)),
        (maps::SNAT, capacity::lru_entries(max_flows, 2, cpus)),
        (maps::FRAGS, (max_flows / 16).max(capacity::FRAGS)),
        (maps::CONNTRACK6, capacity::lru_entries(flows6, 2, cpus)),
        (maps::SNAT6, capacity::lru_entries(flows6, 2, cpus)),
        (maps::FRAGS6, if ipv6 { (max_flows / 16).max(capacity::FRAGS) } else { cpus * 256 }),
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

/// The `CONFIG` entry for `settings`.
fn config_value(settings: &NodeSettings) -> anyhow::Result<proxy_common::config::Config> {
    Ok(proxy_common::config::Config {
        netns_cookie: sockets::netns_cookie()?,
        cluster_addr: settings.cluster_cidr.map_or(0, |(a, len)| u32::from_ne_bytes(a.octets()) & prefix_mask(len)),
        cluster_mask: settings.cluster_cidr.map_or(0, |(_, len)| prefix_mask(len)),
        maglev_table_size: settings.maglev.table_size,
        snat_addr: settings.snat_addr.map_or(0, |a| u32::from_ne_bytes(a.octets())),
        snat_port_min: settings.snat_ports.0,
        snat_port_max: settings.snat_ports.1,
        flags: if settings.masquerade_all { proxy_common::config::FLAG_MASQUERADE_ALL } else { 0 },
        timeouts: settings.timeouts,
        // Written with the first table (`EbpfDataplane::sync_service_cidrs`).
        service_cidrs: [proxy_common::config::Ipv4Net::default(); proxy_common::config::MAX_SERVICE_CIDRS],
        // Written as the interfaces are attached (`EbpfDataplane::sync_egress_snat`).
        snat_addrs: [0; proxy_common::config::MAX_SNAT_ADDRS],
    })
}

/// An IPv6 prefix length as a mask, in the maps' form.
fn prefix_mask6(len: u8) -> proxy_common::addr::In6 {
    let bits = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
    proxy_common::addr::In6::from_octets(bits.to_be_bytes())
}

fn ipv6_net(addr: std::net::Ipv6Addr, len: u8) -> proxy_common::config::Ipv6Net {
    let mask = prefix_mask6(len);
    let net = proxy_common::addr::In6::from_octets(addr.octets());
    let masked = proxy_common::addr::In6([
        net.0[0] & mask.0[0],
        net.0[1] & mask.0[1],
        net.0[2] & mask.0[2],
        net.0[3] & mask.0[3],
    ]);
    proxy_common::config::Ipv6Net { addr: masked, mask }
}

/// The `CONFIG6` entry for `settings` (its service CIDRs are written with the first table).
fn config6_value(settings: &NodeSettings) -> proxy_common::config::Config6 {
    proxy_common::config::Config6 {
        snat_addr: settings
            .snat_addr6
            .map_or(proxy_common::addr::In6::UNSPECIFIED, |a| proxy_common::addr::In6::from_octets(a.octets())),
        cluster: settings.cluster_cidr6.map_or_else(Default::default, |(a, len)| ipv6_net(a, len)),
        service_cidrs: Default::default(),
        // Written as the interfaces are attached (`EbpfDataplane::sync_egress_snat`).
        snat_addrs: Default::default(),
    }
}

/// The service CIDRs as `CONFIG` and `CONFIG6` hold them: the first [`MAX_SERVICE_CIDRS`] of each family
/// (a cluster has one per family, a few while a range migrates); a longer list is cut, with a warning,
/// and the rest are not dropped.
///
/// [`MAX_SERVICE_CIDRS`]: proxy_common::config::MAX_SERVICE_CIDRS
fn service_cidrs(
    cidrs: &[crate::model::Cidr],
) -> (
    [proxy_common::config::Ipv4Net; proxy_common::config::MAX_SERVICE_CIDRS],
    [proxy_common::config::Ipv6Net; proxy_common::config::MAX_SERVICE_CIDRS],
) {
    use proxy_common::config::{Ipv4Net, Ipv6Net, MAX_SERVICE_CIDRS};
    use std::net::IpAddr;
    let mut v4 = [Ipv4Net::default(); MAX_SERVICE_CIDRS];
    let mut v6 = [Ipv6Net::default(); MAX_SERVICE_CIDRS];
    let (mut n4, mut n6) = (0, 0);
    // A /0 would be "every address": the model never lets one through (`validate::service_cidr`, the flag).
    for (addr, len) in cidrs.iter().filter(|(_, len)| *len > 0) {
        match addr {
            IpAddr::V4(a) if n4 < MAX_SERVICE_CIDRS => {
                let mask = prefix_mask(*len);
                v4[n4] = Ipv4Net { addr: u32::from_ne_bytes(a.octets()) & mask, mask };
                n4 += 1;
            }
            IpAddr::V6(a) if n6 < MAX_SERVICE_CIDRS => {
                v6[n6] = ipv6_net(*a, *len);
                n6 += 1;
            }
            _ => tracing::warn!(
                cidr = %format!("{addr}/{len}"),
                "more service CIDRs of one family than the eBPF data path checks ({MAX_SERVICE_CIDRS}): addresses of the others that no Service holds are routed on"
            ),
        }
    }
    (v4, v6)
}

fn write_config6(ebpf: &mut aya::Ebpf, value: &proxy_common::config::Config6) -> anyhow::Result<()> {
    let map = ebpf.map_mut(proxy_common::maps::CONFIG6).context("map CONFIG6 missing from the eBPF object")?;
    let mut config: aya::maps::Array<_, proxy_common::config::Config6> =
        aya::maps::Array::try_from(map).context("map CONFIG6 has an unexpected type")?;
    config.set(0, value, 0).context("writing CONFIG6")
}

fn write_config(ebpf: &mut aya::Ebpf, value: &proxy_common::config::Config) -> anyhow::Result<()> {
    let map = ebpf.map_mut(proxy_common::maps::CONFIG).context("map CONFIG missing from the eBPF object")?;
    let mut config: aya::maps::Array<_, proxy_common::config::Config> =
        aya::maps::Array::try_from(map).context("map CONFIG has an unexpected type")?;
    config.set(0, value, 0).context("writing CONFIG")
}

/// The first [`MAX_SNAT_ADDRS`] distinct non-zero addresses of `list`, in order, zero-padded: the
/// `snat_addrs` of `CONFIG` or `CONFIG6`.
///
/// [`MAX_SNAT_ADDRS`]: proxy_common::config::MAX_SNAT_ADDRS
fn snat_slots<A: Copy + PartialEq + Default>(
    list: impl IntoIterator<Item = A>,
) -> [A; proxy_common::config::MAX_SNAT_ADDRS] {
    let mut out = [A::default(); proxy_common::config::MAX_SNAT_ADDRS];
    let mut n = 0;
    for addr in list {
        if n < out.len() && addr != A::default() && !out[..n].contains(&addr) {
            out[n] = addr;
            n += 1;
        }
    }
    out
}

/// Makes the egress SNAT map `name` (interface index → address) hold exactly `wanted`.
fn write_egress_snat<A: aya::Pod>(
    ebpf: &mut aya::Ebpf,
    name: &str,
    wanted: &std::collections::BTreeMap<u32, A>,
) -> anyhow::Result<()> {
    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    let mut map: aya::maps::HashMap<_, u32, A> = aya::maps::HashMap::try_from(map)?;
    let stale: Vec<u32> = map.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
    for index in stale {
        map.remove(&index)?;
    }
    for (index, addr) in wanted {
        map.insert(index, addr, 0)?;
    }
    Ok(())
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
        take_over: Option<handover::TakeOver>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(pin_dir).with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        let (mut ebpf, created) = load_with_versioned_pins(
            pin_dir,
            &flow_table_sizes(settings.max_flows, settings.snat_addr6.is_some() || settings.cluster_cidr6.is_some()),
        )?;
        let upgrading = pins::upgrade_pending(pin_dir);
        if upgrading {
            // The service state first, into maps nothing uses yet, so the writer adopts it and the first sync
            // writes only what changed. The flow state is copied last, just before the programs are swapped.
            let fresh: Vec<&str> =
                proxy_common::maps::SERVICE_STATE.iter().copied().filter(|m| created.contains(m)).collect();
            pins::migrate(pin_dir, &fresh, pins::Overwrite::Yes)?;
            tracing::warn!(
                pins = %pin_dir.display(),
                "upgrade: the running programs and their maps keep serving until this agent has a complete table"
            );
        }
        attach::load_programs(&mut ebpf)?;
        let ipv6_programs = ipv6_programs::Ipv6Programs::fill(&mut ebpf, pin_dir)?;
        let config6 = config6_value(settings);
        write_config6(&mut ebpf, &config6)?;
        let mut config = config_value(settings)?;
        if upgrading {
            config.flags |= proxy_common::config::FLAG_MIGRATING;
        }
        if take_over.is_some() {
            config.flags |= proxy_common::config::FLAG_HANDOVER;
            tracing::info!(
                "netfilter rules serve Services here: taking over without touching the flows they translated"
            );
        }
        write_config(&mut ebpf, &config)?;
        let writer =
            writer::TableWriter::adopt(maps::AyaServiceMaps::take_from(&mut ebpf)?)?.with_maglev(settings.maglev);
        flow_table::Sweeper::open(pin_dir, settings.timeouts, flow_stats.clone())?.spawn();
        let mut addr_map = |name: &str| -> anyhow::Result<aya::maps::MapData> {
            let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
            match map {
                aya::maps::Map::HashMap(data) => Ok(data),
                _ => anyhow::bail!("map {name} has an unexpected type"),
            }
        };
        let v4 = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(addr_map(proxy_common::maps::FRONTEND_ADDRS)?))
            .context("map FRONTEND_ADDRS has an unexpected key or value size")?;
        let v6 = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(addr_map(proxy_common::maps::FRONTEND_ADDRS6)?))
            .context("map FRONTEND_ADDRS6 has an unexpected key or value size")?;
        let frontend_addrs = frontend_addrs::FrontendAddrs::new(frontend_addrs::AyaAddrMap { v4, v6 });
        let mut dataplane = Self {
            ebpf,
            writer,
            frontend_addrs,
            attachments: attach::Attachments::new(settings.xdp, pin_dir.join("links"))?,
            roles,
            pin_dir: pin_dir.to_owned(),
            socket_cgroup: settings.socket_cgroup.clone(),
            upgrading,
            config,
            kernel_nat: (take_over.is_some() || handover::conntrack_kept()).then_some(0),
            take_over,
            flow_stats,
            egress_snat: egress_snat::EgressSnat::default(),
            egress_snat6: egress_snat::EgressSnat::default(),
            config6,
            ipv6_programs,
        };
        if !upgrading {
            dataplane.attach_sockets()?;
            dataplane.housekeeping()?;
            dataplane.ipv6_programs.pin()?;
        }
        Ok(dataplane)
    }

    fn attach_sockets(&mut self) -> anyhow::Result<()> {
        if let Some(cgroup) = &self.socket_cgroup {
            sockets::attach(&mut self.ebpf, cgroup, &self.pin_dir.join("links"))?;
            tracing::info!(cgroup = %cgroup.display(), "node traffic to Services is translated at the socket");
        } else {
            tracing::warn!(
                "no cgroup v2 for the socket programs: the node's own traffic to Services is not translated"
            );
        }
        Ok(())
    }

    /// Writes the table's service CIDRs into `CONFIG` when they changed (after the frontends, so a new
    /// ClusterIP is a frontend before its range drops what matches no frontend).
    fn sync_service_cidrs(&mut self, table: &ServiceTable) -> anyhow::Result<()> {
        let (v4, v6) = service_cidrs(&table.service_cidrs);
        if v4 != self.config.service_cidrs || v6 != self.config6.service_cidrs {
            self.config.service_cidrs = v4;
            self.config6.service_cidrs = v6;
            write_config6(&mut self.ebpf, &self.config6)?;
            write_config(&mut self.ebpf, &self.config)?;
            tracing::info!(service_cidrs = ?table.service_cidrs, "service CIDRs: unallocated addresses are dropped");
        }
        Ok(())
    }

    /// After the first complete table has been written into the new maps: swaps this build's programs into
    /// every pinned link, then carries the flow state over and lets the previous maps go.
    ///
    /// The flow state is copied only once the previous programs are off every hook, so nothing they write
    /// later can leave a stale copy behind (SNAT ports are reused within a second). Until the copy is done
    /// (`FLAG_MIGRATING`), the new programs look up a flow they do not know in the previous tables and take
    /// it over, and write new flows to both, so the previous programs, still on some hooks for the few
    /// milliseconds the swap takes, know them too.
    fn finish_upgrade(&mut self) -> anyhow::Result<()> {
        if !self.upgrading {
            return Ok(());
        }
        // Counters are arrays: copied whole, once.
        let counters = [proxy_common::maps::STATS, proxy_common::maps::DROPS];
        let mut carried = pins::migrate(&self.pin_dir, &counters, pins::Overwrite::Yes)?;
        // A previous table the new programs cannot fall back to (another layout) is converted before the swap
        // too, so the flows it holds are known from the first packet.
        if !pins::conntrack_fallback_available(&self.pin_dir) {
            carried += pins::migrate(&self.pin_dir, &[proxy_common::maps::CONNTRACK], pins::Overwrite::No)?;
        }
        self.upgrading = false;
        self.attach_sockets()?;
        self.housekeeping()?;
        // A failed rename is retried by housekeeping: this build's tables stay pinned beside the previous
        // agent's meanwhile, so nothing is emptied, and the rest of the upgrade must not wait on it.
        if let Err(e) = self.ipv6_programs.pin() {
            tracing::warn!(error = %format!("{e:#}"), "pinning the IPv6 programs' tables in place; retried");
        }
        carried += pins::migrate(&self.pin_dir, &proxy_common::maps::FLOW_STATE, pins::Overwrite::No)?;
        self.config.flags &= !proxy_common::config::FLAG_MIGRATING;
        write_config(&mut self.ebpf, &self.config)?;
        pins::drop_previous(&self.pin_dir)?;
        tracing::info!(flow_entries = carried, "upgrade complete: this build's programs and maps serve now");
        Ok(())
    }

    /// Writes each attached interface's SNAT address of each family where it changed: the addresses into
    /// `CONFIG` (`CONFIG6`) first, so replies to a new one are known before a flow leaves with it, and
    /// while an interface may still leave with an old address, replies to it stay known: the addresses are
    /// widened before the map changes and narrowed after.
    fn sync_egress_snat(&mut self, interfaces: &[interfaces::Interface]) -> anyhow::Result<()> {
        let snat_addr =
            (self.config.snat_addr != 0).then(|| std::net::Ipv4Addr::from(self.config.snat_addr.to_ne_bytes()));
        let wanted = egress_snat::plan(interfaces, self.attachments.indexes(), &interfaces::addresses()?, snat_addr);
        if wanted != self.egress_snat {
            let addrs = snat_slots(wanted.addresses.iter().map(|a| u32::from_ne_bytes(a.octets())));
            self.config.snat_addrs = snat_slots(addrs.into_iter().chain(self.config.snat_addrs));
            write_config(&mut self.ebpf, &self.config)?;
            let by_interface = wanted.by_interface.iter().map(|(i, a)| (*i, u32::from_ne_bytes(a.octets())));
            write_egress_snat(&mut self.ebpf, proxy_common::maps::EGRESS_SNAT, &by_interface.collect())?;
            self.config.snat_addrs = addrs;
            write_config(&mut self.ebpf, &self.config)?;
            tracing::info!(by_interface = ?wanted.by_interface, "IPv4 SNAT leaves these interfaces with their own (or their bridge's) address");
            self.egress_snat = wanted;
        }

        let snat_addr6 =
            (!self.config6.snat_addr.is_zero()).then(|| std::net::Ipv6Addr::from(self.config6.snat_addr.octets()));
        let wanted =
            egress_snat::plan(interfaces, self.attachments.indexes(), &interfaces::ipv6_addresses()?, snat_addr6);
        if wanted != self.egress_snat6 {
            let addrs = snat_slots(wanted.addresses.iter().map(|a| proxy_common::addr::In6::from_octets(a.octets())));
            self.config6.snat_addrs = snat_slots(addrs.into_iter().chain(self.config6.snat_addrs));
            write_config6(&mut self.ebpf, &self.config6)?;
            let by_interface =
                wanted.by_interface.iter().map(|(i, a)| (*i, proxy_common::addr::In6::from_octets(a.octets())));
            write_egress_snat(&mut self.ebpf, proxy_common::maps::EGRESS_SNAT6, &by_interface.collect())?;
            self.config6.snat_addrs = addrs;
            write_config6(&mut self.ebpf, &self.config6)?;
            tracing::info!(by_interface = ?wanted.by_interface, "IPv6 SNAT leaves these interfaces with their own (or their bridge's) address");
            self.egress_snat6 = wanted;
        }
        Ok(())
    }

    /// Once a complete sweep pass finds no flow left to the kernel's NAT, conntrack need not be kept on.
    fn release_conntrack_when_unused(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(after) = self.kernel_nat else { return };
        if self.take_over.is_some()
            || self.flow_stats.passes.load(Relaxed) <= after
            || self.flow_stats.kernel_flows.load(Relaxed) > 0
        {
            return;
        }
        match handover::release_conntrack() {
            Ok(()) => {
                tracing::info!("no flow the netfilter rules translated is left: conntrack is no longer kept on");
                self.kernel_nat = None;
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "removing the table that keeps conntrack on"),
        }
    }

    /// After the first complete table: the flows the netfilter rules translated are left to them, new
    /// flows become the programs', and the rules go (see `handover`).
    fn finish_take_over(&mut self) -> anyhow::Result<()> {
        if self.upgrading {
            return Ok(());
        }
        let Some(take_over) = &self.take_over else { return Ok(()) };
        let table = |name: &str| -> anyhow::Result<aya::maps::MapData> {
            let pin = pins::path(&self.pin_dir, name);
            aya::maps::MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))
        };
        let mut conntrack =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(table(proxy_common::maps::CONNTRACK)?))?;
        let mut conntrack6 =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(table(proxy_common::maps::CONNTRACK6)?))?;
        let (ebpf, config) = (&mut self.ebpf, &mut self.config);
        take_over.finish((&mut conntrack, &mut conntrack6), || {
            config.flags &= !proxy_common::config::FLAG_HANDOVER;
            write_config(ebpf, config)
        })?;
        self.take_over = None;
        // Only a pass that starts after the flows were recorded can count them.
        self.kernel_nat = Some(self.flow_stats.passes.load(std::sync::atomic::Ordering::Relaxed) + 1);
        Ok(())
    }
}

/// Loads the object, adopting the pinned maps a previous agent left (`pins`): each map at its versioned
/// pin. A pin of another version, or one whose size or layout differs from this build's (an upgrade, a
/// downgrade, a resize), is set aside in `previous/` rather than replaced under the running programs, and
/// a new map is created. Returns the object and the maps created rather than adopted.
fn load_with_versioned_pins(
    pin_dir: &Path,
    sizes: &[(&'static str, u32)],
) -> anyhow::Result<(aya::Ebpf, std::collections::BTreeSet<&'static str>)> {
    let mut adopted = pins::prepare(pin_dir)?;
    let paths: Vec<(&'static str, PathBuf)> =
        proxy_common::maps::LAYOUTS.iter().map(|(name, _)| (*name, pins::path(pin_dir, name))).collect();
    let mut retired = Vec::new();
    let mut refused_prev: Vec<String> = Vec::new();
    loop {
        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in sizes {
            loader.map_max_entries(name, *size);
        }
        // Mid-upgrade, the new programs read the previous conntrack and SNAT tables on a miss: hand them
        // those maps, where their layout is this build's.
        let prev = pins::previous_for_fallback(pin_dir);
        for (name, path, size) in prev.iter().filter(|(n, _, _)| !refused_prev.iter().any(|r| r == n)) {
            loader.map_pin_path(name, path.as_path());
            loader.map_max_entries(name, *size);
        }
        match loader.load(OBJECT) {
            Ok(ebpf) => {
                // The IPv6 programs' tables are this build's own, pinned once its programs serve (`ipv6_programs`);
                // per-packet scratch maps (`EXT_HEADERS6`, `XDP_SNAT_STEP6`) and the compiler's constant pools (`.rodata*`)
                // hold nothing that outlives a packet or this object, and are never pinned.
                let versioned = |name: &str| {
                    paths.iter().any(|(n, _)| *n == name)
                        || name.starts_with("PREV_")
                        || ipv6_programs::is_table(name)
                        || name == "EXT_HEADERS6"
                        || name == "XDP_SNAT_STEP6"
                        || name.starts_with(".rodata")
                };
                if let Some((name, _)) = ebpf.maps().find(|(name, _)| !versioned(name)) {
                    anyhow::bail!("map {name} of the eBPF object has no layout version (proxy_common::maps::LAYOUTS)");
                }
                let created = paths.iter().map(|(n, _)| *n).filter(|n| !adopted.contains(n)).collect();
                return Ok((ebpf, created));
            }
            Err(aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap { name, .. }))
                if name.starts_with("PREV_") && !refused_prev.contains(&name) =>
            {
                tracing::warn!(map = %name, "upgrade: the previous map cannot be read by this build; no fallback to it");
                refused_prev.push(name);
            }
            Err(aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap { name, property, .. }))
                if !retired.contains(&name) =>
            {
                let (name, path) = paths
                    .iter()
                    .find(|(n, _)| *n == name)
                    .with_context(|| format!("aya named an unknown map {name}"))?;
                pins::retire(pin_dir, name, path, property)?;
                adopted.remove(name);
                retired.push((*name).to_owned());
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
        self.sync_service_cidrs(table)?;
        self.finish_upgrade()?;
        self.finish_take_over()?;
        Ok(stats)
    }

    fn apply_changes(
        &mut self,
        table: &ServiceTable,
        changed: &std::collections::BTreeSet<crate::model::Frontend>,
    ) -> anyhow::Result<ApplyStats> {
        let stats = self.writer.apply_changes(table, changed)?;
        self.frontend_addrs.sync_changed(table, changed)?;
        self.sync_service_cidrs(table)?;
        self.finish_upgrade()?;
        self.finish_take_over()?;
        Ok(stats)
    }

    fn apply_full(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        self.writer.reread()?;
        let stats = self.writer.apply(table)?;
        self.frontend_addrs.sync_all(table)?;
        self.sync_service_cidrs(table)?;
        self.finish_upgrade()?;
        self.finish_take_over()?;
        Ok(stats)
    }

    fn occupancy(&self) -> Vec<(&'static str, usize)> {
        self.writer.occupancy()
    }

    fn housekeeping(&mut self) -> anyhow::Result<()> {
        // Mid-upgrade the previous programs stay on the interfaces until `finish_upgrade`.
        if self.upgrading {
            return Ok(());
        }
        self.release_conntrack_when_unused();
        if let Err(e) = self.ipv6_programs.pin() {
            tracing::warn!(error = %format!("{e:#}"), "pinning the IPv6 programs' tables in place; retried");
        }
        let interfaces = interfaces::list()?;
        let added = self.attachments.refresh(&mut self.ebpf, &self.roles, &interfaces)?;
        self.sync_egress_snat(&interfaces)?;
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{prefix_mask6, service_cidrs};
    use proxy_common::addr::In6;

    #[test]
    fn ipv6_masks_cover_their_prefix_only() {
        assert_eq!(prefix_mask6(0), In6::UNSPECIFIED);
        assert_eq!(prefix_mask6(128).octets(), [0xff; 16]);
        let m = prefix_mask6(60).octets();
        assert_eq!(m[..7], [0xff; 7]);
        assert_eq!(m[7], 0xf0);
        assert_eq!(m[8..], [0; 8]);
    }

    #[test]
    fn service_cidrs_go_to_their_family_masked() {
        let cidrs = [
            (IpAddr::V6("fd00:32::1".parse::<Ipv6Addr>().unwrap()), 108),
            (IpAddr::V4(Ipv4Addr::new(10, 32, 0, 9)), 16),
        ];
        let (v4, v6) = service_cidrs(&cidrs);
        assert_eq!(v4[0].addr.to_ne_bytes(), [10, 32, 0, 0]);
        assert_eq!(v4[1].mask, 0, "one IPv4 range");
        assert!(v6[0].contains(&In6::from_octets("fd00:32::ab".parse::<Ipv6Addr>().unwrap().octets())));
        assert!(!v6[0].contains(&In6::from_octets("fd00:33::1".parse::<Ipv6Addr>().unwrap().octets())));
        assert!(!v6[1].is_set(), "one IPv6 range");
    }
}
