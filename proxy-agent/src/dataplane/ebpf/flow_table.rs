//! The per-flow tables' housekeeping, for each family's tables (`CONNTRACK` and `CONNTRACK6`, `SNAT` and
//! `SNAT6`): a bounded background sweep of the connection table that removes flows past their
//! lifetime (the data path also refuses them on lookup) and reply entries whose flow is gone, and of `SNAT`
//! (ports of flows idle past their lifetime, and client entries whose port moved on), and the
//! metrics that tell an operator how full the tables are:
//! `proxy_agent_bpf_map_entries{map}`, `proxy_agent_bpf_map_capacity{map}`,
//! `proxy_agent_conntrack_expired_total` and `proxy_agent_conntrack_evictions_total`.
//!
//! The sweep reads the pinned map through its own file descriptor, a chunk of entries per tick, resuming
//! where it stopped, so a table of millions costs a little CPU often rather than a stall.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use proxy_common::{
    addr::In6,
    conntrack::{
        CtKey, CtValue, DIR_FORWARD, DIR_REPLY, DIR_SNAT_IN, FLAG_KERNEL_NAT, SnatValue, Timeouts, expired,
        snat_expired,
    },
    maps, stats,
};

use super::maps::MapAddr;

/// A pass's counts of a connection table.
#[derive(Clone, Copy, Default)]
struct Pass {
    entries: u64,
    flows: u64,
    kernel_flows: u64,
}

/// Entries looked at per tick.
const CHUNK: usize = 16_384;
/// Between ticks.
const TICK: Duration = Duration::from_millis(500);
/// A warning is logged when a table passes this share of its capacity, once until it falls below the
/// lower mark again.
const WARN_AT: f64 = 0.9;
const REARM_AT: f64 = 0.8;

/// What the sweep has seen, shared with the metrics.
#[derive(Debug, Default)]
pub struct FlowTableStats {
    /// Entries (forward + reply) at the end of the last complete pass.
    pub entries: AtomicU64,
    /// `SNAT` entries at the end of its last complete pass.
    pub snat_entries: AtomicU64,
    /// The same of `CONNTRACK6` and `SNAT6`.
    pub entries6: AtomicU64,
    pub snat_entries6: AtomicU64,
    /// Flows (forward entries) alive at the end of the last complete pass.
    pub flows: AtomicU64,
    /// Of those, flows left to the kernel's NAT (`FLAG_KERNEL_NAT`: translated by netfilter rules before
    /// the programs took over).
    pub kernel_flows: AtomicU64,
    /// Complete passes so far.
    pub passes: AtomicU64,
    /// Flows removed by the sweep for being past their lifetime.
    pub expired: AtomicU64,
    /// Whether a pass has completed (until then the counts mean nothing).
    pub measured: AtomicBool,
}

/// `BPF_MAP_GET_NEXT_KEY` from `key` (the first key when `None`); aya's iterators always start at the first.
fn next_key<A: MapAddr>(fd: BorrowedFd<'_>, key: Option<&CtKey<A>>) -> std::io::Result<Option<CtKey<A>>> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let mut next = std::mem::MaybeUninit::<CtKey<A>>::uninit();
    let attr = Attr {
        map_fd: u32::try_from(fd.as_raw_fd()).unwrap_or_default(),
        pad: 0,
        key: key.map_or(0, |k| std::ptr::from_ref(k) as u64),
        next_key: next.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command, its pointers point at a key-sized value
    // and a key-sized buffer that outlive the call, and its size is passed.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_GET_NEXT_KEY, std::ptr::from_ref(&attr), size_of::<Attr>()) };
    if rc == 0 {
        // SAFETY: on success the kernel wrote a whole key.
        return Ok(Some(unsafe { next.assume_init() }));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(err) }
}

/// Seconds of `CLOCK_MONOTONIC`, the clock the data path stamps entries with.
pub(super) fn now_secs() -> u32 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t) };
    u32::try_from(t.tv_sec).unwrap_or(u32::MAX)
}

/// The key of the other entry of a flow: a forward entry's reply entry, or a reply entry's forward entry.
fn peer_key<A: MapAddr>(key: &CtKey<A>, value: &CtValue<A>) -> CtKey<A> {
    if key.dir == DIR_FORWARD {
        CtKey {
            src_addr: value.nat_addr,
            dst_addr: key.src_addr,
            src_port: value.nat_port,
            dst_port: value.client_port,
            proto: key.proto,
            dir: DIR_REPLY,
            pad: 0,
        }
    } else {
        CtKey {
            src_addr: key.dst_addr,
            dst_addr: value.nat_addr,
            src_port: value.client_port,
            dst_port: value.nat_port,
            proto: key.proto,
            dir: DIR_FORWARD,
            pad: 0,
        }
    }
}

/// A resumable walk over a pinned map keyed by `CtKey` (`CONNTRACK`, `SNAT`).
///
/// Only the entry at hand is ever deleted, after the walk has read the key that follows it: the kernel
/// restarts a walk from the first key when asked for the successor of a key that is gone, which would count
/// entries twice.
struct Walk<A: MapAddr, V: aya::Pod> {
    map: aya::maps::HashMap<aya::maps::MapData, CtKey<A>, V>,
    /// The same map, opened again for the resumable walk (aya's map keeps its descriptor to itself).
    keys: aya::maps::MapData,
    cursor: Option<CtKey<A>>,
    /// Entries kept so far in this pass.
    kept: u64,
    /// The map's `max_entries`.
    capacity: u64,
}

impl<A: MapAddr, V: aya::Pod> Walk<A, V> {
    fn open(pin_dir: &Path, name: &str) -> anyhow::Result<(Self, u64)> {
        let pin = super::pins::path(pin_dir, name);
        let open = || aya::maps::MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()));
        let data = open()?;
        let capacity = u64::from(data.info()?.max_entries());
        let map = aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data)?)?;
        Ok((Self { map, keys: open()?, cursor: None, kept: 0, capacity }, capacity))
    }

    /// Looks at up to `limit` entries from where the last call stopped, removing those `ended` says have
    /// ended. Returns the entries kept over the pass, when this call completed one.
    fn step(
        &mut self,
        limit: usize,
        mut ended: impl FnMut(&aya::maps::HashMap<aya::maps::MapData, CtKey<A>, V>, &CtKey<A>, &V) -> bool,
    ) -> anyhow::Result<Option<u64>> {
        let mut key = match self.cursor.take() {
            Some(k) => Some(k),
            None => next_key(self.keys.fd().as_fd(), None).context("walking the map")?,
        };
        for _ in 0..limit {
            let Some(k) = key else { break };
            key = next_key(self.keys.fd().as_fd(), Some(&k)).context("walking the map")?;
            let Ok(value) = self.map.get(&k, 0) else { continue };
            if ended(&self.map, &k, &value) {
                let _ = self.map.remove(&k);
            } else {
                self.kept += 1;
            }
        }
        self.cursor = key;
        // A table churning under a flood evicts the walk's cursor between ticks, and the kernel then
        // continues from the first key: a pass may meet keys twice. What it counts is an estimate, and
        // never more than the table holds.
        Ok(self.cursor.is_none().then(|| std::mem::take(&mut self.kept).min(self.capacity)))
    }

    fn restart(&mut self) {
        self.cursor = None;
        self.kept = 0;
    }
}

/// One family's connection and SNAT tables, and the counts of the pass under way.
struct Tables<A: MapAddr> {
    conntrack: Walk<A, CtValue<A>>,
    snat: Walk<A, SnatValue<A>>,
    flows: u64,
    kernel_flows: u64,
}

impl<A: MapAddr> Tables<A> {
    fn open(pin_dir: &Path, conntrack: &str, snat: &str) -> anyhow::Result<(Self, u64)> {
        let (conntrack, capacity) = Walk::open(pin_dir, conntrack)?;
        let (snat, _) = Walk::open(pin_dir, snat)?;
        Ok((Self { conntrack, snat, flows: 0, kernel_flows: 0 }, capacity))
    }

    /// Looks at up to `limit` entries of each table (see [`Sweeper::step`]). Returns the connection
    /// table's pass and the SNAT table's kept entries, for the passes this call completed.
    fn step(
        &mut self,
        limit: usize,
        now: u32,
        t: Timeouts,
        stats: &FlowTableStats,
    ) -> anyhow::Result<(Option<Pass>, Option<u64>)> {
        let (mut flows, mut kernel_flows) = (0, 0);
        let pass = self.conntrack.step(limit, |map, k, value| {
            if k.dir == DIR_FORWARD {
                let ended = expired(&t, k.proto, value, now);
                if ended {
                    stats.expired.fetch_add(1, Ordering::Relaxed);
                } else {
                    flows += 1;
                    kernel_flows += u64::from(value.flags & FLAG_KERNEL_NAT != 0);
                }
                return ended;
            }
            let fkey = peer_key(k, value);
            // A reply entry goes with its flow: expired, gone, or replaced by another.
            !map.get(&fkey, 0).is_ok_and(|fwd| peer_key(&fkey, &fwd) == *k && !expired(&t, k.proto, &fwd, now))
        })?;
        self.flows += flows;
        self.kernel_flows += kernel_flows;
        let snat_pass = self.snat.step(limit, |map, k, value| {
            if k.dir == DIR_SNAT_IN {
                return snat_expired(&t, k.proto, value, now);
            }
            let in_key = CtKey {
                src_addr: k.dst_addr,
                dst_addr: value.addr,
                src_port: k.dst_port,
                dst_port: value.port,
                proto: k.proto,
                dir: DIR_SNAT_IN,
                pad: 0,
            };
            !map.get(&in_key, 0).is_ok_and(|back| back.addr == k.src_addr && back.port == k.src_port)
        })?;
        let pass = pass.map(|entries| Pass {
            entries,
            flows: std::mem::take(&mut self.flows),
            kernel_flows: std::mem::take(&mut self.kernel_flows),
        });
        Ok((pass, snat_pass))
    }

    fn restart(&mut self) {
        self.conntrack.restart();
        self.snat.restart();
        self.flows = 0;
        self.kernel_flows = 0;
    }
}

/// Sweeps both families' `CONNTRACK` and `SNAT` maps pinned in a directory.
pub struct Sweeper {
    v4: Tables<u32>,
    v6: Tables<In6>,
    /// Complete passes of each family's connection table not yet reported together: a pass is reported
    /// (and counted in `passes`, which the conntrack keeper waits on) only once both tables have completed
    /// one since the last report, so neither family's flows go uncounted.
    pass4: Option<Pass>,
    pass6: Option<Pass>,
    timeouts: Timeouts,
    /// Each family's connection table's capacity, and whether its fullness was warned about.
    full4: Fullness,
    full6: Fullness,
    stats: Arc<FlowTableStats>,
}

/// One connection table's capacity, and whether the warning that it is nearly full was given (once, until
/// it falls below the lower mark again).
struct Fullness {
    map: &'static str,
    capacity: u64,
    warned: bool,
}

impl Fullness {
    fn new(map: &'static str, capacity: u64) -> Self {
        Self { map, capacity, warned: false }
    }

    /// Warns when a pass found `entries` past [`WARN_AT`] of the capacity.
    fn check(&mut self, entries: u64) {
        #[expect(clippy::cast_precision_loss, reason = "a share, not a count")]
        let share = entries as f64 / self.capacity.max(1) as f64;
        if share >= WARN_AT && !self.warned {
            tracing::warn!(
                map = self.map,
                entries,
                capacity = self.capacity,
                "the connection table is over 90% full: the oldest idle flows are being evicted; raise \
                 --conntrack-max-per-core or --conntrack-min"
            );
            self.warned = true;
        } else if share < REARM_AT {
            self.warned = false;
        }
    }
}

impl Sweeper {
    pub fn open(pin_dir: &Path, timeouts: Timeouts, stats: Arc<FlowTableStats>) -> anyhow::Result<Self> {
        let (v4, capacity) = Tables::open(pin_dir, maps::CONNTRACK, maps::SNAT)?;
        let (v6, capacity6) = Tables::open(pin_dir, maps::CONNTRACK6, maps::SNAT6)?;
        let (full4, full6) = (Fullness::new(maps::CONNTRACK, capacity), Fullness::new(maps::CONNTRACK6, capacity6));
        Ok(Self { v4, v6, pass4: None, pass6: None, timeouts, full4, full6, stats })
    }

    /// Looks at up to `limit` entries of each map. Returns whether a pass of both connection tables completed.
    ///
    /// A connection table: an expired flow's forward entry goes when the walk meets it, and its reply
    /// entry when the walk meets that (its flow expired, or gone). A SNAT table: a port's entry (backend →
    /// node port) goes when its flow has been idle past its lifetime, and a client's entry when the port's
    /// entry no longer names it.
    pub fn step(&mut self, limit: usize) -> anyhow::Result<bool> {
        let now = now_secs();
        let stats = self.stats.clone();
        let (pass6, snat6) = self.v6.step(limit, now, self.timeouts, &stats)?;
        if let Some(pass) = pass6 {
            self.pass6 = Some(pass);
            stats.entries6.store(pass.entries, Ordering::Relaxed);
        }
        if let Some(kept) = snat6 {
            stats.snat_entries6.store(kept, Ordering::Relaxed);
        }
        let (pass, snat) = self.v4.step(limit, now, self.timeouts, &stats)?;
        if let Some(kept) = snat {
            stats.snat_entries.store(kept, Ordering::Relaxed);
        }
        if let Some(pass) = pass {
            self.pass4 = Some(pass);
        }
        let (Some(p4), Some(p6)) = (self.pass4, self.pass6) else { return Ok(false) };
        (self.pass4, self.pass6) = (None, None);
        self.finish_pass(p4, p6);
        Ok(true)
    }

    /// Reports a pass of both families' tables; warns of either table nearly full.
    fn finish_pass(&mut self, p4: Pass, p6: Pass) {
        self.stats.entries.store(p4.entries, Ordering::Relaxed);
        self.stats.flows.store(p4.flows + p6.flows, Ordering::Relaxed);
        self.stats.kernel_flows.store(p4.kernel_flows + p6.kernel_flows, Ordering::Relaxed);
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats.measured.store(true, Ordering::Relaxed);
        self.full4.check(p4.entries);
        self.full6.check(p6.entries);
    }

    /// Sweeps forever on a thread of its own, a chunk per tick.
    pub fn spawn(mut self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("flow-sweep".into())
            .spawn(move || {
                loop {
                    if let Err(e) = self.step(CHUNK) {
                        tracing::warn!(error = %format!("{e:#}"), "conntrack sweep failed; retrying");
                        self.v4.restart();
                        self.v6.restart();
                        (self.pass4, self.pass6) = (None, None);
                    }
                    std::thread::sleep(TICK);
                }
            })
            .expect("spawning the sweep thread")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// The per-flow tables' metrics, read at each scrape from the sweep's counts and the pinned maps.
#[derive(Debug)]
pub struct FlowTableMetrics {
    pin_dir: PathBuf,
    stats: Arc<FlowTableStats>,
}

impl FlowTableMetrics {
    #[must_use]
    pub fn new(pin_dir: &Path, stats: Arc<FlowTableStats>) -> Self {
        Self { pin_dir: pin_dir.to_owned(), stats }
    }

    fn capacity(&self, map: &str) -> Option<u64> {
        let data = aya::maps::MapData::from_pin(super::pins::path(&self.pin_dir, map)).ok()?;
        Some(u64::from(data.info().ok()?.max_entries()))
    }

    /// The data path's flow counters (`proxy_common::stats`), summed over CPUs.
    fn datapath_counter(&self, index: u32) -> Option<u64> {
        let data = aya::maps::MapData::from_pin(super::pins::path(&self.pin_dir, maps::STATS)).ok()?;
        let counters: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::from_map_data(data).ok()?).ok()?;
        Some(counters.get(&index, 0).ok()?.iter().sum())
    }

    /// Flows the table dropped to make room: every flow created, less those ended by the data path or the
    /// sweep, less those alive now. An estimate between two passes of the sweep; exact when flows are few.
    fn evictions(&self) -> u64 {
        let created = self.datapath_counter(stats::CT_CREATED).unwrap_or(0);
        let ended = self.datapath_counter(stats::CT_ENDED).unwrap_or(0);
        let swept = self.stats.expired.load(Ordering::Relaxed);
        let alive = self.stats.flows.load(Ordering::Relaxed);
        created.saturating_sub(ended + swept + alive)
    }
}

impl Collector for FlowTableMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut capacity = encoder.encode_descriptor(
            "proxy_agent_bpf_map_capacity",
            "Entries each per-flow eBPF map can hold (conntrack: two per flow)",
            None,
            MetricType::Gauge,
        )?;
        for map in [
            maps::CONNTRACK,
            maps::SNAT,
            maps::FRAGS,
            maps::AFFINITY,
            maps::SOCK_FLOWS,
            maps::CONNTRACK6,
            maps::SNAT6,
            maps::FRAGS6,
            maps::AFFINITY6,
        ] {
            if let Some(c) = self.capacity(map) {
                ConstGauge::new(i64::try_from(c).unwrap_or(i64::MAX))
                    .encode(capacity.encode_family(&MapLabel { map })?)?;
            }
        }
        if !self.stats.measured.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut entries = encoder.encode_descriptor(
            "proxy_agent_bpf_map_entries",
            "Entries in each per-flow eBPF map, as of the sweep's last complete pass",
            None,
            MetricType::Gauge,
        )?;
        for (map, n) in [
            (maps::CONNTRACK, &self.stats.entries),
            (maps::SNAT, &self.stats.snat_entries),
            (maps::CONNTRACK6, &self.stats.entries6),
            (maps::SNAT6, &self.stats.snat_entries6),
        ] {
            let n = i64::try_from(n.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
            ConstGauge::new(n).encode(entries.encode_family(&MapLabel { map })?)?;
        }
        let expired = encoder.encode_descriptor(
            "proxy_agent_conntrack_expired",
            "Flows the sweep removed for being idle past their lifetime",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.stats.expired.load(Ordering::Relaxed)).encode(expired)?;
        let evictions = encoder.encode_descriptor(
            "proxy_agent_conntrack_evictions",
            "Flows the connection table dropped to make room for new ones (estimated; see docs/operations.md)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.evictions()).encode(evictions)?;
        Ok(())
    }
}
