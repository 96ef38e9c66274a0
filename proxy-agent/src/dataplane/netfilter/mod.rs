//! What the two netfilter dataplanes (iptables and nftables) share: the node settings that shape their rules,
//! the grouping of frontends into kube-proxy's unit of rules (one Service port), the [`plan`] of rules both
//! print, the [`dataplane`] that applies either, the stale-UDP conntrack cleanup, and feeding a ruleset to a
//! restore tool.

pub mod dataplane;
pub mod plan;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    process::{Command, Stdio},
};

use super::conntrack::StaleUdp;
use crate::model::{
    BackendSet, ClusterCidrs, Endpoint, Frontend, FrontendEntry, FrontendKind, Protocol, ServicePortName, ServiceTable,
};

/// kube-proxy's default masquerade bit (`--iptables-masquerade-bit`): mark 0x4000.
pub const DEFAULT_MASQUERADE_BIT: u8 = 14;

/// Node-wide settings that shape the rules.
#[derive(Clone, Debug)]
pub struct RuleConfig {
    pub masquerade_all: bool,
    /// The packet-mark bit that says "masquerade" (kube-proxy's `masqueradeBit`, 14 unless told).
    pub masquerade_bit: u8,
    /// kube-proxy's `clusterCIDR`, one per family.
    pub cluster_cidrs: ClusterCidrs,
    /// Pod-facing interface patterns (`veth*`): kube-proxy's `InterfaceNamePrefix` local-traffic detection,
    /// so pod traffic to a Local-policy Service's external addresses reaches every endpoint.
    pub pod_interfaces: Vec<String>,
    /// `nf_conntrack_tcp_be_liberal` is on (set by `--conntrack-tcp-be-liberal` or by the node): conntrack
    /// marks no segment INVALID for being out of window, so the rule dropping INVALID forwarded packets is
    /// left out, as kube-proxy does.
    pub tcp_be_liberal: bool,
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self {
            masquerade_all: false,
            masquerade_bit: DEFAULT_MASQUERADE_BIT,
            cluster_cidrs: ClusterCidrs::default(),
            pod_interfaces: Vec::new(),
            tcp_be_liberal: false,
        }
    }
}

impl RuleConfig {
    /// The masquerade mark: the bit as a mask.
    #[must_use]
    pub fn masq_mark(&self) -> u32 {
        1 << self.masquerade_bit
    }

    /// The pod interface patterns netfilter can match: exact names and prefixes (a single trailing `*`).
    pub fn pod_interface_patterns(&self) -> impl Iterator<Item = &str> {
        self.pod_interfaces.iter().map(String::as_str).filter(|p| !p.trim_end_matches('*').contains('*'))
    }
}

/// An IP family: kube-proxy runs one proxier per family, and so do the netfilter modes (one plan, one
/// iptables or nftables table per family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Self; 2] = [Self::V4, Self::V6];

    #[must_use]
    pub fn is_ipv6(self) -> bool {
        self == Self::V6
    }

    /// A host route's prefix length.
    #[must_use]
    pub fn host_len(self) -> u8 {
        if self.is_ipv6() { 128 } else { 32 }
    }
}

/// All frontends of one Service port and protocol, gathered: kube-proxy's unit of rules.
pub struct ServicePort<'a> {
    pub name: &'a ServicePortName,
    pub protocol: Protocol,
    pub entries: Vec<(Frontend, &'a FrontendEntry)>,
}

impl ServicePort<'_> {
    /// Every endpoint usable cluster-wide: the set pods use at a node port, external or load-balancer
    /// address (no policy narrows it). A ClusterIP-only port has only its ClusterIP's set, which
    /// internalTrafficPolicy Local narrows to the local endpoints; then that is the port's only set.
    #[must_use]
    pub fn cluster_set(&self) -> &BackendSet {
        let internal_of_external_kinds =
            self.entries.iter().find(|(_, e)| e.kind != FrontendKind::ClusterIp).map(|(_, e)| &e.internal);
        let of_cluster_ip =
            self.entries.iter().find(|(_, e)| e.kind == FrontendKind::ClusterIp).map(|(_, e)| &e.internal);
        internal_of_external_kinds.or(of_cluster_ip).expect("a service port has a frontend")
    }

    /// The endpoints a Local policy sends to: the model's local set (ready local endpoints, else the
    /// serving-and-terminating local ones), as the frontend whose policy is Local carries it. They are not
    /// always among the cluster set's: a node whose endpoints all terminate while others elsewhere are
    /// ready still sends its external traffic to them, as kube-proxy does.
    #[must_use]
    pub fn local_endpoints(&self) -> Vec<Endpoint> {
        let cluster = &self.cluster_set().endpoints;
        let local_set = self.entries.iter().find_map(|(_, e)| match e.kind {
            FrontendKind::ClusterIp => (&e.internal.endpoints != cluster).then_some(&e.internal.endpoints),
            _ => (!e.masquerade_external).then_some(&e.external.endpoints),
        });
        local_set.map_or_else(|| cluster.iter().filter(|e| e.local).copied().collect(), Clone::clone)
    }

    /// Whether some frontend sends traffic to the local endpoints only: internalTrafficPolicy Local on the
    /// ClusterIP, or externalTrafficPolicy Local.
    #[must_use]
    pub fn uses_local(&self) -> bool {
        let cluster = &self.cluster_set().endpoints;
        self.entries.iter().any(|(_, e)| {
            if e.kind == FrontendKind::ClusterIp { &e.internal.endpoints != cluster } else { !e.masquerade_external }
        })
    }

    /// Every endpoint some chain of the port DNATs to.
    #[must_use]
    pub fn all_endpoints(&self) -> BTreeSet<Endpoint> {
        let mut all: BTreeSet<Endpoint> = self.cluster_set().endpoints.iter().copied().collect();
        all.extend(self.local_endpoints());
        all
    }

    /// The session-affinity timeout (the same on every frontend of a port).
    #[must_use]
    pub fn affinity(&self) -> Option<u32> {
        self.entries[0].1.affinity_timeout
    }

    /// The frontend external traffic uses, whose policy decides the external chain (a ClusterIP's says
    /// Cluster); `None` for a ClusterIP-only port.
    #[must_use]
    pub fn external_entry(&self) -> Option<&FrontendEntry> {
        self.entries.iter().find(|(_, e)| e.kind != FrontendKind::ClusterIp).map(|(_, e)| *e)
    }
}

/// The frontends of `family` grouped by Service port and protocol, in a stable order.
#[must_use]
pub fn service_ports(table: &ServiceTable, family: Family) -> Vec<ServicePort<'_>> {
    let mut ports: BTreeMap<(&ServicePortName, Protocol), Vec<(Frontend, &FrontendEntry)>> = BTreeMap::new();
    for (f, e) in table.frontends.iter().filter(|(f, _)| f.addr.is_ipv6() == family.is_ipv6()) {
        ports.entry((&e.service, f.protocol)).or_default().push((*f, e));
    }
    ports.into_iter().map(|((name, protocol), entries)| ServicePort { name, protocol, entries }).collect()
}

/// UDP flows have no end the kernel can see: conntrack would keep sending a client's packets to an
/// endpoint that is gone (the stale-DNS failure kube-proxy users know). As kube-proxy does, delete the
/// conntrack entries of UDP frontends whose endpoints went away. A failure is logged, not fatal: the rules
/// are in place, and only flows started before the change are affected.
pub fn clear_stale_udp(old: &ServiceTable, new: &ServiceTable) {
    let stale = stale_udp(old, new);
    match super::conntrack::delete_stale_udp(&stale) {
        Ok(0) => {}
        Ok(deleted) => tracing::debug!(deleted, pairs = stale.len(), "deleted stale UDP conntrack entries"),
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                pairs = stale.len(),
                "deleting stale UDP conntrack entries failed"
            );
        }
    }
}

/// The (UDP frontend, endpoint) pairs of `old` whose endpoint `new` no longer has for that frontend.
fn stale_udp(old: &ServiceTable, new: &ServiceTable) -> BTreeSet<StaleUdp> {
    let mut stale = BTreeSet::new();
    for (frontend, entry) in old.frontends.iter().filter(|(f, _)| f.protocol == Protocol::Udp) {
        let keep: BTreeSet<_> = new
            .frontends
            .get(frontend)
            .map(|e| e.all_endpoints().map(|ep| (ep.addr, ep.port)).collect())
            .unwrap_or_default();
        stale.extend(
            entry
                .all_endpoints()
                .map(|ep| (ep.addr, ep.port))
                .filter(|a| !keep.contains(a))
                .map(|backend| StaleUdp { frontend: (frontend.addr, frontend.port), backend }),
        );
    }
    stale
}

/// The kernel setting behind `--conntrack-tcp-be-liberal`, for this network namespace.
const TCP_BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";

/// Sets `nf_conntrack_tcp_be_liberal` to 1, as kube-proxy does for `conntrack.tcpBeLiberal` in every mode.
///
/// # Errors
/// When the setting cannot be written: conntrack not loaded, or no permission.
pub fn set_tcp_be_liberal() -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::write(TCP_BE_LIBERAL, "1")
        .with_context(|| format!("--conntrack-tcp-be-liberal: writing 1 to {TCP_BE_LIBERAL} (is nf_conntrack loaded?)"))
}

/// Whether conntrack is liberal in this network namespace now: set by `--conntrack-tcp-be-liberal`, or by
/// the node's own configuration. Unreadable counts as not set.
#[must_use]
pub fn tcp_be_liberal() -> bool {
    std::fs::read_to_string(TCP_BE_LIBERAL).is_ok_and(|v| v.trim() != "0")
}

/// Runs `program args` with `input` on its standard input; an error carries the tool's own message.
///
/// # Errors
/// When the program cannot run or exits unsuccessfully.
pub fn run_with_input(program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        // A ruleset too large for the tool's memory ends with SIGKILL from the OOM killer and no message.
        anyhow::bail!("{program} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
