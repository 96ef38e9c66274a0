//! Changing dataplanes on a live node without dropping a flow: from kube-proxy's rules (or a netfilter
//! mode's) to the eBPF programs, and back.
//!
//! Netfilter translates a flow once, on its first packet, and keeps the translation in the kernel's
//! conntrack for the flow's life, whatever later happens to the rules. The eBPF programs translate at TC,
//! before netfilter sees a packet, from their own `CONNTRACK`. So each direction is a matter of who sees a
//! flow's packets first:
//!
//! - **Taking over** ([`TakeOver`]): the programs start with `FLAG_HANDOVER`, under which a packet to a
//!   frontend whose flow they have not translated passes to the rules still in place, and its flow is
//!   recorded as the kernel's (`FLAG_KERNEL_NAT`: pass, always). Once the first table is in, every flow the
//!   kernel's conntrack holds translated is recorded the same way (those that sent nothing since), the flag
//!   is cleared, and only then are the rules removed. Flows the kernel translated stay with it until they
//!   end; every new one is the programs'.
//! - **Handing back** ([`Drain`]): a netfilter mode that finds the programs running installs its rules
//!   first, then sets `FLAG_DRAIN`: flows the programs translated keep their translation, everything else
//!   (new flows, new sockets) passes to the rules. When no translated flow is left, or after the drain
//!   timeout, the pins go and the programs with them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use proxy_common::{
    addr::In6,
    config::{Config, FLAG_DRAIN},
    conntrack::{CtKey, CtValue, DIR_FORWARD, FLAG_KERNEL_NAT, Timeouts, closed, expired, state},
    maps,
};

use super::maps::MapAddr;

use std::{collections::BTreeSet, fmt::Write as _};

use crate::{
    dataplane::{ApplyStats, Dataplane, conntrack::TranslatedFlow},
    model::{Frontend, ServiceTable},
};

/// `BPF_NOEXIST`: create, never overwrite.
const BPF_NOEXIST: u64 = 1;

/// A family's flow table, as the agent opens it.
type FlowTable<A> = aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>;

/// The forward entry that leaves `flow` to the kernel's NAT, stamped `now` (seconds of `CLOCK_MONOTONIC`),
/// if `flow` is of family `A`. Recorded as established: a SYN on its tuple is a new connection, the
/// programs'.
fn kernel_entry<A: MapAddr>(flow: &TranslatedFlow, now: u32) -> Option<(CtKey<A>, CtValue<A>)> {
    let key = CtKey {
        src_addr: A::from_ip(flow.source.0)?,
        dst_addr: A::from_ip(flow.destination.0)?,
        src_port: flow.source.1.to_be(),
        dst_port: flow.destination.1.to_be(),
        proto: flow.protocol,
        dir: DIR_FORWARD,
        pad: 0,
    };
    let tcp = i32::from(flow.protocol) == libc::IPPROTO_TCP;
    let value = CtValue {
        nat_addr: key.dst_addr,
        nat_port: key.dst_port,
        client_port: key.src_port,
        backend_id: 0,
        rev_nat_id: 0,
        flags: FLAG_KERNEL_NAT,
        // A handshake the kernel is still answering: a retransmitted SYN stays with it.
        state: match (tcp, flow.handshake) {
            (true, false) => state::SYN | state::SYN_ACK | state::ESTABLISHED,
            (true, true) => state::SYN | state::SYN_ACK,
            (false, _) => 0,
        },
        created: now,
        last_seen: now,
    };
    Some((key, value))
}

/// Records each of `flows` of family `A` in `table` as the kernel's; returns how many were new to it.
fn record<A: MapAddr>(table: &mut FlowTable<A>, flows: &[TranslatedFlow], now: u32) -> usize {
    let mut recorded = 0;
    for (flow, (key, value)) in flows.iter().filter_map(|f| Some((f, kernel_entry::<A>(f, now)?))) {
        // BPF_NOEXIST: a flow the programs already know (recorded since they attached) keeps its entry.
        match table.insert(&key, &value, BPF_NOEXIST) {
            Ok(()) => recorded += 1,
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                // A full table: the flow is picked afresh by the programs on its next packet (its
                // connection resets); every other flow is still handed over.
                tracing::warn!(flow = ?flow, error = %e, "could not leave a flow to the kernel's NAT");
            }
        }
    }
    recorded
}

/// The nftables tables (one per family: conntrack and its NAT hooks are registered per family) that keep
/// the kernel's connection tracking on in this network namespace while flows its NAT translated may be
/// alive. The kernel tracks connections only while some rule uses conntrack; on a node where kube-proxy's
/// rules were the last such users, removing them stops conntrack, and with it the NAT of every flow they
/// translated. Each table's one rule (a counter of invalid packets, which changes nothing) keeps it on
/// until no such flow is left.
const KEEPER: &str = "proxy-agent-conntrack";
const KEEPER_FAMILIES: [&str; 2] = ["ip", "ip6"];

/// Installs [`KEEPER`] (again: the same table, atomically).
pub fn keep_conntrack() -> anyhow::Result<()> {
    // The NAT of existing connections is applied by the kernel's NAT hooks, which exist only while some
    // `nat` chain is registered at the hook: one empty chain per hook keeps them (kube-proxy's nftables
    // table, removed whole, took its own with it).
    let mut nat_chains = String::new();
    for (hook, priority) in [("prerouting", "-100"), ("input", "100"), ("output", "-100"), ("postrouting", "100")] {
        let _ = writeln!(
            nat_chains,
            "  chain nat-{hook} {{\n    type nat hook {hook} priority {priority}; policy accept;\n  }}"
        );
    }
    // One transaction per family: a kernel without IPv6 refuses the ip6 table, and IPv4's must not go
    // with it.
    let mut failed = Vec::new();
    for family in KEEPER_FAMILIES {
        let ruleset = format!(
            "table {family} {KEEPER}\ndelete table {family} {KEEPER}\ntable {family} {KEEPER} {{\n  chain keep {{\n    type filter hook prerouting priority raw; policy accept;\n    ct state invalid counter comment \"keeps conntrack on for flows kube-proxy's rules translated\"\n  }}\n{nat_chains}}}\n"
        );
        if let Err(e) = crate::dataplane::netfilter::run_with_input("nft", &["-f", "-"], &ruleset) {
            failed.push(format!("{family}: {e:#}"));
        }
    }
    anyhow::ensure!(failed.is_empty(), "installing the nftables tables that keep conntrack on: {}", failed.join("; "));
    Ok(())
}

/// The [`KEEPER`] tables installed (by this agent or a previous one), by family.
fn kept_families() -> Vec<&'static str> {
    KEEPER_FAMILIES
        .into_iter()
        .filter(|family| {
            std::process::Command::new("nft")
                .args(["--terse", "list", "table", family, KEEPER])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect()
}

/// Whether a [`KEEPER`] table is installed (by this agent or a previous one, which may have kept IPv4's
/// only).
#[must_use]
pub fn conntrack_kept() -> bool {
    !kept_families().is_empty()
}

/// Removes the [`KEEPER`] tables that are there.
pub fn release_conntrack() -> anyhow::Result<()> {
    let mut script = String::new();
    for family in kept_families() {
        let _ = writeln!(script, "delete table {family} {KEEPER}");
    }
    if !script.is_empty() {
        crate::dataplane::netfilter::run_with_input("nft", &["-f", "-"], &script)?;
    }
    Ok(())
}

/// Taking the node's Service traffic over from netfilter rules: started before the programs attach, done
/// after the first table is in ([`TakeOver::finish`]).
pub struct TakeOver {
    iptables: bool,
    nftables: bool,
}

impl TakeOver {
    /// Whether netfilter rules serve Services here now (kube-proxy's, or a netfilter mode's); `None` if not,
    /// and nothing needs handing over.
    #[must_use]
    pub fn needed() -> Option<Self> {
        use crate::dataplane::{iptables, nftables};
        let iptables = iptables::installed_here() || iptables::ipv6_installed_here();
        let nftables = nftables::installed_here() || nftables::ipv6_installed_here();
        (iptables || nftables).then_some(Self { iptables, nftables })
    }

    /// Records every flow the kernel's conntrack holds translated as the kernel's, each family in its own
    /// table (the programs already record those that sent a packet since they attached), then, with
    /// `finish_handover` (which clears `FLAG_HANDOVER`), lets new flows be the programs', and removes the
    /// rules. Returns the flows recorded.
    pub fn finish(
        &self,
        (conntrack, conntrack6): (&mut FlowTable<u32>, &mut FlowTable<In6>),
        finish_handover: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<usize> {
        let flows = crate::dataplane::conntrack::translated_flows().context("reading the kernel's conntrack")?;
        let now = super::flow_table::now_secs();
        let recorded = record(conntrack, &flows, now) + record(conntrack6, &flows, now);
        finish_handover()?;
        // Before the rules go: they may be what keeps conntrack, and so their flows' NAT, running.
        if let Err(e) = keep_conntrack() {
            tracing::warn!(error = %format!("{e:#}"), "flows the rules translated keep their NAT only if something else uses conntrack here");
        }
        let mut removed = Vec::new();
        if self.iptables {
            removed.push(format!(
                "{} iptables chains",
                crate::dataplane::iptables::cleanup().context("removing the KUBE- iptables chains")?
            ));
        }
        if self.nftables {
            removed.push(format!(
                "{} nftables tables",
                crate::dataplane::nftables::cleanup().context("removing the nftables tables")?
            ));
        }
        tracing::info!(
            kernel_flows = flows.len(),
            recorded,
            removed = %removed.join(", "),
            "took over from the netfilter rules: flows they translated stay with the kernel's NAT until they end"
        );
        Ok(recorded)
    }
}

/// The eBPF programs another agent left running, being drained into a netfilter mode's rules.
pub struct Drain {
    pin_dir: PathBuf,
    timeouts: Timeouts,
    /// The drain ends by this time even with translated flows left (they then go to the rules, which pick
    /// a backend afresh).
    deadline: Instant,
    started: bool,
}

impl Drain {
    /// The programs pinned under `pin_dir`, if any run there.
    #[must_use]
    pub fn needed(pin_dir: &Path, timeouts: Timeouts, timeout: Duration) -> Option<Self> {
        super::pins::path(pin_dir, maps::CONFIG).exists().then(|| Self {
            pin_dir: pin_dir.to_owned(),
            timeouts,
            deadline: Instant::now() + timeout,
            started: false,
        })
    }

    /// Sets `FLAG_DRAIN`: from now on the rules (installed, as the caller makes sure) take every new flow.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let pin = super::pins::path(&self.pin_dir, maps::CONFIG);
        let data = aya::maps::MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let mut config: aya::maps::Array<_, Config> = aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
        let mut value = config.get(&0, 0).context("reading CONFIG")?;
        value.flags |= FLAG_DRAIN;
        config.set(0, &value, 0).context("writing CONFIG")?;
        self.started = true;
        tracing::info!(
            pins = %self.pin_dir.display(),
            "draining the eBPF dataplane: new flows go to the rules, flows it translated keep their translation until they end"
        );
        Ok(())
    }

    #[must_use]
    pub fn started(&self) -> bool {
        self.started
    }

    /// Flows the programs translated that are still alive, of both families.
    pub fn live_flows(&self) -> anyhow::Result<usize> {
        Ok(self.live_flows_of::<u32>(maps::CONNTRACK)? + self.live_flows_of::<In6>(maps::CONNTRACK6)?)
    }

    fn live_flows_of<A: MapAddr>(&self, name: &str) -> anyhow::Result<usize> {
        let pin = super::pins::path(&self.pin_dir, name);
        if !pin.exists() && name == maps::CONNTRACK6 {
            // Programs of a version without IPv6 flow tables.
            return Ok(0);
        }
        let data = aya::maps::MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let map: FlowTable<A> = aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
        let now = super::flow_table::now_secs();
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                k.dir == DIR_FORWARD
                    && v.flags & FLAG_KERNEL_NAT == 0
                    && !expired(&self.timeouts, k.proto, v, now)
                    && !(i32::from(k.proto) == libc::IPPROTO_TCP && closed(v))
            })
            .count())
    }

    /// Once no translated flow is left (or the deadline passed): removes the pins, which detaches the
    /// programs. Returns whether the drain is over.
    pub fn try_finish(&mut self) -> anyhow::Result<bool> {
        let live = self.live_flows()?;
        let overdue = Instant::now() >= self.deadline;
        if live > 0 && !overdue {
            tracing::debug!(live, "draining the eBPF dataplane");
            return Ok(false);
        }
        if live > 0 {
            tracing::warn!(live, "drain timeout: the eBPF dataplane's last flows go to the rules");
        }
        super::cleanup(&self.pin_dir)?;
        // This mode's rules use conntrack themselves; a take-over's keeper table has no more to do.
        release_conntrack()?;
        tracing::info!(pins = %self.pin_dir.display(), "eBPF dataplane drained and removed");
        Ok(true)
    }
}

/// A netfilter dataplane that, once its own rules are in, drains the eBPF programs it found running.
pub struct Draining {
    inner: Box<dyn Dataplane>,
    drain: Option<Drain>,
}

impl Draining {
    #[must_use]
    pub fn new(inner: Box<dyn Dataplane>, drain: Drain) -> Self {
        Self { inner, drain: Some(drain) }
    }

    /// After an apply succeeded: the rules are in, so the drain can start.
    fn rules_in(&mut self) {
        let Some(drain) = self.drain.as_mut().filter(|d| !d.started()) else { return };
        if let Err(e) = drain.start() {
            // Unreadable pins (another layout, a broken bpffs): the old way, all at once.
            tracing::warn!(error = %e, "cannot drain the eBPF dataplane; removing it now");
            self.abandon();
        }
    }

    fn abandon(&mut self) {
        if let Some(drain) = self.drain.take()
            && let Err(e) = super::cleanup(&drain.pin_dir)
        {
            tracing::warn!(error = %e, "removing the eBPF dataplane's pins");
        }
    }
}

impl Dataplane for Draining {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn apply(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        let stats = self.inner.apply(table)?;
        self.rules_in();
        Ok(stats)
    }

    fn apply_changes(&mut self, table: &ServiceTable, changed: &BTreeSet<Frontend>) -> anyhow::Result<ApplyStats> {
        let stats = self.inner.apply_changes(table, changed)?;
        self.rules_in();
        Ok(stats)
    }

    fn apply_full(&mut self, table: &ServiceTable) -> anyhow::Result<ApplyStats> {
        let stats = self.inner.apply_full(table)?;
        self.rules_in();
        Ok(stats)
    }

    fn occupancy(&self) -> Vec<(&'static str, usize)> {
        self.inner.occupancy()
    }

    fn housekeeping(&mut self) -> anyhow::Result<()> {
        self.inner.housekeeping()?;
        let Some(drain) = self.drain.as_mut().filter(|d| d.started()) else { return Ok(()) };
        match drain.try_finish() {
            Ok(true) => self.drain = None,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "checking the eBPF dataplane's drain");
                self.abandon();
            }
        }
        Ok(())
    }
}
