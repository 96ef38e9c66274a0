//! kube-proxy's command-line flags that this agent accepts so an existing DaemonSet, static pod or installer
//! (kubeadm, k3s, kops, EKS, GKE, AKS) starts it unchanged, but that have no effect here. Each one given is
//! named in one warning at start-up. The flags that do something here are ordinary flags of [`crate::cli`]
//! (`--proxy-mode`, `-v`, `--healthz-port`, `--bind-address`, `--oom-score-adj`, `--conntrack-*`, …).

/// A flag given with or without a value (`--profiling`, `--profiling=true`, `--ipvs-scheduler rr`).
macro_rules! no_effect_flags {
    ($( $(#[doc = $doc:literal])* $field:ident: $name:literal, )*) => {
        #[derive(Clone, Debug, Default, clap::Args)]
        pub struct NoEffect {
            $(
                $(#[doc = $doc])*
                #[arg(long = $name, value_name = "VALUE", num_args = 0..=1, default_missing_value = "true", hide = true)]
                pub $field: Option<String>,
            )*
        }

        impl NoEffect {
            /// The flags given, as `--name=value`.
            #[must_use]
            pub fn given(&self) -> Vec<String> {
                let mut out = Vec::new();
                $(
                    if let Some(v) = &self.$field {
                        out.push(format!("--{}={v}", $name));
                    }
                )*
                out
            }
        }
    };
}

no_effect_flags! {
    /// Feature gates of kube-proxy's own code.
    feature_gates: "feature-gates",
    /// No `/debug/pprof` here.
    profiling: "profiling",
    show_hidden_metrics_for_version: "show-hidden-metrics-for-version",
    /// Informer resync: the agent's watches relist on their own; `--full-resync-period` is its periodic repair.
    config_sync_period: "config-sync-period",
    /// API client tuning: the agent's client uses JSON and kube-rs's defaults.
    kube_api_qps: "kube-api-qps",
    kube_api_burst: "kube-api-burst",
    kube_api_content_type: "kube-api-content-type",
    /// No IPVS here.
    ipvs_scheduler: "ipvs-scheduler",
    ipvs_exclude_cidrs: "ipvs-exclude-cidrs",
    ipvs_strict_arp: "ipvs-strict-arp",
    ipvs_tcp_timeout: "ipvs-tcp-timeout",
    ipvs_tcpfin_timeout: "ipvs-tcpfin-timeout",
    ipvs_udp_timeout: "ipvs-udp-timeout",
    /// NodePorts are not served on 127.0.0.1 (as in kube-proxy's nftables mode).
    iptables_localhost_nodeports: "iptables-localhost-nodeports",
    /// Removed from kube-proxy in 1.31; still accepted here.
    proxy_port_range: "proxy-port-range",
    /// Per-module levels: use `RUST_LOG`.
    vmodule: "vmodule",
    log_flush_frequency: "log-flush-frequency",
    log_text_split_stream: "log-text-split-stream",
    log_text_info_buffer_size: "log-text-info-buffer-size",
    /// klog's legacy flags: the agent logs to stderr.
    logtostderr: "logtostderr",
    alsologtostderr: "alsologtostderr",
    log_file: "log_file",
    log_file_dash: "log-file",
    log_dir: "log_dir",
    log_dir_dash: "log-dir",
    log_file_max_size: "log_file_max_size",
    log_backtrace_at: "log_backtrace_at",
    add_dir_header: "add_dir_header",
    one_output: "one_output",
    skip_headers: "skip_headers",
    skip_log_headers: "skip_log_headers",
    stderrthreshold: "stderrthreshold",
    /// Windows only.
    windows_service: "windows-service",
    source_vip: "source-vip",
    network_name: "network-name",
    enable_dsr: "enable-dsr",
    root_hnsendpoint_name: "root-hnsendpoint-name",
    forward_healthcheck_vip: "forward-healthcheck-vip",
    /// A cgroup (old kube-proxy); the agent stays where it was started.
    resource_container: "resource-container",
}

/// kube-proxy's `--v` as this agent's log level: V(0)–V(1) is kube-proxy's normal output, V(2) its
/// per-sync lines, V(4) and up its debugging.
#[must_use]
pub fn level_for_verbosity(v: u32) -> &'static str {
    match v {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use crate::cli::Args;

    fn parse(args: &[&str]) -> Args {
        let matches = Args::command().try_get_matches_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        Args::from_arg_matches(&matches).unwrap()
    }

    /// k3s's kube-proxy command line (k3s-io/k3s `kubeProxyArgs`), with a DaemonSet's `--v=2`.
    #[test]
    fn k3s_command_line_starts_the_agent() {
        let args = parse(&[
            "proxy-agent",
            "--proxy-mode=iptables",
            "--healthz-bind-address=127.0.0.1",
            "--kubeconfig=/var/lib/rancher/k3s/agent/kubeproxy.kubeconfig",
            "--cluster-cidr=10.42.0.0/16,2001:cafe:42::/56",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0s",
            "--conntrack-tcp-timeout-close-wait=0s",
            "--hostname-override=node1",
            "--v=2",
            "--alsologtostderr",
            "--log_file=/var/log/kube-proxy.log",
        ]);
        assert_eq!(args.mode, crate::cli::Mode::Iptables);
        assert_eq!(args.healthz_bind_address, "127.0.0.1:10256".parse().unwrap(), "a bare IP gets the port");
        let pair = [("10.42.0.0".parse().unwrap(), 16), ("2001:cafe:42::".parse().unwrap(), 56)];
        assert_eq!(args.cluster_cidr, Some(crate::model::ClusterCidrs::new(&pair).unwrap()), "one per family");
        assert_eq!(args.conntrack.conntrack_max_per_core, 0);
        assert_eq!(args.verbosity, Some(2));
        assert_eq!(args.kube_proxy.given(), ["--alsologtostderr=true", "--log_file=/var/log/kube-proxy.log"]);
    }

    #[test]
    fn kube_proxys_spellings_are_accepted() {
        let args = parse(&[
            "proxy-agent",
            "-v",
            "4",
            "--proxy-mode",
            "ipvs",
            "--iptables-sync-period=1m",
            "--iptables-min-sync-period=10s",
            "--masquerade-all=true",
            "--iptables-masquerade-bit=12",
            "--oom-score-adj=-998",
            "--bind-address=10.240.0.11",
            "--feature-gates=AllAlpha=false",
            "--profiling",
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=cali",
        ]);
        assert_eq!(args.verbosity, Some(4));
        assert_eq!(args.mode, crate::cli::Mode::Ipvs);
        assert_eq!(args.sync_period, std::time::Duration::from_secs(60));
        assert_eq!(args.min_sync_period, std::time::Duration::from_secs(10));
        assert!(args.masquerade_all);
        assert_eq!(args.iptables_masquerade_bit, 12);
        assert_eq!(args.oom_score_adj, -998);
        assert_eq!(args.bind_address, Some("10.240.0.11".parse().unwrap()));
        assert_eq!(args.kube_proxy.given(), ["--feature-gates=AllAlpha=false", "--profiling=true"]);
        assert_eq!(args.detect_local_mode.as_deref(), Some("InterfaceNamePrefix"));
        assert_eq!(args.pod_interface_name_prefix.as_deref(), Some("cali"));
    }

    /// The command lines of `tests/fixtures/kube-proxy/*-args.txt` (k3s, kops, GCE, AKS) parse as they are.
    #[test]
    fn installers_command_lines_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/kube-proxy");
        // Each with a value only its own flags give.
        for (name, verbosity, oom) in
            [("k3s", None, -999), ("kops", Some(2), -998), ("gce", Some(2), -998), ("aks", Some(3), -999)]
        {
            let text = std::fs::read_to_string(format!("{dir}/{name}-args.txt")).unwrap();
            let command_line: Vec<&str> =
                std::iter::once("proxy-agent").chain(text.lines().filter(|l| l.starts_with("--"))).collect();
            let parsed = parse(&command_line);
            assert_eq!((parsed.verbosity, parsed.oom_score_adj), (verbosity, oom), "{name}");
        }
        let gce = std::fs::read_to_string(format!("{dir}/gce-args.txt")).unwrap();
        let gce: Vec<&str> =
            std::iter::once("proxy-agent").chain(gce.lines().filter(|l| l.starts_with("--"))).collect();
        let args = parse(&gce);
        assert_eq!(
            (args.sync_period, args.min_sync_period),
            (std::time::Duration::from_mins(1), std::time::Duration::from_secs(10))
        );
        assert_eq!(args.oom_score_adj, -998);
    }

    #[test]
    fn verbosity_maps_onto_log_levels() {
        assert_eq!(super::level_for_verbosity(0), "info");
        assert_eq!(super::level_for_verbosity(2), "debug");
        assert_eq!(super::level_for_verbosity(9), "trace");
    }
}
