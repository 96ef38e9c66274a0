//! The benchmark (`cargo xtask bench`): the lab at scale, every dataplane mode measured in one run, and a
//! results folder with a Markdown report and SVG plots. Figures are reported as ratios measured back to back
//! on the same machine (service ÷ direct, mode ÷ eBPF); absolute rates from a shared 2-core machine are
//! context only. A tiny configuration runs in the test suite so the harness never rots.

pub mod load;
pub mod report;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    Lab, LabSpec,
    echo6::Echo6,
    manifests::{self, Endpoint, Port, Svc},
};

/// What to measure and how hard.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub modes: Vec<String>,
    /// Numbers of Services in the table (one of them is the one measured).
    pub scales: Vec<usize>,
    pub endpoints_per_service: usize,
    /// Each data-path figure is measured this many times; the report gives the median and the range.
    pub repeats: usize,
    /// How long one load run lasts.
    pub duration: Duration,
    /// How many single-endpoint changes are timed at each scale, at most.
    pub endpoint_changes: usize,
    /// Changes stop once they have taken this long (at least five are timed): a netfilter mode at 100k
    /// Services takes many seconds per change.
    pub change_budget: Duration,
    /// A mode whose first sync takes longer than this is not measured at larger scales.
    pub sync_budget: Duration,
}

impl BenchConfig {
    /// The full benchmark the issue asks for: 1 to 100k Services, 10 endpoints each.
    #[must_use]
    pub fn full() -> Self {
        Self {
            modes: MODES.map(String::from).into(),
            scales: vec![1, 1_000, 10_000, 100_000],
            endpoints_per_service: 10,
            repeats: 5,
            duration: Duration::from_secs(3),
            endpoint_changes: 50,
            change_budget: Duration::from_secs(60),
            sync_budget: Duration::from_secs(300),
        }
    }

    /// Seconds, not minutes: what the test suite runs.
    #[must_use]
    pub fn tiny() -> Self {
        Self {
            modes: MODES.map(String::from).into(),
            scales: vec![1, 20],
            endpoints_per_service: 2,
            repeats: 1,
            duration: Duration::from_millis(200),
            endpoint_changes: 3,
            change_budget: Duration::from_secs(30),
            sync_budget: Duration::from_secs(30),
        }
    }
}

pub const MODES: [&str; 3] = ["ebpf", "nftables", "iptables"];

/// Rates through the Service and straight to the backend pod, measured back to back.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pair {
    pub service: f64,
    pub direct: f64,
}

impl Pair {
    #[must_use]
    pub fn ratio(self) -> f64 {
        self.service / self.direct
    }
}

/// The address family a figure was measured over.
pub use crate::lab::Family;

/// The measured Service's address in `family`.
fn target_vip(family: Family) -> IpAddr {
    match family {
        Family::V4 => TARGET_VIP.into(),
        Family::V6 => TARGET_VIP6.into(),
    }
}

/// The ClusterIP data path of one mode at one scale, over one family.
#[derive(Clone, Debug)]
pub struct DataRow {
    pub mode: String,
    pub services: usize,
    pub family: Family,
    /// New connections per second.
    pub connections: Vec<Pair>,
    /// Requests per second over one connection.
    pub requests: Vec<Pair>,
}

/// The control plane of one mode at one scale.
#[derive(Clone, Debug)]
pub struct ControlRow {
    pub mode: String,
    pub services: usize,
    pub endpoints_per_service: usize,
    /// The agent's first sync (model and dataplane; parsing the manifests is not counted), in ms.
    pub full_sync_ms: f64,
    /// Syncs that changed one endpoint, in ms.
    pub change_ms: Vec<f64>,
    pub peak_rss_kib: u64,
    /// Memory of the BPF maps the agent holds (eBPF mode), KiB.
    pub bpf_map_kib: Option<u64>,
}

/// NodePort traffic from the external client through one path, over one family.
#[derive(Clone, Debug, Default)]
pub struct NodePortRow {
    pub path: String,
    pub family: Family,
    pub connections: Vec<f64>,
    pub udp_exchanges: Vec<f64>,
    /// Datagrams per second a flood delivered to the backend.
    pub udp_delivered: Vec<f64>,
    /// Datagrams per second the flooding client managed to send.
    pub udp_sent: Vec<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct Results {
    pub data: Vec<DataRow>,
    pub control: Vec<ControlRow>,
    pub node_port: Vec<NodePortRow>,
    /// What was not measured, and why.
    pub skipped: Vec<String>,
}

const TARGET_VIP: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 200);
/// The measured Service's IPv6 ClusterIP (the filler Services are IPv4-only).
const TARGET_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x200);
const TARGET_PORT: u16 = 80;
const NODE_PORT: u16 = 30200;
const SERVER_PORT: u16 = 8080;
const UDP_SERVER_PORT: u16 = 5353;
/// Where flooded datagrams are counted; nothing answers them.
const SINK_PORT: u16 = 7000;

/// The `i`th filler Service's ClusterIP: 10.96.0.0/12, as a cluster's service range would be.
fn filler_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + u32::try_from(i).expect("fewer than 2^32 Services"))
}

/// Endpoints of filler Services: addresses in a pod range no pod uses (never sent to).
fn filler_endpoint(i: usize, k: usize) -> Ipv4Addr {
    let index = u32::try_from(i * 16 + k).expect("small");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + index)
}

/// `count` Services with `endpoints` endpoints each, one file. Named so that the measured Service sorts
/// last: in iptables mode its rule is the last one `KUBE-SERVICES` reaches, the worst case.
#[must_use]
pub fn filler_manifest(count: usize, endpoints: usize) -> String {
    let mut out = String::new();
    let ports = [Port { name: "http", port: 80, protocol: "TCP", target_port: SERVER_PORT }];
    for i in 0..count {
        let name = format!("filler-{i:06}");
        let eps: Vec<Endpoint> =
            (0..endpoints).map(|k| Endpoint::ready(filler_endpoint(i, k), crate::lab::node_name(2))).collect();
        let _ = write!(
            out,
            "{}---\n{}---\n",
            manifests::service("default", &name, filler_ip(i), &ports),
            manifests::endpoint_slice("default", &format!("{name}-slice"), &name, &ports, &eps)
        );
    }
    out
}

fn target_manifest(lab: &Lab, backend: (usize, usize)) -> String {
    let ports = vec![
        Port { name: "http", port: TARGET_PORT, protocol: "TCP", target_port: SERVER_PORT },
        Port { name: "dns", port: 53, protocol: "UDP", target_port: UDP_SERVER_PORT },
        Port { name: "flood", port: SINK_PORT, protocol: "UDP", target_port: SINK_PORT },
    ];
    let mut svc = Svc::new("zz-target", TARGET_VIP, ports);
    svc.type_ = "NodePort";
    svc.node_ports = vec![NODE_PORT, NODE_PORT + 1, NODE_PORT + 2];
    let pod = lab.pod(backend.0, backend.1);
    let node = crate::lab::node_name(backend.0);
    let v4 = [Endpoint::ready(pod.ip, node.clone())];
    match pod.ip6 {
        Some(ip6) => {
            svc.cluster_ip6 = Some(TARGET_VIP6);
            svc.with_endpoints_of_both_families(&v4, &[Endpoint::ready(ip6, node)])
        }
        None => svc.with_endpoints(&v4),
    }
}

/// The `elapsed_ms` of the agent's `index`th "service table applied" line.
fn applied_ms(log: &str, index: usize) -> anyhow::Result<f64> {
    let line = log
        .lines()
        .filter(|l| l.contains("service table applied"))
        .nth(index)
        .with_context(|| format!("no sync number {index} in the agent's log"))?;
    let value = line.split_whitespace().find_map(|w| w.strip_prefix("elapsed_ms=")).context("no elapsed_ms")?;
    value.parse().with_context(|| format!("elapsed_ms={value}"))
}

/// Peak resident memory of a process, KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).context("VmHWM value")?.parse()?)
}

/// Memory charged to the BPF maps a process holds open (`memlock` of each map fd), KiB.
fn bpf_map_kib(pid: u32) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        if info.contains("map_type:") {
            bytes += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(bytes / 1024)
}

/// A lab in `mode` whose pods 2-2 and 2-3 serve TCP on `SERVER_PORT` and UDP on `UDP_SERVER_PORT`, over
/// IPv6 too (the servers returned) where the lab is dual-stack.
fn lab_for(mode: &str, extra: &[&str]) -> anyhow::Result<(Lab, Vec<Echo6>)> {
    let mut args = vec!["--mode".to_owned(), mode.to_owned(), "--sync-period".to_owned(), "10m".to_owned()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut lab = Lab::start(LabSpec { agent_args: args, ..LabSpec::default() })?;
    let mut servers6 = Vec::new();
    for (n, k) in [(2, 2), (2, 3)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[SERVER_PORT], &[UDP_SERVER_PORT])?;
        if lab.dual_stack() {
            for port in [SERVER_PORT, UDP_SERVER_PORT] {
                servers6.push(Echo6::start(&pod.ns, &pod.name, port)?);
            }
        }
    }
    for client in [lab.pod(1, 1).ns.clone(), lab.external_ns()] {
        reuse_time_wait_ports(&client)?;
    }
    Ok((lab, servers6))
}

/// A load client opens thousands of connections a second and closes each first, so each leaves its port in
/// `TIME_WAIT` for a minute; a run of a few seconds then exhausts the ephemeral range, and `connect()` slows to
/// a crawl searching it, which measured the client, not the path. `tcp_tw_reuse` lets a new connection take
/// a `TIME_WAIT` port after a second, as busy client hosts are set up to do (the `ipv4` sysctl covers IPv6
/// sockets too).
fn reuse_time_wait_ports(ns: &str) -> anyhow::Result<()> {
    crate::netns::in_netns(ns, || std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1"))?
        .with_context(|| format!("setting tcp_tw_reuse in {ns}"))
}

/// One mode at one scale: data path (a row per family) and control plane.
fn measure_scale(config: &BenchConfig, mode: &str, services: usize) -> anyhow::Result<(Vec<DataRow>, ControlRow)> {
    let (mut lab, _servers6) = lab_for(mode, &[])?;
    if services > 1 {
        lab.write_manifest("filler.yaml", &filler_manifest(services - 1, config.endpoints_per_service))?;
    }
    lab.write_manifest("target.yaml", &target_manifest(&lab, (2, 2)))?;
    let started = Instant::now();
    if lab.start_agents_within(config.sync_budget).is_err() {
        // Say why, if the agent said: a failed sync (a tool killed for lack of memory) is not a slow one.
        let log = lab.agent(1).log();
        let failure = log.lines().rev().find(|l| l.contains("applying the service table failed"));
        let failed = failure.and_then(|l| l.split_once("error=")).map(|(_, e)| e.trim_matches('"').to_owned());
        return Err(SyncMissed { failed }.into());
    }
    eprintln!("bench: {mode}, {services} Services: agents synced in {:.1} s", started.elapsed().as_secs_f64());
    let full_sync_ms = applied_ms(&lab.agent(1).log(), 0)?;

    let client = lab.pod(1, 1).ns.clone();
    let mut data = Vec::new();
    for family in Family::of(&lab) {
        let service = SocketAddr::new(target_vip(family), TARGET_PORT);
        let direct = SocketAddr::new(family.pod(lab.pod(2, 2)), SERVER_PORT);
        let mut row =
            DataRow { mode: mode.to_owned(), services, family, connections: Vec::new(), requests: Vec::new() };
        for r in 0..config.repeats {
            // Alternate which goes first, so a drift in the machine's speed does not favour one side.
            let order = if r % 2 == 0 { [service, direct] } else { [direct, service] };
            let mut connections = Pair::default();
            let mut requests = Pair::default();
            for target in order {
                let c = load::connections_per_second(&client, target, config.duration)?;
                let q = load::requests_per_second(&client, target, config.duration)?;
                if target == service {
                    (connections.service, requests.service) = (c, q);
                } else {
                    (connections.direct, requests.direct) = (c, q);
                }
            }
            row.connections.push(connections);
            row.requests.push(requests);
        }
        data.push(row);
    }

    // One endpoint changes, back and forth; each change is its own sync.
    let mut change_ms = Vec::new();
    let changes_started = Instant::now();
    for i in 0..config.endpoint_changes {
        if i >= 5 && changes_started.elapsed() > config.change_budget {
            break;
        }
        let backend = if i % 2 == 0 { (2, 3) } else { (2, 2) };
        lab.write_manifest("target.yaml", &target_manifest(&lab, backend))?;
        lab.agent(1).wait_for_log("service table applied", i + 1, config.sync_budget)?;
        change_ms.push(applied_ms(&lab.agent(1).log(), i + 1)?);
    }
    let pid = lab.agent(1).pid().context("agent pid")?;
    let control = ControlRow {
        mode: mode.to_owned(),
        services,
        endpoints_per_service: config.endpoints_per_service,
        full_sync_ms,
        change_ms,
        peak_rss_kib: peak_rss_kib(pid)?,
        bpf_map_kib: if mode == "ebpf" { Some(bpf_map_kib(pid)?) } else { None },
    };
    Ok((data, control))
}

/// NodePort traffic from the external client, to a backend on the other node, through each path.
fn measure_node_port(config: &BenchConfig) -> anyhow::Result<Vec<NodePortRow>> {
    let paths: [(&str, &str, &[&str]); 4] = [
        ("eBPF, XDP", "ebpf", &["--xdp", "native"]),
        ("eBPF, TC (XDP off)", "ebpf", &["--xdp", "off"]),
        ("nftables", "nftables", &[]),
        ("iptables", "iptables", &[]),
    ];
    let mut rows = Vec::new();
    for (path, mode, extra) in paths {
        if !config.modes.iter().any(|m| m == mode) {
            continue;
        }
        let (mut lab, _servers6) = lab_for(mode, extra)?;
        lab.write_manifest("target.yaml", &target_manifest(&lab, (2, 2)))?;
        lab.start_agents_within(config.sync_budget)?;
        let ext = lab.external_ns();
        let sink_ns = lab.pod(2, 2).ns.clone();
        for family in Family::of(&lab) {
            let at = |port| SocketAddr::new(family.node(1), port);
            let (tcp, udp, flood) = (at(NODE_PORT), at(NODE_PORT + 1), at(NODE_PORT + 2));
            let mut row = NodePortRow { path: path.to_owned(), family, ..NodePortRow::default() };
            for _ in 0..config.repeats {
                row.connections.push(load::connections_per_second(&ext, tcp, config.duration)?);
                row.udp_exchanges.push(load::udp_exchanges_per_second(&ext, udp, config.duration)?);
                let rates = load::udp_flood(&ext, flood, (&sink_ns, SINK_PORT), config.duration)?;
                row.udp_delivered.push(rates.delivered);
                row.udp_sent.push(rates.sent);
            }
            eprintln!("bench: NodePort via {path} measured over {}", family.name());
            rows.push(row);
        }
    }
    Ok(rows)
}

/// A mode's first sync did not finish within the budget; `failed` is the agent's error if it reported one.
#[derive(Debug, thiserror::Error)]
#[error("the first sync did not finish within the budget")]
struct SyncMissed {
    failed: Option<String>,
}

/// Runs the benchmark. A mode whose sync misses the budget at one scale is not tried at larger ones (the
/// report says so); any other failure is an error, since a broken path measures nothing.
///
/// # Errors
/// When the lab cannot be built or a load run fails.
pub fn run(config: &BenchConfig) -> anyhow::Result<Results> {
    if config.repeats == 0 || config.scales.is_empty() {
        bail!("nothing to measure: repeats and scales must not be empty");
    }
    let mut results = Results::default();
    for mode in &config.modes {
        for &services in &config.scales {
            match measure_scale(config, mode, services) {
                Ok((data, control)) => {
                    results.data.extend(data);
                    results.control.push(control);
                }
                Err(e) if e.downcast_ref::<SyncMissed>().is_some() => {
                    let failed = e.downcast_ref::<SyncMissed>().and_then(|m| m.failed.clone());
                    results.skipped.push(match failed {
                        Some(why) => format!(
                            "{mode} at {services} Services and above: its first sync failed ({why}) and did not \
                             succeed within {:?}",
                            config.sync_budget
                        ),
                        None => format!(
                            "{mode} at {services} Services and above: its first sync took longer than {:?}",
                            config.sync_budget
                        ),
                    });
                    break;
                }
                Err(e) => return Err(e.context(format!("{mode} at {services} Services"))),
            }
        }
    }
    results.node_port = measure_node_port(config)?;
    Ok(results)
}
