//! Command-line flags. Names follow kube-proxy's where the meaning is the same.

use std::{path::PathBuf, time::Duration};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "proxy-agent", version, about = "A kube-proxy replacement whose service dataplane runs in eBPF")]
pub struct Args {
    /// Read Services, EndpointSlices and Nodes from this directory of manifests instead of the API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// How often the manifest directory is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub manifest_poll_interval: Duration,

    /// The API server's URL; by default the in-cluster config, then the kubeconfig, are used.
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// This node's name, as in its Node object.
    #[arg(long = "hostname-override", env = "NODE_NAME", value_name = "NAME")]
    pub node_name: String,

    /// bpffs directory where the maps are pinned; a restarted agent adopts what it finds there.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/proxy-agent")]
    pub bpffs: PathBuf,

    /// Interfaces that face pods (the host end of each pod's veth); `*` matches any characters.
    #[arg(long, value_name = "GLOB,...", value_delimiter = ',', default_value = "veth*,cali*,lxc*,cni*")]
    pub pod_interfaces: Vec<String>,

    /// At most one sync per period, however fast changes arrive.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_sync_period: Duration,

    /// A full reconcile at least this often.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
