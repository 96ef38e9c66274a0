//! Writing the Kubernetes objects the lab's agents read: the YAML a user would `kubectl apply`.

use std::{fmt::Write as _, net::Ipv4Addr};

/// One port of a Service, with the EndpointSlice port it resolves to.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: &'static str,
    pub port: u16,
    pub protocol: &'static str,
    pub target_port: u16,
}

/// A ClusterIP Service.
#[must_use]
pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, ports: &[Port]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ports:\n"
    );
    for p in ports {
        let _ = writeln!(
            y,
            "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}",
            p.name, p.port, p.protocol, p.target_port
        );
    }
    y
}

/// An endpoint of an EndpointSlice: a pod address, its node, and whether it is ready.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub node: String,
    pub ready: bool,
}

/// The EndpointSlice of Service `service`, with every port's target port.
#[must_use]
pub fn endpoint_slice(namespace: &str, name: &str, service: &str, ports: &[Port], endpoints: &[Endpoint]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for p in ports {
        let _ = writeln!(y, "- name: {}\n  port: {}\n  protocol: {}", p.name, p.target_port, p.protocol);
    }
    y.push_str("endpoints:\n");
    if endpoints.is_empty() {
        y.truncate(y.len() - 1);
        y.push_str(" []\n");
    }
    for e in endpoints {
        let _ = writeln!(
            y,
            "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: false",
            e.addr, e.node, e.ready, e.ready
        );
    }
    y
}

/// A Service and its EndpointSlice in one file, as `kubectl get -o yaml` would print them.
#[must_use]
pub fn service_with_endpoints(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[Port],
    endpoints: &[Endpoint],
) -> String {
    format!(
        "{}---\n{}",
        service(namespace, name, cluster_ip, ports),
        endpoint_slice(namespace, &format!("{name}-slice"), name, ports, endpoints)
    )
}
