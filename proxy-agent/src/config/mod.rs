//! The config file: kube-proxy's `KubeProxyConfiguration` (`--config`), read whole.
//!
//! The file is parsed into the typed [`types::KubeProxyConfiguration`]; kube-proxy's defaulting fills what
//! it leaves out, null or zero where kube-proxy does (`resolve`), kube-proxy's validation rules then stop
//! start-up on a bad value, naming the field and the value, and the result is the settings the agent
//! takes ([`FileConfig`]). Fields nobody knows, and fields that do nothing here, are warned about by name,
//! never fatal, so a file written for kube-proxy loads. Flags given on the command line win over the file.

pub mod types;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use types::{GoDuration, KubeProxyConfiguration};

use crate::model::{NodePortAddresses, network, sloppy_ip};

/// The settings a `KubeProxyConfiguration` gives this agent, after kube-proxy's defaulting.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileConfig {
    /// `ebpf`, `iptables`, `nftables`, `ipvs` (served by eBPF) or `auto`; `None` for `""` (this agent's
    /// default, eBPF).
    pub mode: Option<String>,
    pub cluster_cidr: Option<crate::model::ClusterCidrs>,
    pub node_port_addresses: Option<NodePortAddresses>,
    pub masquerade_all: Option<bool>,
    /// The mark bit the netfilter modes masquerade by (`iptables.masqueradeBit`, or `nftables.` in that mode).
    pub masquerade_bit: Option<u8>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub hostname_override: Option<String>,
    /// `bindAddress`: kube-proxy's override of the node's primary IP, when not unspecified.
    pub node_ip: Option<IpAddr>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub oom_score_adj: Option<i32>,
    pub bind_address_hard_fail: Option<bool>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `logging.verbosity` and `logging.format`.
    pub log_verbosity: Option<u32>,
    pub log_format: Option<String>,
    /// Pod interfaces named by `detectLocalMode: BridgeInterface` or `InterfaceNamePrefix`.
    pub pod_interfaces: Vec<String>,
    /// `conntrack.tcpBeLiberal`.
    pub tcp_be_liberal: Option<bool>,
    /// `conntrack.tcpEstablishedTimeout`, `tcpCloseWaitTimeout`, `udpTimeout`, `udpStreamTimeout`.
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
    /// `conntrack.maxPerCore`, `conntrack.min`.
    pub conntrack_max_per_core: Option<u32>,
    pub conntrack_min: Option<u32>,
    /// Fields present that this agent does not know; warned about.
    pub unknown: Vec<String>,
    /// Fields set that do nothing here (Windows, IPVS tuning, profiling, …); warned about once, by name.
    pub ignored: Vec<String>,
}

/// A field with a value that kube-proxy would not accept either.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("config file: {field}: {value:?} {problem}")]
pub struct BadValue {
    pub field: String,
    pub value: String,
    pub problem: String,
}

fn bad(field: &str, value: impl std::fmt::Display, problem: &str) -> BadValue {
    BadValue { field: field.to_owned(), value: value.to_string(), problem: problem.to_owned() }
}

const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// Parses a config file's text.
pub fn parse(text: &str) -> Result<FileConfig, BadValue> {
    let doc: Value = serde_saphyr::from_str(text).map_err(|e| bad("(file)", "", &format!("is not YAML: {e}")))?;
    let doc = if doc.is_null() { Value::Object(serde_json::Map::new()) } else { doc };
    if !doc.is_object() {
        return Err(bad("(file)", "", "is not a mapping"));
    }
    let typed: KubeProxyConfiguration = serde_path_to_error::deserialize(&doc).map_err(|e| {
        let field = e.path().to_string();
        let value = value_at(&doc, &field);
        bad(&field, value, &format!("is not accepted: {}", e.into_inner()))
    })?;
    resolve(&typed)
}

/// The value at a dotted path of `doc`, as text, for an error message.
fn value_at(doc: &Value, path: &str) -> String {
    let mut at = doc;
    for part in path.split('.') {
        let (name, index) =
            part.split_once('[').map_or((part, None), |(n, i)| (n, i.trim_end_matches(']').parse().ok()));
        at = match at.get(name) {
            Some(v) => v,
            None => return String::new(),
        };
        if let Some(i) = index {
            at = match at.get::<usize>(i) {
                Some(v) => v,
                None => return String::new(),
            };
        }
    }
    match at {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// kube-proxy's `SetDefaults_KubeProxyConfiguration` and `Validate`, then the mapping onto this agent.
#[expect(clippy::too_many_lines, reason = "one pass over kube-proxy's fields, in its order")]
fn resolve(c: &KubeProxyConfiguration) -> Result<FileConfig, BadValue> {
    let mut out = FileConfig::default();
    if let Some(v) = c.api_version.as_deref().filter(|v| *v != API_VERSION) {
        return Err(bad("apiVersion", v, &format!("is not {API_VERSION}")));
    }
    if let Some(k) = c.kind.as_deref().filter(|k| *k != "KubeProxyConfiguration") {
        return Err(bad("kind", k, "is not KubeProxyConfiguration"));
    }
    unknown_fields("", &c.unknown, &mut out.unknown);

    // mode: "" is this agent's default; ipvs is served by the eBPF dataplane (`mode::choose` says so).
    let mode = c.mode.as_deref().unwrap_or_default();
    out.mode = match mode {
        "" => None,
        "iptables" | "nftables" | "ebpf" | "auto" | "ipvs" => Some(mode.to_owned()),
        other => {
            return Err(bad(
                "mode",
                other,
                "must be iptables, ipvs, nftables, ebpf, auto or blank (kernelspace is Windows only)",
            ));
        }
    };

    // The mode's section supplies the sync periods and masqueradeAll, as kube-proxy's conversion does.
    let iptables = c.iptables.clone().unwrap_or_default();
    let nftables = c.nftables.clone().unwrap_or_default();
    let ipvs = c.ipvs.clone().unwrap_or_default();
    unknown_fields("iptables.", &iptables.unknown, &mut out.unknown);
    unknown_fields("nftables.", &nftables.unknown, &mut out.unknown);
    unknown_fields("ipvs.", &ipvs.unknown, &mut out.unknown);
    out.masquerade_bit = Some(masquerade_bit("iptables.masqueradeBit", iptables.masquerade_bit)?);
    let (sync, min_sync, masquerade_all) = match mode {
        "nftables" => {
            out.masquerade_bit = Some(masquerade_bit("nftables.masqueradeBit", nftables.masquerade_bit)?);
            (nftables.sync_period, nftables.min_sync_period, nftables.masquerade_all)
        }
        // ipvs's minSyncPeriod has no default (0 stays 0): kube-proxy's asymmetry, kept.
        "ipvs" => {
            (ipvs.sync_period, ipvs.min_sync_period.or(Some(GoDuration(Duration::ZERO))), iptables.masquerade_all)
        }
        _ => (iptables.sync_period, iptables.min_sync_period, iptables.masquerade_all),
    };
    let nonzero_or =
        |d: Option<GoDuration>, default: Duration| d.map(|d| d.0).filter(|d| !d.is_zero()).unwrap_or(default);
    let sync = nonzero_or(sync, Duration::from_secs(30));
    let min_sync = if mode == "ipvs" {
        min_sync.map_or(Duration::ZERO, |d| d.0)
    } else {
        nonzero_or(min_sync, Duration::from_secs(1))
    };
    if min_sync > sync {
        return Err(bad("syncPeriod", format!("{min_sync:?}"), "must be greater than or equal to minSyncPeriod"));
    }
    out.sync_period = Some(sync);
    out.min_sync_period = Some(min_sync);
    out.masquerade_all = masquerade_all;
    if iptables.localhost_node_ports == Some(true) {
        out.ignored.push(
            "iptables.localhostNodePorts (NodePorts are not served on 127.0.0.1, as kube-proxy's nftables mode)".into(),
        );
    }
    let ipvs_tuning = ipvs.scheduler.as_deref().is_some_and(|s| !s.is_empty())
        || ipvs.exclude_cidrs.as_ref().is_some_and(|v| !v.is_empty())
        || ipvs.strict_arp == Some(true)
        || [ipvs.tcp_timeout, ipvs.tcp_fin_timeout, ipvs.udp_timeout].iter().any(|d| d.is_some_and(|d| !d.0.is_zero()));
    if ipvs_tuning {
        out.ignored.push("ipvs.* (no IPVS here)".into());
    }
    if mode == "ipvs" {
        for (i, cidr) in ipvs.exclude_cidrs.iter().flatten().enumerate() {
            if sloppy_ip::parse_cidr(cidr).is_none() {
                return Err(bad(&format!("ipvs.excludeCIDRs[{i}]"), cidr, "must be a valid CIDR"));
            }
        }
    }

    // bindAddress is kube-proxy's node-IP override (no socket is bound to it): 0.0.0.0 means "the Node's".
    let bind = c.bind_address.as_deref().filter(|b| !b.is_empty()).unwrap_or("0.0.0.0");
    let bind_ip = sloppy_ip::parse_ip(bind)
        .ok_or_else(|| bad("bindAddress", bind, "not a valid textual representation of an IP address"))?;
    if !bind_ip.is_unspecified() {
        out.node_ip = Some(bind_ip);
    }
    let bind_is_ipv6 = bind_ip.is_ipv6();
    out.healthz_bind_address = Some(host_port(
        "healthzBindAddress",
        c.healthz_bind_address.as_deref(),
        if bind_is_ipv6 { "[::]" } else { "0.0.0.0" },
        HEALTHZ_PORT,
    )?);
    out.metrics_bind_address = Some(host_port(
        "metricsBindAddress",
        c.metrics_bind_address.as_deref(),
        if bind_is_ipv6 { "[::1]" } else { "127.0.0.1" },
        METRICS_PORT,
    )?);
    out.bind_address_hard_fail = c.bind_address_hard_fail;
    out.hostname_override =
        c.hostname_override.as_deref().map(str::trim).filter(|h| !h.is_empty()).map(str::to_lowercase);

    // oomScoreAdj: null means kube-proxy's -999.
    let oom = c.oom_score_adj.unwrap_or(-999);
    if !(-1000..=1000).contains(&oom) {
        return Err(bad("oomScoreAdj", oom, "must be within the range [-1000, 1000]"));
    }
    out.oom_score_adj = i32::try_from(oom).ok();

    conntrack(c, &mut out)?;
    detect_local(c, &mut out)?;
    node_port_addresses(c, mode, &mut out)?;
    client_connection(c, &mut out)?;
    logging(c, &mut out)?;

    if c.config_sync_period.is_some_and(|d| !d.0.is_zero() && d.0 < Duration::from_millis(1)) {
        return Err(bad("configSyncPeriod", format!("{:?}", c.config_sync_period), "must be greater than 0"));
    }
    if c.feature_gates.as_ref().is_some_and(|g| !g.is_empty()) {
        let gates: Vec<&String> = c.feature_gates.iter().flat_map(|g| g.keys()).collect();
        out.ignored.push(format!("featureGates {gates:?} (kube-proxy's gates do not apply here)"));
    }
    if c.port_range.as_deref().is_some_and(|p| !p.is_empty()) {
        out.ignored.push("portRange (unused, as in kube-proxy)".into());
    }
    if c.enable_profiling == Some(true) {
        out.ignored.push("enableProfiling (no /debug/pprof here)".into());
    }
    if c.show_hidden_metrics_for_version.as_deref().is_some_and(|v| !v.is_empty()) {
        out.ignored.push("showHiddenMetricsForVersion (no hidden metrics here)".into());
    }
    if c.winkernel.as_ref().is_some_and(|w| w.as_object().is_some_and(|o| o.values().any(set)))
        || c.windows_run_as_service == Some(true)
    {
        out.ignored.push("winkernel, windowsRunAsService (Windows only)".into());
    }
    Ok(out)
}

/// Whether a JSON value is "set": not null, empty, zero or false.
fn set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => o.values().any(set),
    }
}

fn unknown_fields(prefix: &str, unknown: &types::Unknown, out: &mut Vec<String>) {
    out.extend(unknown.keys().map(|k| format!("{prefix}{k}")));
}

/// A masquerade bit: null is kube-proxy's 14.
fn masquerade_bit(field: &str, bit: Option<i64>) -> Result<u8, BadValue> {
    let bit = bit.unwrap_or(14);
    u8::try_from(bit).ok().filter(|b| *b <= 31).ok_or_else(|| bad(field, bit, "must be within the range [0, 31]"))
}

/// A healthz or metrics address, kube-proxy's way: `""` is the default, a bare IP gets the default port,
/// and the result must be `IP:port` with a port in 1–65535.
fn host_port(field: &str, value: Option<&str>, default_host: &str, default_port: u16) -> Result<SocketAddr, BadValue> {
    let value = value.map(str::trim).filter(|v| !v.is_empty());
    let text = match value {
        None => format!("{default_host}:{default_port}"),
        Some(v) if sloppy_ip::parse_ip(v.trim_matches(['[', ']'])).is_some() && !v.contains("]:") => {
            let ip = v.trim_matches(['[', ']']);
            if ip.contains(':') { format!("[{ip}]:{default_port}") } else { format!("{ip}:{default_port}") }
        }
        Some(v) => v.to_owned(),
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(|| bad(field, &text, "must be IP:port"))?;
    let ip =
        sloppy_ip::parse_ip(host.trim_matches(['[', ']'])).ok_or_else(|| bad(field, host, "must be a valid IP"))?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad(field, port, "must be a valid port"))?;
    Ok(SocketAddr::new(ip, port))
}

fn conntrack(c: &KubeProxyConfiguration, out: &mut FileConfig) -> Result<(), BadValue> {
    let ct = c.conntrack.clone().unwrap_or_default();
    unknown_fields("conntrack.", &ct.unknown, &mut out.unknown);
    let count = |field: &str, v: Option<i64>, default: u32| -> Result<u32, BadValue> {
        match v {
            None => Ok(default),
            Some(n) => u32::try_from(n).map_err(|_| bad(field, n, "must be greater than or equal to 0")),
        }
    };
    out.conntrack_max_per_core = Some(count("conntrack.maxPerCore", ct.max_per_core, 32_768)?);
    out.conntrack_min = Some(count("conntrack.min", ct.min, 131_072)?);
    // Pointers in kube-proxy: null is the default, an explicit 0s is kept ("leave the kernel's").
    out.tcp_established_timeout = Some(ct.tcp_established_timeout.map_or(Duration::from_hours(24), |d| d.0));
    out.tcp_close_wait_timeout = Some(ct.tcp_close_wait_timeout.map_or(Duration::from_hours(1), |d| d.0));
    out.udp_timeout = Some(ct.udp_timeout.map_or(Duration::ZERO, |d| d.0));
    out.udp_stream_timeout = Some(ct.udp_stream_timeout.map_or(Duration::ZERO, |d| d.0));
    out.tcp_be_liberal = ct.tcp_be_liberal;
    Ok(())
}

fn detect_local(c: &KubeProxyConfiguration, out: &mut FileConfig) -> Result<(), BadValue> {
    let detect = c.detect_local.clone().unwrap_or_default();
    unknown_fields("detectLocal.", &detect.unknown, &mut out.unknown);
    let non_empty = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    match c.detect_local_mode.as_deref().unwrap_or_default() {
        "" | "ClusterCIDR" => {
            let cidrs = c.cluster_cidr.as_deref().unwrap_or_default();
            if !cidrs.is_empty() {
                out.cluster_cidr = cluster_cidr(cidrs)?;
            }
        }
        "NodeCIDR" => out.ignored.push(
            "detectLocalMode NodeCIDR (pod traffic is told by the pod interfaces; give --cluster-cidr to add a CIDR)"
                .into(),
        ),
        "BridgeInterface" => {
            let bridge = non_empty(&detect.bridge_interface)
                .ok_or_else(|| bad("detectLocal.bridgeInterface", "", "must not be empty"))?;
            out.pod_interfaces.push(bridge);
        }
        "InterfaceNamePrefix" => {
            let prefix = non_empty(&detect.interface_name_prefix)
                .ok_or_else(|| bad("detectLocal.interfaceNamePrefix", "", "must not be empty"))?;
            out.pod_interfaces.push(format!("{prefix}*"));
        }
        other => {
            return Err(bad(
                "detectLocalMode",
                other,
                "supported values: \"ClusterCIDR\", \"NodeCIDR\", \"BridgeInterface\", \"InterfaceNamePrefix\", \"\"",
            ));
        }
    }
    Ok(())
}

/// `clusterCIDR`: one CIDR or a dual-stack pair, comma-separated (not trimmed, as kube-proxy splits it);
/// each family's applies to that family.
fn cluster_cidr(text: &str) -> Result<Option<crate::model::ClusterCidrs>, BadValue> {
    let parts: Vec<&str> = text.split(',').collect();
    let pair_message = "must be a single CIDR or a dual-stack pair of CIDRs (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)";
    let mut cidrs = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let Some(cidr) = sloppy_ip::parse_cidr(part) else {
            return Err(bad(&format!("clusterCIDR[{i}]"), part, "must be a valid CIDR block (e.g. 10.100.0.0/16)"));
        };
        cidrs.push(cidr);
    }
    crate::model::ClusterCidrs::new(&cidrs).map(Some).map_err(|_| bad("clusterCIDR", text, pair_message))
}

fn node_port_addresses(c: &KubeProxyConfiguration, mode: &str, out: &mut FileConfig) -> Result<(), BadValue> {
    let items = c.node_port_addresses.clone().unwrap_or_default();
    let mut cidrs = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if item == "primary" {
            if i != 0 || items.len() > 1 {
                return Err(bad(&format!("nodePortAddresses[{i}]"), item, "can't use both 'primary' and CIDRs"));
            }
            out.node_port_addresses = Some(NodePortAddresses::Primary);
            return Ok(());
        }
        match sloppy_ip::parse_cidr(item) {
            Some((a, len)) => cidrs.push(network(a, len)),
            None => return Err(bad(&format!("nodePortAddresses[{i}]"), item, "must be a valid CIDR")),
        }
    }
    out.node_port_addresses = Some(if !cidrs.is_empty() {
        NodePortAddresses::Cidrs(cidrs)
    } else if items.is_empty() && mode == "nftables" {
        // kube-proxy's nftables mode serves NodePorts on the primary address unless told otherwise.
        NodePortAddresses::Primary
    } else {
        NodePortAddresses::All
    });
    Ok(())
}

fn client_connection(c: &KubeProxyConfiguration, out: &mut FileConfig) -> Result<(), BadValue> {
    let cc = c.client_connection.clone().unwrap_or_default();
    unknown_fields("clientConnection.", &cc.unknown, &mut out.unknown);
    if let Some(b) = cc.burst.filter(|b| *b < 0) {
        return Err(bad("clientConnection.burst", b, "must be greater than or equal to 0"));
    }
    out.kubeconfig = cc.kubeconfig.filter(|k| !k.is_empty()).map(PathBuf::from);
    Ok(())
}

fn logging(c: &KubeProxyConfiguration, out: &mut FileConfig) -> Result<(), BadValue> {
    let log = c.logging.clone().unwrap_or_default();
    unknown_fields("logging.", &log.unknown, &mut out.unknown);
    match log.format.as_deref().unwrap_or_default() {
        "" => {}
        f @ ("text" | "json") => out.log_format = Some(f.to_owned()),
        other => return Err(bad("logging.format", other, "Unsupported log format (text, json)")),
    }
    if let Some(v) = log.verbosity {
        out.log_verbosity = Some(
            u32::try_from(v)
                .ok()
                .filter(|v| *v <= 2_147_483_647)
                .ok_or_else(|| bad("logging.verbosity", v, "Must be <= 2147483647"))?,
        );
    }
    if log.vmodule.as_ref().is_some_and(|v| !v.is_empty()) {
        out.ignored.push("logging.vmodule (use RUST_LOG for per-module levels)".into());
    }
    Ok(())
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
    Ok(parse(&text)?)
}

#[cfg(test)]
mod tests;
