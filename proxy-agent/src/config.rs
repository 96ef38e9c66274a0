//! The config file: kube-proxy's `KubeProxyConfiguration` (`--config`), for the fields that apply here.
//!
//! Unknown fields are warned about, never fatal, so a file written for kube-proxy loads. A value that does
//! not parse stops start-up with a message naming the field and the value. Flags given on the command line
//! win over the file.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde_yaml::Value;

use crate::model::NodePortAddresses;

/// The fields of a `KubeProxyConfiguration` this agent uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileConfig {
    pub mode: Option<String>,
    pub cluster_cidr: Option<(std::net::Ipv4Addr, u8)>,
    pub node_port_addresses: Option<NodePortAddresses>,
    pub masquerade_all: Option<bool>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub hostname_override: Option<String>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
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
    /// Known fields that have no effect on the eBPF dataplane; logged.
    pub ignored: Vec<String>,
}

/// A field with a value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("config file: {field}: {value:?} {problem}")]
pub struct BadValue {
    pub field: String,
    pub value: String,
    pub problem: String,
}

const KNOWN: &[&str] = &[
    "apiVersion",
    "kind",
    "mode",
    "clusterCIDR",
    "nodePortAddresses",
    "masqueradeAll",
    "healthzBindAddress",
    "metricsBindAddress",
    "hostnameOverride",
    "syncPeriod",
    "minSyncPeriod",
    "conntrack",
];

/// Fields of `conntrack`: kube-proxy writes them to the kernel's netfilter settings; here they also size
/// and time the eBPF dataplane's own connection table. A null is kube-proxy's default.
const CONNTRACK_FIELDS: &[&str] = &[
    "maxPerCore",
    "min",
    "tcpEstablishedTimeout",
    "tcpCloseWaitTimeout",
    "tcpBeLiberal",
    "udpTimeout",
    "udpStreamTimeout",
];

fn bad(field: &str, value: &Value, problem: &str) -> BadValue {
    let value = match value {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_owned(),
    };
    BadValue { field: field.to_owned(), value, problem: problem.to_owned() }
}

fn string(field: &str, v: &Value) -> Result<String, BadValue> {
    v.as_str().map(str::to_owned).ok_or_else(|| bad(field, v, "is not a string"))
}

/// Go's duration syntax (`30s`, `1m0s`, `1h2m3.5s`, `500ms`).
fn duration(field: &str, v: &Value) -> Result<Duration, BadValue> {
    let s = string(field, v)?;
    humantime::parse_duration(&s).map_err(|_| bad(field, v, "is not a duration"))
}

fn address(field: &str, v: &Value) -> Result<SocketAddr, BadValue> {
    let s = string(field, v)?;
    // kube-proxy also accepts a bare IP here and uses its default port.
    s.parse().map_err(|_| bad(field, v, "is not ADDRESS:PORT"))
}

fn cidr(field: &str, s: &str, v: &Value) -> Result<(std::net::Ipv4Addr, u8), BadValue> {
    let (addr, len) = s.split_once('/').ok_or_else(|| bad(field, v, "is not a CIDR"))?;
    let addr = addr.parse().map_err(|_| bad(field, v, "is not an IPv4 CIDR"))?;
    let len = len.parse::<u8>().ok().filter(|l| *l <= 32).ok_or_else(|| bad(field, v, "has a bad prefix length"))?;
    Ok((addr, len))
}

/// Parses a config file's text.
pub fn parse(text: &str) -> Result<FileConfig, BadValue> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| BadValue {
        field: "(file)".into(),
        value: String::new(),
        problem: format!("is not YAML: {e}"),
    })?;
    let Value::Mapping(map) = doc else {
        return Err(BadValue { field: "(file)".into(), value: String::new(), problem: "is not a mapping".into() });
    };
    let mut out = FileConfig::default();
    for (key, v) in &map {
        let Some(key) = key.as_str() else { continue };
        match key {
            "apiVersion" | "kind" => {}
            "mode" => {
                let mode = string(key, v)?;
                if !matches!(mode.as_str(), "" | "ebpf" | "iptables" | "nftables" | "auto") {
                    return Err(bad(key, v, "is not available in this build (ebpf, iptables, nftables, auto)"));
                }
                out.mode = Some(mode);
            }
            "clusterCIDR" => {
                let s = string(key, v)?;
                // kube-proxy accepts a comma-separated dual-stack list; the IPv4 one applies here.
                let v4 = s.split(',').map(str::trim).find(|c| !c.contains(':'));
                out.cluster_cidr = v4.filter(|c| !c.is_empty()).map(|c| cidr(key, c, v)).transpose()?;
            }
            "nodePortAddresses" => {
                let list = v.as_sequence().ok_or_else(|| bad(key, v, "is not a list"))?;
                let items: Vec<String> = list.iter().map(|i| string(key, i)).collect::<Result<_, _>>()?;
                out.node_port_addresses = Some(if items.iter().any(|i| i == "primary") {
                    NodePortAddresses::Primary
                } else if items.is_empty() {
                    NodePortAddresses::All
                } else {
                    NodePortAddresses::Cidrs(
                        items.iter().filter(|i| !i.contains(':')).map(|i| cidr(key, i, v)).collect::<Result<_, _>>()?,
                    )
                });
            }
            "masqueradeAll" => {
                out.masquerade_all = Some(v.as_bool().ok_or_else(|| bad(key, v, "is not true or false"))?);
            }
            "healthzBindAddress" => out.healthz_bind_address = Some(address(key, v)?),
            "metricsBindAddress" => out.metrics_bind_address = Some(address(key, v)?),
            "hostnameOverride" => out.hostname_override = Some(string(key, v)?).filter(|s| !s.is_empty()),
            "syncPeriod" => out.sync_period = Some(duration(key, v)?),
            "minSyncPeriod" => out.min_sync_period = Some(duration(key, v)?),
            "conntrack" => {
                let Value::Mapping(ct) = v else { return Err(bad(key, v, "is not a mapping")) };
                for (ck, cv) in ct {
                    let Some(ck) = ck.as_str() else { continue };
                    let field = format!("conntrack.{ck}");
                    if !CONNTRACK_FIELDS.contains(&ck) {
                        out.unknown.push(field);
                        continue;
                    }
                    if cv.is_null() {
                        continue;
                    }
                    let count = |cv: &Value| {
                        cv.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| bad(&field, cv, "is not a non-negative integer"))
                    };
                    match ck {
                        "tcpBeLiberal" => {
                            out.tcp_be_liberal =
                                Some(cv.as_bool().ok_or_else(|| bad(&field, cv, "is not true or false"))?);
                        }
                        "tcpEstablishedTimeout" => out.tcp_established_timeout = Some(duration(&field, cv)?),
                        "tcpCloseWaitTimeout" => out.tcp_close_wait_timeout = Some(duration(&field, cv)?),
                        "udpTimeout" => out.udp_timeout = Some(duration(&field, cv)?),
                        "udpStreamTimeout" => out.udp_stream_timeout = Some(duration(&field, cv)?),
                        "maxPerCore" => out.conntrack_max_per_core = Some(count(cv)?),
                        "min" => out.conntrack_min = Some(count(cv)?),
                        _ => unreachable!("every field of CONNTRACK_FIELDS is handled"),
                    }
                }
            }
            other => {
                debug_assert!(!KNOWN.contains(&other));
                out.unknown.push(other.to_owned());
            }
        }
    }
    Ok(out)
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
    Ok(parse(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_PROXY_STYLE: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ""
clusterCIDR: 10.200.0.0/16,fd00::/48
nodePortAddresses: [10.240.0.0/24]
masqueradeAll: true
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: node7
syncPeriod: 30s
minSyncPeriod: 1m0s
conntrack:
  maxPerCore: 32768
  tcpEstablishedTimeout: 24h0m0s
  tcpBeLiberal: true
iptables:
  masqueradeBit: 14
featureGates: {}
"#;

    #[test]
    fn a_kube_proxy_configuration_loads_and_unknown_fields_are_listed() {
        let c = parse(KUBE_PROXY_STYLE).unwrap();
        assert_eq!(c.cluster_cidr, Some(("10.200.0.0".parse().unwrap(), 16)));
        assert_eq!(c.node_port_addresses, Some(NodePortAddresses::Cidrs(vec![("10.240.0.0".parse().unwrap(), 24)])));
        assert_eq!(c.masquerade_all, Some(true));
        assert_eq!(c.hostname_override.as_deref(), Some("node7"));
        assert_eq!(c.sync_period, Some(Duration::from_secs(30)));
        assert_eq!(c.min_sync_period, Some(Duration::from_secs(60)));
        assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(c.tcp_be_liberal, Some(true));
        assert_eq!(c.unknown, vec!["iptables".to_owned(), "featureGates".to_owned()]);
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);
        assert_eq!(c.conntrack_max_per_core, Some(32_768));
        assert_eq!(c.tcp_established_timeout, Some(Duration::from_hours(24)));
        assert_eq!(c.udp_timeout, None);
    }

    #[test]
    fn an_invalid_value_names_the_field_and_the_value() {
        let cases = [
            ("syncPeriod: soon", "syncPeriod", "soon"),
            ("clusterCIDR: 10.200.0.0/40", "clusterCIDR", "10.200.0.0/40"),
            ("metricsBindAddress: nowhere", "metricsBindAddress", "nowhere"),
            ("masqueradeAll: perhaps", "masqueradeAll", "perhaps"),
            ("mode: ipvs", "mode", "ipvs"),
            ("conntrack: {udpTimeout: forever}", "conntrack.udpTimeout", "forever"),
            ("conntrack: {tcpBeLiberal: yes please}", "conntrack.tcpBeLiberal", "yes please"),
            ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore", "-1"),
        ];
        for (text, field, value) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{text}");
            assert!(e.to_string().starts_with(&format!("config file: {field}: ")), "{e}");
        }
    }

    /// The configuration the DaemonSet ships (deploy/base/configmap.yaml) loads without unknown fields.
    #[test]
    fn the_deployed_config_map_loads_cleanly() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/configmap.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let map = serde_yaml::Deserializer::from_str(&text)
            .map(|doc| <ConfigMap as serde::Deserialize>::deserialize(doc).unwrap())
            .find(|m| m.metadata.name.as_deref() == Some("proxy-agent"))
            .expect("the proxy-agent ConfigMap");
        let c = parse(&map.data.unwrap()["config.conf"]).unwrap();
        assert_eq!(c.mode.as_deref(), Some("ebpf"));
        assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert!(c.unknown.is_empty() && c.ignored.is_empty(), "{:?} {:?}", c.unknown, c.ignored);
    }
}
