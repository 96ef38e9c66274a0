//! Turns API objects into checked forms, or a [`Rejection`] that names the object and the field.
//!
//! Both sources use this: the manifest source to refuse a bad edit (keeping the last good version), and the
//! model to skip anything the dataplane cannot honour. Parsing once into typed values means the table
//! builder never meets a bad address or port.

use std::{fmt, net::IpAddr, net::Ipv4Addr};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedService {
    pub namespace: String,
    pub name: String,
    /// IPv4 cluster IPs; empty for headless and ExternalName Services. IPv6 ones are not handled yet.
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<CheckedServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedSlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedEndpoint {
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedSlice {
    pub namespace: String,
    pub name: String,
    pub service_name: String,
    pub ports: Vec<CheckedSlicePort>,
    pub endpoints: Vec<CheckedEndpoint>,
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

    let mut cluster_ips = Vec::new();
    if spec.type_.as_deref() != Some("ExternalName") {
        let parse = |field: String, ip: &str| -> Result<Option<IpAddr>, Rejection> {
            match ip {
                "" | "None" => Ok(None),
                _ => {
                    ip.parse::<IpAddr>().map(Some).map_err(|_| c.reject(field, format!("{ip:?} is not an IP address")))
                }
            }
        };
        let primary = match &spec.cluster_ip {
            Some(ip) => parse("spec.clusterIP".into(), ip)?,
            None => None,
        };
        let listed = spec.cluster_ips.as_deref().unwrap_or_default();
        for (i, ip) in listed.iter().enumerate() {
            if let Some(IpAddr::V4(v4)) = parse(format!("spec.clusterIPs[{i}]"), ip)? {
                cluster_ips.push(v4);
            }
        }
        // The API server keeps clusterIPs[0] equal to clusterIP; a manifest may set either or both.
        match (primary, listed.first()) {
            (Some(p), Some(first)) if first.parse::<IpAddr>().ok() != Some(p) => {
                return Err(c.reject("spec.clusterIP", format!("{p} does not match spec.clusterIPs[0] {first:?}")));
            }
            (Some(IpAddr::V4(v4)), None) => cluster_ips.push(v4),
            _ => {}
        }
    }

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
        ports.push(CheckedServicePort { name: p.name.clone().unwrap_or_default(), port, protocol, target });
    }
    Ok(CheckedService { namespace, name, cluster_ips, ports })
}

/// Checks an EndpointSlice. Returns `Ok(None)` for slices the proxy ignores: not IPv4, or not owned by a
/// Service (no `kubernetes.io/service-name` label).
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Option<CheckedSlice>, Rejection> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let c = Checker { kind: "EndpointSlice", object: object_name(Some(&namespace), slice.metadata.name.as_ref()) };
    let name =
        slice.metadata.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| c.reject("metadata.name", "missing"))?;
    let Some(service_name) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned() else {
        return Ok(None);
    };
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return Ok(None),
        other => return Err(c.reject("addressType", format!("unknown address type {other:?} (IPv4, IPv6 or FQDN)"))),
    }

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
            let addr = a.parse::<Ipv4Addr>().map_err(|_| {
                c.reject(format!("endpoints[{i}].addresses[{j}]"), format!("{a:?} is not an IPv4 address"))
            })?;
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
        });
    }
    Ok(Some(CheckedSlice { namespace, name, service_name, ports, endpoints }))
}
