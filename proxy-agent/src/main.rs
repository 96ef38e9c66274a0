//! proxy-agent: the node daemon. Wires source → store → model → dataplane.

mod cli;
mod config;
mod conntrack_settings;
mod dataplane;
mod health;
mod kube_proxy_flags;
mod metrics;
mod mode;
mod model;
mod node;
mod source;
mod store;
mod sync;
#[cfg(test)]
mod testing;

use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _};

use crate::{
    dataplane::ebpf::{
        EbpfDataplane, InterfacePatterns, InterfaceRoles, NodeSettings,
        handover::{Drain, Draining, TakeOver},
    },
    model::NodeIdentity,
    store::Store,
};

/// `RUST_LOG` if set, else kube-proxy's `--v` (or the config file's `logging.verbosity`) as a level.
fn init_logging(format: cli::LogFormat, verbosity: Option<u32>) {
    let level = kube_proxy_flags::level_for_verbosity(verbosity.unwrap_or(0));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = cli::Args::command().get_matches();
    let args = settings(&matches)?;
    if one_shot(&args)? {
        return Ok(());
    }
    if args.cleanup {
        remove_dataplanes_except(None, &args.bpffs, Kept::default())?;
        tracing::info!(pins = %args.bpffs.display(), "cleaned up: eBPF programs detached, iptables chains and nftables tables removed");
        return Ok(());
    }
    set_oom_score_adj(args.oom_score_adj);
    let node_name = args.node_name.clone().context("this node's name is needed: --hostname-override or NODE_NAME")?;
    let roles = InterfaceRoles {
        pods: InterfacePatterns::new(args.pod_interfaces.clone()),
        hosts: InterfacePatterns::new(args.host_interfaces.clone()),
    };
    let node_port_addresses = cli::parse_nodeport_addresses(&args.nodeport_addresses)
        .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
    cli::check_node_ips(&args.node_ip).map_err(|e| anyhow::anyhow!("--node-ip: {e}"))?;
    let addresses = node::host_addresses(&roles).context("reading this node's addresses")?;
    anyhow::ensure!(
        args.service_cluster_ip_range.iter().all(|(_, len)| *len > 0),
        "--service-cluster-ip-range: a /0 range would cover every address"
    );
    let service_cidrs = args.service_cluster_ip_range.iter().map(|(addr, len)| model::network(*addr, *len)).collect();
    let node = NodeIdentity { name: node_name, addresses, node_port_addresses, service_cidrs };
    let settings = node_settings(&args, &node);
    tracing::info!(node = %node.name, addresses = ?node.addresses, snat = ?settings.snat_addr, version = env!("CARGO_PKG_VERSION"), "starting");

    if args.conntrack_tcp_be_liberal {
        dataplane::netfilter::set_tcp_be_liberal()?;
    }
    let (mode, reason) = mode::choose(args.mode);
    let flow_stats = std::sync::Arc::new(dataplane::ebpf::FlowTableStats::default());
    let dataplane = start_dataplane(&args, mode, roles, &settings, flow_stats.clone())?;
    tracing::info!(mode = dataplane.name(), reason, "dataplane started");
    let (store, snapshots) = Store::new();

    let source = if let Some(dir) = &args.manifests {
        tracing::info!(dir = %dir.display(), "source: manifest directory");
        tokio::spawn(source::manifests::ManifestSource::new(dir.clone(), args.manifest_poll_interval).run(store))
    } else {
        {
            let config = source::kubernetes::client_config(args.master.as_deref(), args.kubeconfig.as_deref()).await?;
            tracing::info!(server = %config.cluster_url, "source: Kubernetes API");
            let client = kube::Client::try_from(config).context("building the API client")?;
            tokio::spawn(source::kubernetes::run(client, node.name.clone(), store))
        }
    };

    let sync_config = sync::SyncConfig {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        full_resync_period: args.full_resync_period,
        housekeeping_period: Duration::from_secs(1).min(args.sync_period),
    };
    let mut metrics = metrics::Metrics::new();
    if dataplane.name() == "ebpf" {
        dataplane::ebpf::register_collectors(&mut metrics.registry, &args.bpffs, flow_stats);
    }
    let metrics = std::sync::Arc::new(metrics);
    // kube-proxy: unhealthy when a change has waited more than twice the sync period.
    let health = std::sync::Arc::new(health::proxy::ProxyHealth::new(2 * args.sync_period));
    let hard_fail = args.bind_address_hard_fail;
    let _health_server = health::proxy::serve_health(args.healthz_bind_address, hard_fail, health.clone()).await?;
    let _metrics_server = health::proxy::serve_metrics(args.metrics_bind_address, hard_fail, metrics.clone()).await?;
    metrics
        .dataplane_mode
        .get_or_create(&metrics::ModeLabel { mode: dataplane.name().to_owned(), reason: reason.to_owned() })
        .set(1);
    let observers = sync::Observers { metrics, health };
    let sync = sync::run(snapshots, node, dataplane, sync_config, observers);

    tokio::select! {
        result = sync => result.context("sync loop"),
        result = source => result.context("source task panicked")?.context("source"),
        () = shutdown_signal() => {
            // Maps stay pinned; the next agent adopts them.
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// Starts the dataplane of `mode`, after removing what the others left: never two dataplanes on the same
/// packets. The one this mode takes live traffic from stays until no flow needs it (`handover`).
fn start_dataplane(
    args: &cli::Args,
    mode: cli::Mode,
    roles: InterfaceRoles,
    settings: &NodeSettings,
    flow_stats: std::sync::Arc<dataplane::ebpf::FlowTableStats>,
) -> anyhow::Result<Box<dyn dataplane::Dataplane>> {
    let ebpf_mode = matches!(mode, cli::Mode::Ebpf | cli::Mode::Auto | cli::Mode::Ipvs);
    let take_over = if ebpf_mode { TakeOver::needed() } else { None };
    let drain =
        if ebpf_mode { None } else { Drain::needed(&args.bpffs, args.conntrack.timeouts(), args.drain_timeout) };
    let keep = Kept { ebpf: drain.is_some(), netfilter: take_over.is_some() };
    remove_dataplanes_except(Some(mode), &args.bpffs, keep)?;
    let rule_config = dataplane::netfilter::RuleConfig {
        masquerade_all: args.masquerade_all,
        masquerade_bit: args.iptables_masquerade_bit,
        cluster_cidrs: args.cluster_cidr.clone().unwrap_or_default(),
        pod_interfaces: args.pod_interfaces.clone(),
        // As kube-proxy: read after setting it, so a node configured liberal by other means counts too.
        tcp_be_liberal: dataplane::netfilter::tcp_be_liberal(),
    };
    if rule_config.tcp_be_liberal {
        tracing::info!(set_here = args.conntrack_tcp_be_liberal, "conntrack: nf_conntrack_tcp_be_liberal is 1");
    }
    conntrack_settings::apply_to_kernel(&args.conntrack, mode);
    let mut dataplane: Box<dyn dataplane::Dataplane> = match mode {
        cli::Mode::Iptables => Box::new(dataplane::iptables::IptablesDataplane::start(rule_config)),
        cli::Mode::Nftables => Box::new(dataplane::nftables::NftablesDataplane::start(rule_config)),
        cli::Mode::Ebpf | cli::Mode::Auto | cli::Mode::Ipvs => Box::new(
            EbpfDataplane::start(&args.bpffs, roles, settings, flow_stats, take_over)
                .context("starting the eBPF dataplane")?,
        ),
    };
    if let Some(drain) = drain {
        tracing::info!(pins = %args.bpffs.display(), timeout = ?args.drain_timeout, "the eBPF dataplane runs here: it is drained once this mode's rules are in");
        dataplane = Box::new(Draining::new(dataplane, drain));
    }
    Ok(dataplane)
}

/// Dataplanes left in place at start-up, since the starting one takes live traffic from them.
#[derive(Clone, Copy, Default)]
struct Kept {
    /// The eBPF programs, drained into a netfilter mode's rules.
    ebpf: bool,
    /// Netfilter rules, taken over by the eBPF programs.
    netfilter: bool,
}

/// kube-proxy's cleanup: removes what each dataplane other than `keep` left in the kernel (all of them for
/// `None`): the eBPF pins (which detaches the programs), the `KUBE-` iptables chains, the nftables tables.
fn remove_dataplanes_except(keep: Option<cli::Mode>, bpffs: &std::path::Path, kept: Kept) -> anyhow::Result<()> {
    if keep != Some(cli::Mode::Ebpf) && !kept.ebpf {
        dataplane::ebpf::cleanup(bpffs)?;
        dataplane::ebpf::handover::release_conntrack()?;
    }
    if kept.netfilter {
        return Ok(());
    }
    if keep != Some(cli::Mode::Iptables) {
        let removed = dataplane::iptables::cleanup().context("removing the KUBE- iptables chains")?;
        if removed > 0 {
            tracing::info!(chains = removed, "removed the KUBE- iptables chains another proxy left");
        }
    }
    if keep != Some(cli::Mode::Nftables) {
        let removed = dataplane::nftables::cleanup().context("removing the nftables tables")?;
        if removed > 0 {
            tracing::info!(tables = removed, "removed the nftables tables another proxy left");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The flags, the config file under them, and kube-proxy's flags folded in; starts logging on the way. The
/// file's logging settings count too (flags win), so it is read before logging starts; what it has to say
/// is logged once logging has.
fn settings(matches: &clap::ArgMatches) -> anyhow::Result<cli::Args> {
    let mut args = cli::Args::from_arg_matches(matches)?;
    let file = args.config.clone().map(|path| config::load(&path).map(|f| (path, f))).transpose()?;
    let flag_given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let format = match file.as_ref().and_then(|(_, f)| f.log_format.as_deref()) {
        Some("json") if !flag_given("log_format") => cli::LogFormat::Json,
        Some("text") if !flag_given("log_format") => cli::LogFormat::Text,
        _ => args.log_format,
    };
    init_logging(format, args.verbosity.or_else(|| file.as_ref().and_then(|(_, f)| f.log_verbosity)));
    let config_file = file.is_some();
    if let Some((path, file)) = file {
        cli::apply_file(&mut args, file, matches);
        tracing::info!(config = %path.display(), "config file loaded");
    }
    cli::apply_kube_proxy_flags(&mut args, config_file);
    Ok(args)
}

/// kube-proxy's one-shot modes: `--write-config-to` writes the settings in effect, `--init-only` applies
/// the kernel settings. Returns whether one ran (and the agent is done).
fn one_shot(args: &cli::Args) -> anyhow::Result<bool> {
    if let Some(path) = &args.write_config_to {
        std::fs::write(path, cli::resolved_config(args))
            .with_context(|| format!("--write-config-to {}", path.display()))?;
        tracing::info!(file = %path.display(), "configuration written");
        return Ok(true);
    }
    if args.init_only {
        if args.conntrack_tcp_be_liberal {
            dataplane::netfilter::set_tcp_be_liberal()?;
        }
        conntrack_settings::apply_to_kernel(&args.conntrack, mode::choose(args.mode).0);
        tracing::info!("kernel settings applied (--init-only)");
        return Ok(true);
    }
    Ok(false)
}

/// kube-proxy's `oomScoreAdj`: the kernel kills the agent last. A failure (no permission) is logged.
fn set_oom_score_adj(value: i32) {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", value.to_string()) {
        // kube-proxy logs this at V(2) and goes on; so does the agent.
        tracing::info!(value, error = %e, "could not set oom_score_adj");
    }
}

/// The eBPF dataplane's node-wide settings, from the flags and the node's addresses.
fn node_settings(args: &cli::Args, node: &NodeIdentity) -> NodeSettings {
    NodeSettings {
        snat_addr: args.node_ip4().or_else(|| {
            node.addresses.iter().find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(*v4),
                std::net::IpAddr::V6(_) => None,
            })
        }),
        snat_ports: args.snat_ports,
        masquerade_all: args.masquerade_all,
        snat_addr6: args.node_ip6().or_else(|| {
            node.addresses.iter().find_map(|a| match a {
                std::net::IpAddr::V6(v6) => Some(*v6),
                std::net::IpAddr::V4(_) => None,
            })
        }),
        cluster_cidr: args.cluster_cidr.as_ref().and_then(|c| c.of_family(false)).and_then(|(a, len)| match a {
            std::net::IpAddr::V4(a) => Some((a, len)),
            std::net::IpAddr::V6(_) => None,
        }),
        cluster_cidr6: args.cluster_cidr.as_ref().and_then(|c| c.of_family(true)).and_then(|(a, len)| match a {
            std::net::IpAddr::V6(a) => Some((a, len)),
            std::net::IpAddr::V4(_) => None,
        }),
        xdp: args.xdp,
        timeouts: args.conntrack.timeouts(),
        max_flows: args.conntrack.max_flows(conntrack_settings::cpus()),
        maglev: dataplane::ebpf::writer::MaglevSettings {
            external_default: args.lb_algorithm.into(),
            table_size: args.maglev_table_size,
        },
        socket_cgroup: dataplane::ebpf::sockets::cgroup_for(args.cgroup.as_deref()),
    }
}
