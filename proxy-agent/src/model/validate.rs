//! Turns API objects into checked forms, or a [`Rejection`] that names the object and the field.
//!
//! Both sources use this: the manifest source to refuse a bad edit (keeping the last good version), and the
//! model to skip anything the dataplane cannot honour. Parsing once into typed values means the table
//! builder never meets a bad address or port.

use std::{fmt, net::IpAddr};

use super::sloppy_ip;

use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceSpec},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::Protocol;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why an object was not programmed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rejection {
    pub kind: &'static str,
    /// `namespace/name`
    pub object: String,
    /// A path into the object, as `kubectl explain` spells it: `spec.ports[0].port`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}: {}", self.kind, self.object, self.field, self.reason)
    }
}

impl std::error::Error for Rejection {}

/// A Service port's target: a number, or a name resolved through the EndpointSlice's ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetPort,
    pub node_port: Option<u16>,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedService {
    pub namespace: String,
    pub name: String,
    pub type_: ServiceType,
    /// The cluster IPs, at most one per family (`spec.clusterIPs`); empty for headless and ExternalName
    /// Services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<CheckedServicePort>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except those with `ipMode: Proxy` (the load balancer proxies).
    pub load_balancer_ips: Vec<IpAddr>,
    /// Both families' ranges; each family's frontends use their own.
    pub source_ranges: Vec<super::Cidr>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    /// sessionAffinity ClientIP, with its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// The [`LB_ALGORITHM_ANNOTATION`], if set.
    pub lb_algorithm: Option<super::LbAlgorithm>,
}

/// The annotation that chooses how a Service's new flows pick a backend in the eBPF mode: `random` or
/// `maglev`. Unset: the node's `--lb-algorithm` for external traffic, random for ClusterIPs.
pub const LB_ALGORITHM_ANNOTATION: &str = "proxy-agent.io/lb-algorithm";

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`: three hours.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedSlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedEndpoint {
    /// Of the slice's `addressType`.
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// Topology hints: the zones this endpoint should serve (`hints.forZones`).
    pub zone_hints: Option<Vec<String>>,
    /// Topology hints: the nodes this endpoint should serve (`hints.forNodes`).
    pub node_hints: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedSlice {
    pub namespace: String,
    pub name: String,
    pub service_name: String,
    pub ports: Vec<CheckedSlicePort>,
    pub endpoints: Vec<CheckedEndpoint>,
}

impl CheckedSlice {
    /// The Service this slice belongs to (its `kubernetes.io/service-name` label, in its namespace).
    #[must_use]
    pub fn service_key(&self) -> crate::store::ObjectKey {
        crate::store::ObjectKey { namespace: self.namespace.as_str().into(), name: self.service_name.as_str().into() }
    }
}

struct Checker {
    kind: &'static str,
    object: String,
}

impl Checker {
    fn reject(&self, field: impl Into<String>, reason: impl Into<String>) -> Rejection {
        Rejection { kind: self.kind, object: self.object.clone(), field: field.into(), reason: reason.into() }
    }

    fn port(&self, field: &str, value: i32) -> Result<u16, Rejection> {
        u16::try_from(value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.reject(field, format!("{value} is not a port number (1-65535)")))
    }

    fn ip(&self, field: String, value: &str) -> Result<IpAddr, Rejection> {
        sloppy_ip::parse_ip(value).ok_or_else(|| self.reject(field, format!("{value:?} is not an IP address")))
    }

    fn policy(&self, field: &str, value: Option<&str>) -> Result<TrafficPolicy, Rejection> {
        match value {
            None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
            Some("Local") => Ok(TrafficPolicy::Local),
            Some(other) => Err(self.reject(field, format!("unknown traffic policy {other:?} (Cluster or Local)"))),
        }
    }

    fn protocol(&self, field: &str, value: Option<&str>) -> Result<Protocol, Rejection> {
        Protocol::from_k8s(value).ok_or_else(|| {
            self.reject(field, format!("unknown protocol {:?} (TCP, UDP or SCTP)", value.unwrap_or_default()))
        })
    }
}

fn object_name(namespace: Option<&String>, name: Option<&String>) -> String {
    format!("{}/{}", namespace.map_or("default", String::as_str), name.map_or("", String::as_str))
}

/// Checks a Service. Headless and ExternalName Services check fine and have no cluster IPs.
pub fn service(svc: &Service) -> Result<CheckedService, Rejection> {
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let c = Checker { kind: "Service", object: object_name(Some(&namespace), svc.metadata.name.as_ref()) };
    let name =
        svc.metadata.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| c.reject("metadata.name", "missing"))?;
    let spec = svc.spec.as_ref().ok_or_else(|| c.reject("spec", "missing"))?;

    let cluster_ips = cluster_ips(&c, spec)?;
    let ports = service_ports(&c, spec)?;
    let type_ = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => return Err(c.reject("spec.type", format!("unknown Service type {other:?}"))),
    };
    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(c.ip(format!("spec.externalIPs[{i}]"), ip)?);
    }
    let (load_balancer_ips, source_ranges) = load_balancer(&c, svc, spec)?;
    let affinity_timeout = affinity(&c, spec)?;
    let lb_algorithm = match svc.metadata.annotations.as_ref().and_then(|a| a.get(LB_ALGORITHM_ANNOTATION)) {
        None => None,
        Some(v) if v == "random" => Some(super::LbAlgorithm::Random),
        Some(v) if v == "maglev" => Some(super::LbAlgorithm::Maglev),
        Some(other) => {
            return Err(c.reject(
                format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION}]"),
                format!("{other:?} is not an algorithm (random or maglev)"),
            ));
        }
    };
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => Some(c.port("spec.healthCheckNodePort", n)?),
    };
    Ok(CheckedService {
        namespace,
        name,
        type_,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        external_policy: c.policy("spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref())?,
        internal_policy: c.policy("spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?,
        health_check_node_port,
        affinity_timeout,
        lb_algorithm,
    })
}

/// An IP family as the API spells it (`spec.ipFamilies`, `addressType`).
fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv6() { "IPv6" } else { "IPv4" }
}

fn cluster_ips(c: &Checker, spec: &ServiceSpec) -> Result<Vec<IpAddr>, Rejection> {
    let mut cluster_ips = Vec::new();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(cluster_ips);
    }
    let parse = |field: String, ip: &str| -> Result<Option<IpAddr>, Rejection> {
        match ip {
            "" | "None" => Ok(None),
            _ => {
                sloppy_ip::parse_ip(ip).map(Some).ok_or_else(|| c.reject(field, format!("{ip:?} is not an IP address")))
            }
        }
    };
    let primary = match &spec.cluster_ip {
        Some(ip) => parse("spec.clusterIP".into(), ip)?,
        None => None,
    };
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    for (i, ip) in listed.iter().enumerate() {
        cluster_ips.extend(parse(format!("spec.clusterIPs[{i}]"), ip)?);
    }
    // The API server keeps clusterIPs[0] equal to clusterIP; a manifest may set either or both.
    match (primary, listed.first()) {
        (Some(p), Some(first)) if sloppy_ip::parse_ip(first) != Some(p) => {
            return Err(c.reject("spec.clusterIP", format!("{p} does not match spec.clusterIPs[0] {first:?}")));
        }
        (Some(p), None) => cluster_ips.push(p),
        _ => {}
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (i, family) in families.iter().enumerate() {
        if family != "IPv4" && family != "IPv6" {
            return Err(
                c.reject(format!("spec.ipFamilies[{i}]"), format!("unknown IP family {family:?} (IPv4 or IPv6)"))
            );
        }
    }
    for (i, ip) in cluster_ips.iter().enumerate() {
        if let Some(family) = families.get(i).filter(|f| *f != family_name(*ip)) {
            return Err(c.reject(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip} is {} but spec.ipFamilies[{i}] is {family}", family_name(*ip)),
            ));
        }
    }
    match cluster_ips.as_slice() {
        [a, b] if a.is_ipv6() == b.is_ipv6() => {
            return Err(
                c.reject("spec.clusterIPs[1]", format!("{b} is of the same family as {a}: one cluster IP per family"))
            );
        }
        [_, _] if spec.ip_family_policy.as_deref() == Some("SingleStack") => {
            return Err(c.reject("spec.ipFamilyPolicy", "SingleStack with two cluster IPs"));
        }
        [_, _, extra, ..] => {
            return Err(c.reject("spec.clusterIPs[2]", format!("{extra}: at most one cluster IP per family")));
        }
        _ => {}
    }
    Ok(cluster_ips)
}

fn service_ports(c: &Checker, spec: &ServiceSpec) -> Result<Vec<CheckedServicePort>, Rejection> {
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = c.port(&format!("spec.ports[{i}].port"), p.port)?;
        let protocol = c.protocol(&format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(c.port(&format!("spec.ports[{i}].targetPort"), *n)?),
            Some(IntOrString::String(s)) if s.is_empty() => {
                return Err(c.reject(format!("spec.ports[{i}].targetPort"), "empty port name"));
            }
            // A numeric string is how YAML often spells a number; the API server treats it as one.
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(c.port(&format!("spec.ports[{i}].targetPort"), n)?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(c.port(&format!("spec.ports[{i}].nodePort"), n)?),
        };
        ports.push(CheckedServicePort { name: p.name.clone().unwrap_or_default(), port, protocol, target, node_port });
    }
    Ok(ports)
}

/// `status.loadBalancer.ingress[].ip` (but not those with `ipMode: Proxy`) and `loadBalancerSourceRanges`.
type LoadBalancerFields = (Vec<IpAddr>, Vec<super::Cidr>);

fn load_balancer(c: &Checker, svc: &Service, spec: &ServiceSpec) -> Result<LoadBalancerFields, Rejection> {
    let mut load_balancer_ips = Vec::new();
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(ip) = &ing.ip else { continue };
        let addr = c.ip(format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
        // With ipMode Proxy the load balancer terminates traffic itself and forwards to nodes: no rule here.
        if ing.ip_mode.as_deref() != Some("Proxy") {
            load_balancer_ips.push(addr);
        }
    }
    let mut source_ranges = Vec::new();
    for (i, range) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        let field = format!("spec.loadBalancerSourceRanges[{i}]");
        match sloppy_ip::parse_cidr(range.trim()) {
            // The network, as kube-proxy's parser returns it: host bits cleared.
            Some((addr, len)) => source_ranges.push(super::network(addr, len)),
            None => return Err(c.reject(field, format!("{range:?} is not a CIDR"))),
        }
    }
    Ok((load_balancer_ips, source_ranges))
}

fn affinity(c: &Checker, spec: &ServiceSpec) -> Result<Option<u32>, Rejection> {
    Ok(match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT.cast_signed());
            if !(1..=86_400).contains(&timeout) {
                return Err(c.reject(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{timeout} is not in 1..=86400"),
                ));
            }
            Some(timeout.cast_unsigned())
        }
        Some(other) => {
            return Err(c.reject("spec.sessionAffinity", format!("unknown affinity {other:?} (None or ClientIP)")));
        }
    })
}

/// A `ServiceCIDR`'s ranges (one per family), networks with host bits cleared. A range that does not parse
/// rejects the object, naming it.
pub fn service_cidr(obj: &ServiceCIDR) -> Result<Vec<super::Cidr>, Rejection> {
    let c = Checker { kind: "ServiceCIDR", object: obj.metadata.name.clone().unwrap_or_default() };
    let mut out = Vec::new();
    for (i, cidr) in obj.spec.as_ref().and_then(|s| s.cidrs.as_ref()).into_iter().flatten().enumerate() {
        match sloppy_ip::parse_cidr(cidr.trim()) {
            Some((addr, len)) if len > 0 => out.push(super::network(addr, len)),
            _ => return Err(c.reject(format!("spec.cidrs[{i}]"), format!("{cidr:?} is not a CIDR"))),
        }
    }
    Ok(out)
}

/// Checks an EndpointSlice. Returns `Ok(None)` for slices the proxy ignores: FQDN ones, and those not owned
/// by a Service (no `kubernetes.io/service-name` label). Every address must be of the slice's
/// `addressType`.
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Option<CheckedSlice>, Rejection> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let c = Checker { kind: "EndpointSlice", object: object_name(Some(&namespace), slice.metadata.name.as_ref()) };
    let name =
        slice.metadata.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| c.reject("metadata.name", "missing"))?;
    let Some(service_name) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned() else {
        return Ok(None);
    };
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None),
        other => return Err(c.reject("addressType", format!("unknown address type {other:?} (IPv4, IPv6 or FQDN)"))),
    };

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A port without a number means "all ports"; only selector-less headless services use it.
        let Some(number) = p.port else { continue };
        ports.push(CheckedSlicePort {
            name: p.name.clone().unwrap_or_default(),
            port: c.port(&format!("ports[{i}].port"), number)?,
            protocol: c.protocol(&format!("ports[{i}].protocol"), p.protocol.as_deref())?,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let mut addresses = Vec::new();
        for (j, a) in ep.addresses.iter().enumerate() {
            let family = &slice.address_type;
            let Some(addr) = sloppy_ip::parse_ip(a).filter(|addr| addr.is_ipv6() == ipv6) else {
                let reason = format!("{a:?} is not an {family} address (addressType {family})");
                return Err(c.reject(format!("endpoints[{i}].addresses[{j}]"), reason));
            };
            addresses.push(addr);
        }
        let cond = ep.conditions.as_ref();
        // The API says an unset `ready` or `serving` is unknown, which consumers should read as true.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(CheckedEndpoint {
            addresses,
            ready,
            serving: cond.and_then(|c| c.serving).unwrap_or(ready),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone(),
            zone_hints: ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect()),
            node_hints: ep
                .hints
                .as_ref()
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect()),
        });
    }
    Ok(Some(CheckedSlice { namespace, name, service_name, ports, endpoints }))
}
