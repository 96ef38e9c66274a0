//! Chain and set names in the style of kube-proxy's nftables mode: a kind, eight characters of the base32
//! SHA-256 of what the name is for, then that readable name (`service-ABCDEFGH-default/web/tcp/http`), so
//! `nft list table` reads naturally and a name stays the same across restarts.

use sha2::{Digest as _, Sha256};

use crate::model::{Endpoint, Protocol, ServicePortName};

/// nftables' longest object name.
const MAX_NAME: usize = 255;

fn named(kind: &str, base: &str) -> String {
    let digest = Sha256::digest(base.as_bytes());
    let hash = &data_encoding::BASE32.encode(&digest)[..8];
    let mut name = format!("{kind}-{hash}-{base}");
    // The hash keeps a truncated name unique; Kubernetes' name limits keep real names far below this.
    name.truncate(MAX_NAME);
    name
}

/// `namespace/name/protocol/port`, the readable part of a Service port's names.
fn base(name: &ServicePortName, protocol: Protocol) -> String {
    format!("{}/{}/{}/{}", name.namespace, name.name, protocol.lower(), name.port)
}

/// `…__10.180.0.1/80`; an IPv6 address with its colons as dots (`fd00..1`), as kube-proxy spells it: nft
/// names cannot hold colons.
fn endpoint_base(name: &ServicePortName, protocol: Protocol, endpoint: Endpoint) -> String {
    let addr = endpoint.addr.to_string().replace(':', ".");
    format!("{}__{addr}/{}", base(name, protocol), endpoint.port)
}

/// Every usable endpoint of a Service port.
#[must_use]
pub fn service_chain(name: &ServicePortName, protocol: Protocol) -> String {
    named("service", &base(name, protocol))
}

/// The local endpoints only (a Local traffic policy).
#[must_use]
pub fn local_chain(name: &ServicePortName, protocol: Protocol) -> String {
    named("local", &base(name, protocol))
}

/// Where external traffic enters (NodePorts, external and load-balancer IPs).
#[must_use]
pub fn external_chain(name: &ServicePortName, protocol: Protocol) -> String {
    named("external", &base(name, protocol))
}

/// A load-balancer IP's source-range check.
#[must_use]
pub fn firewall_chain(name: &ServicePortName, protocol: Protocol) -> String {
    named("firewall", &base(name, protocol))
}

/// One endpoint's DNAT.
#[must_use]
pub fn endpoint_chain(name: &ServicePortName, protocol: Protocol, endpoint: Endpoint) -> String {
    named("endpoint", &endpoint_base(name, protocol, endpoint))
}

/// The clients session affinity keeps on one endpoint.
#[must_use]
pub fn affinity_set(name: &ServicePortName, protocol: Protocol, endpoint: Endpoint) -> String {
    named("affinity", &endpoint_base(name, protocol, endpoint))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn names_are_readable_stable_and_distinct_per_kind_and_endpoint() {
        let spn = ServicePortName { namespace: "default".into(), name: "web".into(), port: "http".into() };
        let svc = service_chain(&spn, Protocol::Tcp);
        assert!(svc.starts_with("service-") && svc.ends_with("-default/web/tcp/http"), "{svc}");
        assert_eq!(svc.len(), "service-".len() + 8 + "-default/web/tcp/http".len());
        assert_eq!(svc, service_chain(&spn, Protocol::Tcp));
        assert_ne!(svc, service_chain(&spn, Protocol::Udp));
        let a = Endpoint { addr: Ipv4Addr::new(10, 200, 1, 2).into(), port: 8080, local: true };
        let b = Endpoint { addr: Ipv4Addr::new(10, 200, 1, 3).into(), port: 8080, local: true };
        let ep = endpoint_chain(&spn, Protocol::Tcp, a);
        assert!(ep.ends_with("-default/web/tcp/http__10.200.1.2/8080"), "{ep}");
        assert_ne!(ep, endpoint_chain(&spn, Protocol::Tcp, b));
        assert!(affinity_set(&spn, Protocol::Tcp, a).starts_with("affinity-"));
        let v6 = Endpoint { addr: "fd00::a:c8:1:2".parse().unwrap(), port: 8080, local: true };
        assert!(endpoint_chain(&spn, Protocol::Tcp, v6).ends_with("__fd00..a.c8.1.2/8080"));
    }

    #[test]
    fn long_names_are_cut_to_nftables_limit() {
        let spn = ServicePortName { namespace: "n".repeat(63), name: "s".repeat(63), port: "p".repeat(15) };
        let long = ServicePortName { namespace: "x".repeat(200), ..spn };
        assert!(
            endpoint_chain(
                &long,
                Protocol::Sctp,
                Endpoint { addr: Ipv4Addr::BROADCAST.into(), port: 65535, local: false }
            )
            .len()
                <= MAX_NAME
        );
    }
}
