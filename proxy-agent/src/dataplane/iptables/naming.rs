//! kube-proxy's chain names: `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-`, `KUBE-FW-` and `KUBE-SEP-` followed by the
//! first 16 characters of the base32 SHA-256 of the service port name and protocol (and, for endpoints,
//! the endpoint), so a chain keeps its name across restarts and tools and users recognise it.

use sha2::{Digest as _, Sha256};

use crate::model::{Endpoint, Protocol, ServicePortName};

fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    data_encoding::BASE32.encode(&digest)[..16].to_owned()
}

/// The service port's chain: every usable endpoint.
#[must_use]
pub fn service_chain(name: &ServicePortName, protocol: Protocol) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{name}{}", protocol.lower())))
}

/// The service port's chain of local endpoints only (a Local traffic policy).
#[must_use]
pub fn local_chain(name: &ServicePortName, protocol: Protocol) -> String {
    format!("KUBE-SVL-{}", hash16(&format!("{name}{}", protocol.lower())))
}

/// The chain external traffic enters (NodePorts, external and load-balancer IPs).
#[must_use]
pub fn external_chain(name: &ServicePortName, protocol: Protocol) -> String {
    format!("KUBE-EXT-{}", hash16(&format!("{name}{}", protocol.lower())))
}

/// The firewall chain of a load-balancer IP with source ranges.
#[must_use]
pub fn firewall_chain(name: &ServicePortName, protocol: Protocol) -> String {
    format!("KUBE-FW-{}", hash16(&format!("{name}{}", protocol.lower())))
}

/// One endpoint's chain (its DNAT rule).
#[must_use]
pub fn endpoint_chain(name: &ServicePortName, protocol: Protocol, endpoint: Endpoint) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{name}{}{endpoint}", protocol.lower())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spn(namespace: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName { namespace: namespace.into(), name: name.into(), port: port.into() }
    }

    /// Names as kube-proxy writes them on every cluster: the API server's Service and kube-dns.
    #[test]
    fn chain_names_match_kube_proxys() {
        assert_eq!(service_chain(&spn("default", "kubernetes", "https"), Protocol::Tcp), "KUBE-SVC-NPX46M4PTMTKRN6Y");
        assert_eq!(service_chain(&spn("kube-system", "kube-dns", "dns"), Protocol::Udp), "KUBE-SVC-TCOU7JCQXEZGVUNU");
        assert_eq!(
            service_chain(&spn("kube-system", "kube-dns", "dns-tcp"), Protocol::Tcp),
            "KUBE-SVC-ERIFXISQEP7F7OF4"
        );
        assert_eq!(
            service_chain(&spn("kube-system", "kube-dns", "metrics"), Protocol::Tcp),
            "KUBE-SVC-JD5MR3NA4I4DYORP"
        );
    }

    #[test]
    fn chain_kinds_share_the_hash_and_endpoints_differ() {
        let n = spn("default", "web", "");
        let svc = service_chain(&n, Protocol::Tcp);
        assert_eq!(&local_chain(&n, Protocol::Tcp)[9..], &svc[9..]);
        assert_eq!(&external_chain(&n, Protocol::Tcp)[9..], &svc[9..]);
        assert_eq!(&firewall_chain(&n, Protocol::Tcp)[8..], &svc[9..]);
        let a = Endpoint { addr: "10.200.1.2".parse().unwrap(), port: 8080, local: true };
        let b = Endpoint { addr: "10.200.1.3".parse().unwrap(), port: 8080, local: true };
        assert_ne!(endpoint_chain(&n, Protocol::Tcp, a), endpoint_chain(&n, Protocol::Tcp, b));
        // Chain names must fit iptables' 28-character limit.
        assert!(svc.len() <= 28 && endpoint_chain(&n, Protocol::Tcp, a).len() <= 28);
    }
}
