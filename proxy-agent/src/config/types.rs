//! kube-proxy's `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`, as of Kubernetes 1.34), field
//! for field, as serde reads it. Every field is optional: a file says `null` or leaves a field out where
//! kube-proxy's defaulting fills it in (`super::resolve` applies those defaults and kube-proxy's
//! validation). Fields nobody knows are collected, not refused, as kube-proxy's lenient decoding does.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// A Go `metav1.Duration` as YAML carries it: `24h0m0s`, `30s`, `500ms`, `0s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoDuration(pub std::time::Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_go_duration(&text)
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a duration")))
    }
}

/// Go's `time.ParseDuration` for what configurations hold: a sequence of decimal numbers with units (`h`,
/// `m`, `s`, `ms`, `us`/`µs`, `ns`), or `0`. Negative durations are refused here (kube-proxy refuses them
/// in validation), so a sign is an error.
#[must_use]
pub fn parse_go_duration(text: &str) -> Option<std::time::Duration> {
    if text == "0" {
        return Some(std::time::Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    std::time::Duration::try_from_secs_f64(total).ok()
}

/// Fields of a section that this agent does not know, by name (kube-proxy's lenient decoding keeps going).
pub type Unknown = BTreeMap<String, Value>;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<Logging>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<IptablesSection>,
    pub ipvs: Option<IpvsSection>,
    pub nftables: Option<NftablesSection>,
    /// Windows only: accepted, and warned about when set.
    pub winkernel: Option<Value>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i64>,
    pub conntrack: Option<Conntrack>,
    pub config_sync_period: Option<GoDuration>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    #[expect(dead_code, reason = "typed for the whole format; the API client's tuning has no counterpart here")]
    pub accept_content_types: Option<String>,
    #[expect(dead_code, reason = "typed for the whole format; the client speaks JSON")]
    pub content_type: Option<String>,
    #[expect(dead_code, reason = "typed for the whole format; kube-rs does not rate-limit")]
    pub qps: Option<f64>,
    pub burst: Option<i64>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    pub format: Option<String>,
    /// A duration string or a number of nanoseconds.
    #[expect(dead_code, reason = "typed for the whole format; the agent's log is unbuffered")]
    pub flush_frequency: Option<Value>,
    pub verbosity: Option<i64>,
    pub vmodule: Option<Vec<Value>>,
    #[expect(dead_code, reason = "typed for the whole format; klog's alpha stream options have no counterpart")]
    pub options: Option<Value>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IptablesSection {
    pub masquerade_bit: Option<i64>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpvsSection {
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NftablesSection {
    pub masquerade_bit: Option<i64>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conntrack {
    pub max_per_core: Option<i64>,
    pub min: Option<i64>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_go_duration;

    #[test]
    fn go_durations_parse_as_go_writes_them() {
        assert_eq!(parse_go_duration("24h0m0s"), Some(Duration::from_hours(24)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_mins(90)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "soon", "10", "-1s", "1d", "1h-2m", "s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }
}
