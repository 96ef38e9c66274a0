//! Connection-tracking settings: lifetimes by flow state and table size, under kube-proxy's flag names where
//! kube-proxy has them. The eBPF dataplane applies them to its own tables (`CONFIG` and the size of
//! `CONNTRACK`, `SNAT`, `FRAGS`); the netfilter modes to the kernel's conntrack, as kube-proxy does.

use std::time::Duration;

use proxy_common::conntrack::Timeouts;

/// A duration flag's value, as Go writes them (`24h0m0s`, `30s`, `0s`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

#[derive(Clone, Debug, clap::Args)]
#[expect(clippy::struct_field_names, reason = "the fields are kube-proxy's flag names")]
pub struct ConntrackArgs {
    /// Idle lifetime of an established TCP flow (kube-proxy's `conntrack.tcpEstablishedTimeout`). 0: keep
    /// the kernel's (5 days) in the netfilter modes, 24h in the eBPF tables.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,

    /// Idle lifetime of a TCP flow one side has closed (kube-proxy's `conntrack.tcpCloseWaitTimeout`). 0:
    /// keep the kernel's (60 s) in the netfilter modes, 1h in the eBPF tables.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,

    /// Idle lifetime of a UDP flow not (yet) answered, or answered within its first 2 s (kube-proxy's
    /// `conntrack.udpTimeout`). 0: the kernel's, 30 s.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,

    /// Idle lifetime of an answered UDP flow still going after 2 s (kube-proxy's
    /// `conntrack.udpStreamTimeout`). 0: the kernel's, 120 s.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,

    /// eBPF tables: idle lifetime of a TCP flow whose SYN is unanswered (the kernel's `syn_sent`).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_syn_sent: Duration,

    /// eBPF tables: a TCP flow whose SYN-ACK was seen, handshake not complete (the kernel's `syn_recv`).
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_syn_recv: Duration,

    /// eBPF tables: a TCP flow both sides have closed (the kernel's `time_wait`).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_time_wait: Duration,

    /// eBPF tables: a TCP flow after a RST (the kernel's `close`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close: Duration,

    /// Flows tracked per CPU (kube-proxy's `conntrack.maxPerCore`): the eBPF connection table holds
    /// max(this × CPUs, `--conntrack-min`) flows. 0: `--conntrack-min` alone.
    #[arg(long, value_name = "N", default_value_t = 32_768)]
    pub conntrack_max_per_core: u32,

    /// The least flows tracked, whatever the CPU count (kube-proxy's `conntrack.min`).
    #[arg(long, value_name = "N", default_value_t = 131_072)]
    pub conntrack_min: u32,
}

/// Seconds of a duration for a table that counts in seconds; at least 1 when non-zero, so a sub-second
/// setting does not mean "forever" or "never".
fn secs(d: Duration) -> u32 {
    if d.is_zero() {
        return 0;
    }
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
}

impl ConntrackArgs {
    /// The eBPF tables' lifetimes. A zero kube-proxy setting means the kernel's default there too.
    #[must_use]
    pub fn timeouts(&self) -> Timeouts {
        let d = Timeouts::DEFAULT;
        let or = |v: Duration, default: u32| match secs(v) {
            0 => default,
            s => s,
        };
        Timeouts {
            tcp_syn_sent: or(self.conntrack_tcp_timeout_syn_sent, d.tcp_syn_sent),
            tcp_syn_recv: or(self.conntrack_tcp_timeout_syn_recv, d.tcp_syn_recv),
            tcp_established: or(self.conntrack_tcp_timeout_established, d.tcp_established),
            tcp_close_wait: or(self.conntrack_tcp_timeout_close_wait, d.tcp_close_wait),
            tcp_time_wait: or(self.conntrack_tcp_timeout_time_wait, d.tcp_time_wait),
            tcp_close: or(self.conntrack_tcp_timeout_close, d.tcp_close),
            udp: or(self.conntrack_udp_timeout, d.udp),
            udp_stream: or(self.conntrack_udp_timeout_stream, d.udp_stream),
        }
    }

    /// How many flows the tables hold on a node with `cpus` CPUs, as kube-proxy sizes the kernel's.
    #[must_use]
    pub fn max_flows(&self, cpus: u32) -> u32 {
        self.conntrack_max_per_core.saturating_mul(cpus).max(self.conntrack_min).max(1)
    }

    /// The kernel settings kube-proxy writes for these flags: (sysctl under `net/netfilter`, seconds), for
    /// the non-zero ones.
    #[must_use]
    pub fn kernel_timeouts(&self) -> Vec<(&'static str, u32)> {
        [
            ("nf_conntrack_tcp_timeout_established", self.conntrack_tcp_timeout_established),
            ("nf_conntrack_tcp_timeout_close_wait", self.conntrack_tcp_timeout_close_wait),
            ("nf_conntrack_udp_timeout", self.conntrack_udp_timeout),
            ("nf_conntrack_udp_timeout_stream", self.conntrack_udp_timeout_stream),
        ]
        .into_iter()
        .filter_map(|(name, d)| Some((name, secs(d))).filter(|(_, s)| *s > 0))
        .collect()
    }
}

/// Writes the kernel's conntrack timeouts in the netfilter modes, as kube-proxy does at start (the eBPF
/// mode times its own table). A setting the kernel refuses is logged and left, as kube-proxy logs it: the
/// dataplane still works with the kernel's own value.
pub fn apply_to_kernel(args: &ConntrackArgs, mode: crate::cli::Mode) {
    if !matches!(mode, crate::cli::Mode::Iptables | crate::cli::Mode::Nftables) {
        return;
    }
    for (name, value) in args.kernel_timeouts() {
        let path = format!("/proc/sys/net/netfilter/{name}");
        match std::fs::write(&path, value.to_string()) {
            Ok(()) => tracing::info!(setting = name, seconds = value, "conntrack: kernel timeout set"),
            Err(e) => {
                tracing::warn!(setting = name, seconds = value, error = %e, "conntrack: cannot set the kernel's timeout");
            }
        }
    }
}

/// The number of CPUs the data path runs on (the kernel's possible CPUs, as per-CPU maps count them).
#[must_use]
pub fn cpus() -> u32 {
    aya::util::nr_cpus().ok().map_or(1, u32::from)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ct: ConntrackArgs,
    }

    fn parse(args: &[&str]) -> ConntrackArgs {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().ct
    }

    #[test]
    fn defaults_are_the_kernels_with_kube_proxys_tcp_settings() {
        let ct = parse(&[]);
        assert_eq!(ct.timeouts(), Timeouts::DEFAULT);
        assert_eq!(ct.timeouts().tcp_established, 86_400);
        assert_eq!(ct.timeouts().udp, 30);
        // kube-proxy writes only what is non-zero: the two TCP settings by default.
        assert_eq!(
            ct.kernel_timeouts(),
            vec![("nf_conntrack_tcp_timeout_established", 86_400), ("nf_conntrack_tcp_timeout_close_wait", 3_600)]
        );
    }

    #[test]
    fn zero_means_the_kernels_value_and_sub_second_is_one_second() {
        let ct = parse(&["--conntrack-tcp-timeout-established=0s", "--conntrack-udp-timeout=500ms"]);
        assert_eq!(ct.timeouts().tcp_established, Timeouts::DEFAULT.tcp_established);
        assert_eq!(ct.timeouts().udp, 1);
        assert_eq!(
            ct.kernel_timeouts(),
            vec![("nf_conntrack_tcp_timeout_close_wait", 3_600), ("nf_conntrack_udp_timeout", 1)]
        );
    }

    #[test]
    fn capacity_is_per_core_times_cpus_at_least_the_minimum() {
        let ct = parse(&[]);
        assert_eq!(ct.max_flows(2), 131_072, "2 × 32768 is below the minimum");
        assert_eq!(ct.max_flows(16), 524_288);
        let ct = parse(&["--conntrack-max-per-core=0", "--conntrack-min=1000"]);
        assert_eq!(ct.max_flows(64), 1000);
    }

    #[test]
    fn a_bad_duration_names_the_flag() {
        let err = Cli::try_parse_from(["x", "--conntrack-udp-timeout", "soon"]).err().unwrap().to_string();
        assert!(err.contains("--conntrack-udp-timeout") && err.contains("soon"), "{err}");
    }
}
