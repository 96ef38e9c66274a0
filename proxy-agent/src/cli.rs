//! Command-line flags. Names follow kube-proxy's where the meaning is the same.

use std::{path::PathBuf, time::Duration};

use clap::Parser;

/// The host ends of pods' interfaces as the common pod networks name them: `veth*` (flannel, the reference
/// `bridge` and `ptp` plugins, kindnet, Weave's `vethwepl*`), `cali*` (Calico), `lxc*` (Cilium), `eni*`
/// (AWS VPC CNI), `azv*` (Azure CNI), `gke*` (GKE); and the pod bridges `cni*` (flannel, `bridge`) and
/// `weave`, whose ports face pods (the bridges themselves are never attached: see `InterfaceRoles::assign`).
/// Overlay devices (`flannel.1`, `vxlan.calico`, `tunl0`) are not pod interfaces: what crosses them was
/// translated where it entered the node (`flannel.*` is a host interface, see below).
pub const DEFAULT_POD_INTERFACES: &str = "veth*,cali*,lxc*,eni*,azv*,gke*,cni*,weave";
/// The node's uplinks as Linux names them (classic, predictable and bonded names), and flannel's VXLAN device:
/// a flow SNATed to a pod of another node leaves by it, with its address, as MASQUERADE sends it.
pub const DEFAULT_HOST_INTERFACES: &str = "eth*,ens*,enp*,eno*,bond*,flannel.*";

#[derive(Debug, Parser)]
#[command(name = "proxy-agent", version, about = "A kube-proxy replacement whose service dataplane runs in eBPF")]
// A flag given twice takes its last value, as wrappers that append flags expect.
#[command(args_override_self = true)]
#[expect(clippy::struct_excessive_bools, reason = "kube-proxy's boolean flags, one field each")]
pub struct Args {
    /// A `KubeProxyConfiguration` file; flags given on the command line win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Read Services, EndpointSlices and Nodes from this directory of manifests instead of the API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// How often the manifest directory is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub manifest_poll_interval: Duration,

    /// The API server's URL. Set it (or `KUBERNETES_SERVICE_HOST`/`_PORT`) to the server's real address: the
    /// `kubernetes` Service's ClusterIP only works once a service proxy runs. Credentials come from the
    /// pod's service account, or from `--kubeconfig`.
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// A kubeconfig file with the server and credentials; `--master` still overrides its server.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name, as in its Node object.
    #[arg(long = "hostname-override", env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// bpffs directory where the maps are pinned; a restarted agent adopts what it finds there.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/proxy-agent")]
    pub bpffs: PathBuf,

    /// Interfaces that face pods (the host end of each pod's veth, or a bridge whose ports do); `*` matches
    /// any characters. The default covers the common pod networks (see `DEFAULT_POD_INTERFACES`).
    #[arg(long, value_name = "GLOB,...", value_delimiter = ',', default_value = DEFAULT_POD_INTERFACES)]
    pub pod_interfaces: Vec<String>,

    /// Interfaces towards other nodes and the outside, where NodePort and external traffic arrives.
    #[arg(long, value_name = "GLOB,...", value_delimiter = ',', default_value = DEFAULT_HOST_INTERFACES)]
    pub host_interfaces: Vec<String>,

    /// Which node addresses NodePorts are served on: CIDRs, or `primary` (the Node's InternalIP). Default:
    /// every address of the host interfaces.
    #[arg(long, value_name = "CIDR,...|primary", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,

    /// The addresses SNATed traffic leaves with, at most one per family (`10.240.0.11,fd00:240::11`).
    /// Default, for each family not given: the node's first address of that family.
    #[arg(long, value_name = "IP[,IP]", value_delimiter = ',')]
    pub node_ip: Vec<std::net::IpAddr>,

    /// Source ports for SNATed flows; keep this outside the kernel's ephemeral port range.
    #[arg(long, value_name = "MIN-MAX", default_value = "61000-65535", value_parser = parse_port_range)]
    pub snat_ports: (u16, u16),

    /// The cgroup (v2) whose processes' connections to Services are translated at the socket (the node's own
    /// traffic). Default: the root of the cgroup v2 mount. `none` turns this off.
    #[arg(long, value_name = "PATH|none")]
    pub cgroup: Option<String>,

    /// The dataplane: eBPF, the iptables or nftables fallback, or `auto`: eBPF where the kernel can run it,
    /// else nftables where it works, else iptables.
    /// `--proxy-mode` is kube-proxy's spelling; its `ipvs` runs the eBPF dataplane (there is no IPVS here).
    #[arg(long, alias = "proxy-mode", value_enum, default_value = "ebpf")]
    pub mode: Mode,

    /// XDP on host interfaces for NodePort and external traffic; TC handles whatever XDP does not.
    #[arg(long, value_enum, default_value = "native")]
    pub xdp: crate::dataplane::ebpf::XdpSetting,

    /// The pods' CIDR (kube-proxy's `--cluster-cidr`): traffic from it arriving from another node counts as
    /// pod traffic, not external traffic (local-traffic detection).
    /// A dual-stack pair (`10.42.0.0/16,fd00:42::/56`) gives each family its own.
    #[arg(long, value_name = "CIDR[,CIDR]", value_parser = parse_cluster_cidr)]
    pub cluster_cidr: Option<crate::model::ClusterCidrs>,

    /// kube-proxy's `--detect-local-mode`: `ClusterCIDR` (by `--cluster-cidr`), `InterfaceNamePrefix` or
    /// `BridgeInterface` (the interface given below joins `--pod-interfaces`). Pod traffic is always also
    /// told by `--pod-interfaces`.
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,

    /// kube-proxy's `--pod-interface-name-prefix` (with `--detect-local-mode InterfaceNamePrefix`).
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// kube-proxy's `--pod-bridge-interface` (with `--detect-local-mode BridgeInterface`).
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// The mark bit the netfilter modes masquerade by (kube-proxy's `--iptables-masquerade-bit`).
    #[arg(long, value_name = "0-31", default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub iptables_masquerade_bit: u8,

    /// kube-proxy's `--bind-address`: despite its name, an override of the node's primary IP (an
    /// unspecified address means "the Node's own"); the IPv4 one is the address SNATed traffic leaves with.
    #[arg(long, value_name = "IP")]
    pub bind_address: Option<std::net::IpAddr>,

    /// Failing to bind the healthz or metrics port stops start-up (kube-proxy's `--bind-address-hard-fail`);
    /// otherwise the agent logs it, retries every 5 s, and serves traffic meanwhile.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bind_address_hard_fail: bool,

    /// The agent's OOM score adjustment (kube-proxy's `--oom-score-adj`): written to
    /// `/proc/self/oom_score_adj` at start, so the kernel kills it last.
    #[arg(long, value_name = "-1000..1000", default_value_t = -999, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: i32,

    /// Log verbosity, as kube-proxy's `-v`/`--v`: 0–1 info, 2–3 debug, 4 and up trace (`RUST_LOG`, when
    /// set, decides instead).
    #[arg(short = 'v', long = "v", value_name = "N")]
    pub verbosity: Option<u32>,

    /// Deprecated kube-proxy flags: the port of `--healthz-bind-address` / `--metrics-bind-address` when
    /// those give none (used only without `--config`, as kube-proxy does).
    #[arg(long, value_name = "PORT", hide = true)]
    pub healthz_port: Option<u16>,
    #[arg(long, value_name = "PORT", hide = true)]
    pub metrics_port: Option<u16>,

    #[command(flatten)]
    pub kube_proxy: crate::kube_proxy_flags::NoEffect,

    /// The cluster's service CIDRs (the API server's `--service-cluster-ip-range`; up to four). A packet to
    /// an address in one that no Service holds is dropped instead of leaving by the node's default route,
    /// as kube-proxy's nftables mode drops it (it learns them from `ServiceCIDR` objects).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    pub service_cluster_ip_range: Vec<crate::model::Cidr>,

    /// SNAT all traffic to Services, not only what needs it (kube-proxy's `--masquerade-all`).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub masquerade_all: bool,

    /// Set the kernel's `nf_conntrack_tcp_be_liberal` (kube-proxy's `--conntrack-tcp-be-liberal`): conntrack
    /// then keeps tracking segments outside the TCP window instead of marking them INVALID, and the
    /// netfilter modes leave out their rule that drops INVALID forwarded packets.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub conntrack_tcp_be_liberal: bool,

    #[command(flatten)]
    pub conntrack: crate::conntrack_settings::ConntrackArgs,

    /// How new flows to NodePort, external and load-balancer frontends pick a backend in the eBPF mode, where
    /// the Service's `proxy-agent.io/lb-algorithm` annotation does not say: `random` as kube-proxy does, or
    /// `maglev`, so every node picks the same backend for the same 5-tuple (an external load balancer may
    /// spread one flow's packets over nodes). ClusterIPs are random unless annotated.
    #[arg(long, value_enum, default_value = "random")]
    pub lb_algorithm: LbAlgorithmArg,

    /// Entries in each Maglev table: a prime, well above the largest backend count of a Maglev Service
    /// (the paper suggests 100×); memory is about 64 bytes per entry per Maglev frontend.
    #[arg(long, value_name = "PRIME", default_value_t = proxy_common::maglev::DEFAULT_TABLE_SIZE, value_parser = parse_maglev_size)]
    pub maglev_table_size: u32,

    /// At most one sync per period, however fast changes arrive.
    #[arg(long, aliases = ["iptables-min-sync-period", "ipvs-min-sync-period"], value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_sync_period: Duration,

    /// A sync at least this often, even without changes (kube-proxy's `--sync-period`). It writes what
    /// changed; it re-reads the kernel's state only when `--full-resync-period` has passed.
    #[arg(long, aliases = ["iptables-sync-period", "ipvs-sync-period"], value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,

    /// How often a periodic sync re-reads what the kernel holds and repairs anything changed behind the
    /// agent's back. kube-proxy does this hourly; at 100k Services re-reading the eBPF maps takes ~4.5 s,
    /// and the nftables table is rewritten whole (8 s at 10k).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub full_resync_period: Duration,

    /// Write the settings in effect (flags over the config file, with kube-proxy's defaults) to FILE as a
    /// `KubeProxyConfiguration` and exit, like kube-proxy's `--write-config-to`.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,

    /// Apply the kernel settings (conntrack lifetimes, `nf_conntrack_tcp_be_liberal`, the OOM score) and
    /// exit, like kube-proxy's `--init-only` (for an init container with more privileges).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub init_only: bool,

    /// A netfilter mode that finds the eBPF dataplane running drains it: flows it translated keep their
    /// translation until they end, or until this long after this mode's rules are in.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Remove everything this agent left in the kernel (pinned maps and links, which detaches its programs)
    /// and exit, like kube-proxy's `--cleanup`.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub cleanup: bool,

    /// Where `/healthz` and `/livez` are served (kube-proxy's `healthzBindAddress`).
    #[arg(long, value_name = "ADDR[:PORT]", default_value = "0.0.0.0:10256", value_parser = |s: &str| parse_bind(s, 10256))]
    pub healthz_bind_address: std::net::SocketAddr,

    /// Where Prometheus metrics are served at `/metrics` (kube-proxy's `metricsBindAddress`).
    #[arg(long, value_name = "ADDR[:PORT]", default_value = "127.0.0.1:10249", value_parser = |s: &str| parse_bind(s, 10249))]
    pub metrics_bind_address: std::net::SocketAddr,

    /// Log format (`--logging-format` is kube-proxy's spelling).
    #[arg(long, alias = "logging-format", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAlgorithmArg {
    Random,
    Maglev,
}

impl From<LbAlgorithmArg> for crate::model::LbAlgorithm {
    fn from(a: LbAlgorithmArg) -> Self {
        match a {
            LbAlgorithmArg::Random => Self::Random,
            LbAlgorithmArg::Maglev => Self::Maglev,
        }
    }
}

fn parse_maglev_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(251..=1_048_573).contains(&n) || !crate::dataplane::ebpf::is_prime(n) {
        return Err(format!("{n} is not a prime between 251 and 1048573 (e.g. 16381, 65521)"));
    }
    Ok(n)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Ebpf,
    Iptables,
    Nftables,
    Auto,
    /// kube-proxy's IPVS mode, accepted from its flags and files: served by the eBPF dataplane.
    Ipvs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    let (a, b): (u16, u16) =
        (a.parse().map_err(|e| format!("{a:?}: {e}"))?, b.parse().map_err(|e| format!("{b:?}: {e}"))?);
    if a == 0 || a > b {
        return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
    }
    Ok((a, b))
}

/// `ADDR:PORT`, or a bare address (kube-proxy's flags append the default port to one).
fn parse_bind(s: &str, default_port: u16) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return Ok(addr);
    }
    let ip: std::net::IpAddr =
        s.trim_matches(['[', ']']).parse().map_err(|_| format!("{s:?} is neither ADDRESS:PORT nor an IP address"))?;
    Ok(std::net::SocketAddr::new(ip, default_port))
}

/// `--cluster-cidr`: one CIDR or a dual-stack pair.
fn parse_cluster_cidr(v: &str) -> Result<crate::model::ClusterCidrs, String> {
    let cidrs = v.split(',').map(str::trim).map(parse_cidr).collect::<Result<Vec<_>, _>>()?;
    crate::model::ClusterCidrs::new(&cidrs).map_err(|e| format!("{v:?}: {e}"))
}

/// A CIDR of either family.
fn parse_cidr(v: &str) -> Result<crate::model::Cidr, String> {
    let (addr, len) = v.split_once('/').ok_or_else(|| format!("{v:?} is not a CIDR"))?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("{v:?} is not a CIDR"))?;
    let max = if addr.is_ipv6() { 128 } else { 32 };
    let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| format!("{v:?} has a bad prefix length"))?;
    Ok((addr, len))
}

/// Parses `--nodeport-addresses`.
pub fn parse_nodeport_addresses(values: &[String]) -> Result<crate::model::NodePortAddresses, String> {
    use crate::model::NodePortAddresses;
    if values.is_empty() {
        return Ok(NodePortAddresses::All);
    }
    if values.iter().any(|v| v == "primary") {
        return if values.len() == 1 {
            Ok(NodePortAddresses::Primary)
        } else {
            Err("`primary` cannot be combined with CIDRs".into())
        };
    }
    values
        .iter()
        .map(|v| parse_cidr(v).map(|(a, l)| crate::model::network(a, l)))
        .collect::<Result<Vec<_>, String>>()
        .map(NodePortAddresses::Cidrs)
}

/// Fills in, from the config file, every setting the command line did not give.
/// `--node-ip`'s addresses, at most one per family.
pub fn check_node_ips(ips: &[std::net::IpAddr]) -> Result<(), String> {
    for v6 in [false, true] {
        let of_family: Vec<String> = ips.iter().filter(|ip| ip.is_ipv6() == v6).map(ToString::to_string).collect();
        if of_family.len() > 1 {
            let family = if v6 { "IPv6" } else { "IPv4" };
            return Err(format!(
                "{} {family} addresses ({}): give at most one per family",
                of_family.len(),
                of_family.join(", ")
            ));
        }
    }
    Ok(())
}

impl Args {
    /// The IPv4 address of `--node-ip` (or kube-proxy's bindAddress), if given.
    #[must_use]
    pub fn node_ip4(&self) -> Option<std::net::Ipv4Addr> {
        self.node_ip.iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(*v4),
            std::net::IpAddr::V6(_) => None,
        })
    }

    /// The IPv6 address of `--node-ip` (or kube-proxy's bindAddress), if given.
    #[must_use]
    pub fn node_ip6(&self) -> Option<std::net::Ipv6Addr> {
        self.node_ip.iter().find_map(|ip| match ip {
            std::net::IpAddr::V6(v6) => Some(*v6),
            std::net::IpAddr::V4(_) => None,
        })
    }
}

pub fn apply_file(args: &mut Args, file: crate::config::FileConfig, matches: &clap::ArgMatches) {
    use clap::parser::ValueSource;
    let from_flags =
        |id: &str| matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
    if let Some(v) = file.mode.as_deref().filter(|_| !from_flags("mode")) {
        args.mode = match v {
            "iptables" => Mode::Iptables,
            "nftables" => Mode::Nftables,
            "auto" => Mode::Auto,
            "ipvs" => Mode::Ipvs,
            _ => Mode::Ebpf,
        };
    }
    if let Some(v) = file.cluster_cidr.filter(|_| !from_flags("cluster_cidr")) {
        args.cluster_cidr = Some(v);
    }
    if let Some(v) = file.node_port_addresses.filter(|_| !from_flags("nodeport_addresses")) {
        args.nodeport_addresses = match v {
            crate::model::NodePortAddresses::All => Vec::new(),
            crate::model::NodePortAddresses::Primary => vec!["primary".into()],
            crate::model::NodePortAddresses::Cidrs(c) => c.iter().map(|(a, l)| format!("{a}/{l}")).collect(),
        };
    }
    if let Some(v) = file.masquerade_all.filter(|_| !from_flags("masquerade_all")) {
        args.masquerade_all = v;
    }
    if let Some(v) = file.tcp_be_liberal.filter(|_| !from_flags("conntrack_tcp_be_liberal")) {
        args.conntrack_tcp_be_liberal = v;
    }
    let ct = &mut args.conntrack;
    for (value, id, field) in [
        (file.tcp_established_timeout, "conntrack_tcp_timeout_established", &mut ct.conntrack_tcp_timeout_established),
        (file.tcp_close_wait_timeout, "conntrack_tcp_timeout_close_wait", &mut ct.conntrack_tcp_timeout_close_wait),
        (file.udp_timeout, "conntrack_udp_timeout", &mut ct.conntrack_udp_timeout),
        (file.udp_stream_timeout, "conntrack_udp_timeout_stream", &mut ct.conntrack_udp_timeout_stream),
    ] {
        if let Some(v) = value.filter(|_| !from_flags(id)) {
            *field = v;
        }
    }
    if let Some(v) = file.conntrack_max_per_core.filter(|_| !from_flags("conntrack_max_per_core")) {
        ct.conntrack_max_per_core = v;
    }
    if let Some(v) = file.conntrack_min.filter(|_| !from_flags("conntrack_min")) {
        ct.conntrack_min = v;
    }
    if let Some(v) = file.healthz_bind_address.filter(|_| !from_flags("healthz_bind_address")) {
        args.healthz_bind_address = v;
    }
    if let Some(v) = file.metrics_bind_address.filter(|_| !from_flags("metrics_bind_address")) {
        args.metrics_bind_address = v;
    }
    if let Some(v) = file.hostname_override.filter(|_| !from_flags("node_name")) {
        args.node_name = Some(v);
    }
    if let Some(v) = file.sync_period.filter(|_| !from_flags("sync_period")) {
        args.sync_period = v;
    }
    if let Some(v) = file.min_sync_period.filter(|_| !from_flags("min_sync_period")) {
        args.min_sync_period = v;
    }
    if let Some(v) = file.masquerade_bit.filter(|_| !from_flags("iptables_masquerade_bit")) {
        args.iptables_masquerade_bit = v;
    }
    if let Some(ip) = file.node_ip.filter(|_| !from_flags("node_ip") && !from_flags("bind_address")) {
        args.node_ip = vec![ip];
    }
    if let Some(v) = file.oom_score_adj.filter(|_| !from_flags("oom_score_adj")) {
        args.oom_score_adj = v;
    }
    if let Some(v) = file.bind_address_hard_fail.filter(|_| !from_flags("bind_address_hard_fail")) {
        args.bind_address_hard_fail = v;
    }
    if let Some(v) = file.kubeconfig.filter(|_| !from_flags("kubeconfig")) {
        args.kubeconfig = Some(v);
    }
    args.pod_interfaces.extend(file.pod_interfaces);
    if !file.unknown.is_empty() {
        tracing::warn!(fields = ?file.unknown, "config file: unknown fields, ignored");
    }
    if !file.ignored.is_empty() {
        tracing::warn!(fields = ?file.ignored, "config file: fields that have no effect here");
    }
}

/// The `KubeProxyConfiguration` section kube-proxy takes sync periods and masquerading from in `mode`.
fn mode_section(mode: Mode) -> &'static str {
    if mode == Mode::Nftables { "nftables" } else { "iptables" }
}

/// A Go duration as kube-proxy writes one: whole seconds as `30s`, else milliseconds.
fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// The settings in effect as a `KubeProxyConfiguration` (`--write-config-to`): what [`crate::config`]
/// reads back to the same settings.
#[must_use]
pub fn resolved_config(args: &Args) -> String {
    let mode = match args.mode {
        Mode::Ebpf => "ebpf",
        Mode::Iptables => "iptables",
        Mode::Nftables => "nftables",
        Mode::Auto => "auto",
        Mode::Ipvs => "ipvs",
    };
    let ct = &args.conntrack;
    let node_port_addresses: Vec<&str> = args.nodeport_addresses.iter().map(String::as_str).collect();
    let doc = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": mode,
        // kube-proxy's bindAddress holds one address: the primary family's (IPv4's when both are given).
        "bindAddress": args.node_ip4().map(std::net::IpAddr::V4).or(args.node_ip6().map(std::net::IpAddr::V6))
            .map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string()),
        "bindAddressHardFail": args.bind_address_hard_fail,
        "healthzBindAddress": args.healthz_bind_address.to_string(),
        "metricsBindAddress": args.metrics_bind_address.to_string(),
        "hostnameOverride": args.node_name.clone().unwrap_or_default(),
        "clusterCIDR": args.cluster_cidr.as_ref().map(ToString::to_string).unwrap_or_default(),
        "nodePortAddresses": node_port_addresses,
        "oomScoreAdj": args.oom_score_adj,
        "clientConnection": { "kubeconfig": args.kubeconfig.as_ref().map(|k| k.display().to_string()).unwrap_or_default() },
        // The mode's own section carries the sync periods and masquerade settings, as kube-proxy reads them.
        mode_section(args.mode): {
            "masqueradeAll": args.masquerade_all,
            "masqueradeBit": args.iptables_masquerade_bit,
            "syncPeriod": go_duration(args.sync_period),
            "minSyncPeriod": go_duration(args.min_sync_period),
        },
        "conntrack": {
            "maxPerCore": ct.conntrack_max_per_core,
            "min": ct.conntrack_min,
            "tcpEstablishedTimeout": go_duration(ct.conntrack_tcp_timeout_established),
            "tcpCloseWaitTimeout": go_duration(ct.conntrack_tcp_timeout_close_wait),
            "udpTimeout": go_duration(ct.conntrack_udp_timeout),
            "udpStreamTimeout": go_duration(ct.conntrack_udp_timeout_stream),
            "tcpBeLiberal": args.conntrack_tcp_be_liberal,
        },
        "logging": { "verbosity": args.verbosity.unwrap_or(0), "format": match args.log_format { LogFormat::Text => "text", LogFormat::Json => "json" } },
    });
    let mut doc = doc;
    if args.mode == Mode::Ipvs {
        // ipvs reads its sync periods from its own section, masquerading from `iptables`.
        doc["ipvs"] = serde_json::json!({
            "syncPeriod": go_duration(args.sync_period),
            "minSyncPeriod": go_duration(args.min_sync_period),
        });
    }
    serde_saphyr::to_string(&doc).unwrap_or_default()
}

/// What kube-proxy's flags that map onto this agent's settings say, applied to `args` (the flags that
/// only exist for kube-proxy's sake are warned about by [`crate::kube_proxy_flags`]).
pub fn apply_kube_proxy_flags(args: &mut Args, config_file: bool) {
    // kube-proxy's bindAddress overrides the node IP of its family (IPv6 too); `--node-ip` wins.
    if let Some(ip) = args.bind_address
        && !ip.is_unspecified()
        && !args.node_ip.iter().any(|n| n.is_ipv4() == ip.is_ipv4())
    {
        args.node_ip.push(ip);
    }
    // kube-proxy folds the deprecated ports in only without a config file.
    for (port, addr, name) in [
        (args.healthz_port, &mut args.healthz_bind_address, "--healthz-port"),
        (args.metrics_port, &mut args.metrics_bind_address, "--metrics-port"),
    ] {
        match port {
            Some(_) if config_file => tracing::warn!(flag = name, "ignored with --config, as kube-proxy ignores it"),
            Some(0) => tracing::warn!(flag = name, "0 would turn the server off in kube-proxy; it stays on here"),
            Some(p) => addr.set_port(p),
            None => {}
        }
    }
    match args.detect_local_mode.as_deref() {
        Some("InterfaceNamePrefix") => {
            if let Some(prefix) = args.pod_interface_name_prefix.clone().filter(|p| !p.is_empty()) {
                args.pod_interfaces.push(format!("{prefix}*"));
            }
        }
        Some("BridgeInterface") => {
            if let Some(bridge) = args.pod_bridge_interface.clone().filter(|b| !b.is_empty()) {
                args.pod_interfaces.push(bridge);
            }
        }
        _ => {}
    }
    let ignored = args.kube_proxy.given();
    if !ignored.is_empty() {
        tracing::warn!(flags = ?ignored, "kube-proxy flags that have no effect here");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_ip_takes_one_address_per_family_and_bind_address_fills_the_other() {
        let parse = |argv: &[&str]| {
            let matches = Args::command().try_get_matches_from(argv).unwrap();
            let mut args = Args::from_arg_matches(&matches).unwrap();
            apply_kube_proxy_flags(&mut args, false);
            args
        };
        let both = parse(&["proxy-agent", "--node-ip", "10.240.0.11,fd00:240::11"]);
        assert_eq!(both.node_ip4(), Some("10.240.0.11".parse().unwrap()));
        assert_eq!(both.node_ip6(), Some("fd00:240::11".parse().unwrap()));
        assert!(check_node_ips(&both.node_ip).is_ok());
        let v6 = parse(&["proxy-agent", "--bind-address", "fd00:240::12"]);
        assert_eq!((v6.node_ip4(), v6.node_ip6()), (None, Some("fd00:240::12".parse().unwrap())));
        let flag_wins = parse(&["proxy-agent", "--node-ip", "fd00:240::11", "--bind-address", "fd00:240::12"]);
        assert_eq!(flag_wins.node_ip, vec!["fd00:240::11".parse::<std::net::IpAddr>().unwrap()]);
        let unspecified = parse(&["proxy-agent", "--bind-address", "::"]);
        assert!(unspecified.node_ip.is_empty(), "`::` means the Node's own addresses");
        let two = parse(&["proxy-agent", "--node-ip", "10.240.0.11,10.240.0.12"]);
        let error = check_node_ips(&two.node_ip).unwrap_err();
        assert!(error.contains("2 IPv4 addresses (10.240.0.11, 10.240.0.12)"), "{error}");
    }

    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;

    #[test]
    fn flags_on_the_command_line_win_over_the_config_file() {
        let matches = Args::command()
            .try_get_matches_from(["proxy-agent", "--min-sync-period", "5s", "--hostname-override", "n1"])
            .unwrap();
        let mut args = Args::from_arg_matches(&matches).unwrap();
        let file =
            crate::config::parse(
                "iptables: {minSyncPeriod: 2s, syncPeriod: 10s, masqueradeAll: true}\nhostnameOverride: other\nconntrack:\n  tcpBeLiberal: true",
            )
            .unwrap();
        apply_file(&mut args, file, &matches);
        assert_eq!(args.min_sync_period, Duration::from_secs(5), "the flag wins");
        assert_eq!(args.sync_period, Duration::from_secs(10), "the file fills in");
        assert_eq!(args.node_name.as_deref(), Some("n1"));
        assert!(args.masquerade_all);
        assert!(args.conntrack_tcp_be_liberal);
    }

    /// `--write-config-to` writes what `--config` reads back to the same settings.
    #[test]
    fn the_written_config_reads_back_to_the_same_settings() {
        let given = [
            "proxy-agent",
            "--proxy-mode=nftables",
            "--cluster-cidr=10.200.0.0/16",
            "--nodeport-addresses=10.240.0.0/24",
            "--masquerade-all",
            "--iptables-masquerade-bit=12",
            "--sync-period=45s",
            "--min-sync-period=250ms",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=2h",
            "--healthz-bind-address=127.0.0.1:9256",
            "--oom-score-adj=-500",
            "--bind-address=10.240.0.11",
            "--hostname-override=node7",
            "--kubeconfig=/etc/kube/config",
            "-v=3",
        ];
        let matches = Args::command().try_get_matches_from(given).unwrap();
        let mut written = Args::from_arg_matches(&matches).unwrap();
        apply_kube_proxy_flags(&mut written, false);
        let text = resolved_config(&written);
        let file = crate::config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(file.unknown.is_empty() && file.ignored.is_empty(), "{:?} {:?}", file.unknown, file.ignored);
        let bare = Args::command().try_get_matches_from(["proxy-agent"]).unwrap();
        let mut read = Args::from_arg_matches(&bare).unwrap();
        apply_file(&mut read, file.clone(), &bare);
        assert_eq!(read.mode, Mode::Nftables);
        assert_eq!(read.cluster_cidr, written.cluster_cidr);
        assert_eq!(read.nodeport_addresses, written.nodeport_addresses);
        assert_eq!((read.masquerade_all, read.iptables_masquerade_bit), (true, 12));
        assert_eq!((read.sync_period, read.min_sync_period), (written.sync_period, written.min_sync_period));
        assert_eq!(read.conntrack.conntrack_max_per_core, 0);
        assert_eq!(read.conntrack.conntrack_tcp_timeout_established, Duration::from_hours(2));
        assert_eq!(read.healthz_bind_address, written.healthz_bind_address);
        assert_eq!((read.oom_score_adj, read.node_ip), (-500, written.node_ip));
        assert_eq!(read.node_name.as_deref(), Some("node7"));
        assert_eq!(read.kubeconfig, written.kubeconfig);
        assert_eq!(file.log_verbosity, Some(3));
    }
}
