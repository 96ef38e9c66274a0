//! Writing the Kubernetes objects the lab's agents read: the YAML a user would `kubectl apply`.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

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

/// An endpoint of an EndpointSlice: a pod address, its node, and its conditions.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// IPv4 or IPv6; a slice's endpoints are of one family, its `addressType`.
    pub addr: IpAddr,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Topology hint: the zone this endpoint should serve.
    pub zone_hint: Option<&'static str>,
}

impl Endpoint {
    #[must_use]
    pub fn with_zone_hint(mut self, zone: &'static str) -> Self {
        self.zone_hint = Some(zone);
        self
    }

    #[must_use]
    pub fn ready(addr: impl Into<IpAddr>, node: String) -> Self {
        Self { addr: addr.into(), node, ready: true, serving: true, terminating: false, zone_hint: None }
    }

    /// Being deleted but still serving: established flows continue, new ones go elsewhere.
    #[must_use]
    pub fn terminating(addr: impl Into<IpAddr>, node: String) -> Self {
        Self { addr: addr.into(), node, ready: false, serving: true, terminating: true, zone_hint: None }
    }
}

/// The current time as RFC 3339 in UTC (`2026-11-23T14:05:09Z`), without a subprocess: the benchmark
/// writes a hundred thousand slices.
fn utc_now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm), in unsigned arithmetic.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The EndpointSlice of Service `service`, with every port's target port: `addressType` IPv6 if its
/// endpoints are, else IPv4.
#[must_use]
pub fn endpoint_slice(namespace: &str, name: &str, service: &str, ports: &[Port], endpoints: &[Endpoint]) -> String {
    // As the EndpointSlice controller does: when the change that produced this slice happened.
    let now = utc_now_rfc3339();
    let family = if endpoints.first().is_some_and(|e| e.addr.is_ipv6()) { "IPv6" } else { "IPv4" };
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{}\"\naddressType: {family}\nports:\n",
        now.trim()
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
            "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: {}",
            e.addr, e.node, e.ready, e.serving, e.terminating
        );
        if let Some(zone) = e.zone_hint {
            let _ = writeln!(y, "  hints:\n    forZones:\n    - name: {zone}");
        }
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

/// A Service with everything kube-proxy looks at; `yaml()` renders it.
#[derive(Clone, Debug)]
pub struct Svc {
    pub namespace: &'static str,
    pub name: &'static str,
    /// ClusterIP, NodePort or LoadBalancer.
    pub type_: &'static str,
    pub cluster_ip: Ipv4Addr,
    /// A second cluster IP: the Service is `RequireDualStack`.
    pub cluster_ip6: Option<Ipv6Addr>,
    pub ports: Vec<Port>,
    /// `nodePort` of each entry of `ports`, in order; missing entries have none.
    pub node_ports: Vec<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    pub external_ips6: Vec<Ipv6Addr>,
    /// `status.loadBalancer.ingress`: IP and `ipMode` (`VIP` or `Proxy`).
    pub lb_ingress: Vec<(Ipv4Addr, &'static str)>,
    /// IPv6 `status.loadBalancer.ingress` IPs (`ipMode: VIP`).
    pub lb_ingress6: Vec<Ipv6Addr>,
    pub source_ranges: Vec<&'static str>,
    pub external_policy: &'static str,
    pub internal_policy: &'static str,
    pub affinity_timeout: Option<u32>,
    pub health_check_node_port: Option<u16>,
}

impl Svc {
    #[must_use]
    pub fn new(name: &'static str, cluster_ip: Ipv4Addr, ports: Vec<Port>) -> Self {
        Self {
            namespace: "default",
            name,
            type_: "ClusterIP",
            cluster_ip,
            cluster_ip6: None,
            ports,
            node_ports: Vec::new(),
            external_ips: Vec::new(),
            external_ips6: Vec::new(),
            lb_ingress: Vec::new(),
            lb_ingress6: Vec::new(),
            source_ranges: Vec::new(),
            external_policy: "Cluster",
            internal_policy: "Cluster",
            affinity_timeout: None,
            health_check_node_port: None,
        }
    }

    #[must_use]
    pub fn yaml(&self) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  type: {}\n  clusterIP: {}\n  externalTrafficPolicy: {}\n  internalTrafficPolicy: {}\n",
            self.name, self.namespace, self.type_, self.cluster_ip, self.external_policy, self.internal_policy
        );
        if let Some(v6) = self.cluster_ip6 {
            let _ = writeln!(
                y,
                "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [{}, '{v6}']",
                self.cluster_ip
            );
        }
        if let Some(t) = self.affinity_timeout {
            let _ = writeln!(
                y,
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}"
            );
        }
        if let Some(p) = self.health_check_node_port {
            let _ = writeln!(y, "  healthCheckNodePort: {p}");
        }
        if !self.external_ips.is_empty() || !self.external_ips6.is_empty() {
            let v6 = self.external_ips6.iter().map(|ip| format!("'{ip}'"));
            let ips: Vec<String> = self.external_ips.iter().map(ToString::to_string).chain(v6).collect();
            let _ = writeln!(y, "  externalIPs: [{}]", ips.join(", "));
        }
        if !self.source_ranges.is_empty() {
            let _ = writeln!(y, "  loadBalancerSourceRanges: [{}]", self.source_ranges.join(", "));
        }
        y.push_str("  ports:\n");
        for (i, p) in self.ports.iter().enumerate() {
            let _ = writeln!(
                y,
                "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}",
                p.name, p.port, p.protocol, p.target_port
            );
            if let Some(np) = self.node_ports.get(i) {
                let _ = writeln!(y, "    nodePort: {np}");
            }
        }
        if !self.lb_ingress.is_empty() || !self.lb_ingress6.is_empty() {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for (ip, mode) in &self.lb_ingress {
                let _ = writeln!(y, "    - ip: {ip}\n      ipMode: {mode}");
            }
            for ip in &self.lb_ingress6 {
                let _ = writeln!(y, "    - ip: '{ip}'\n      ipMode: VIP");
            }
        }
        y
    }

    /// The Service and one EndpointSlice per family, in one file.
    #[must_use]
    pub fn with_endpoints_of_both_families(&self, v4: &[Endpoint], v6: &[Endpoint]) -> String {
        let slice6 = endpoint_slice(self.namespace, &format!("{}-slice-v6", self.name), self.name, &self.ports, v6);
        // An empty IPv6 slice still says so.
        let slice6 = if v6.is_empty() { slice6.replace("addressType: IPv4", "addressType: IPv6") } else { slice6 };
        format!("{}---\n{slice6}", self.with_endpoints(v4))
    }

    /// The Service and its EndpointSlice, in one file.
    #[must_use]
    pub fn with_endpoints(&self, endpoints: &[Endpoint]) -> String {
        format!(
            "{}---\n{}",
            self.yaml(),
            endpoint_slice(self.namespace, &format!("{}-slice", self.name), self.name, &self.ports, endpoints)
        )
    }
}

/// Node objects, with their InternalIP and a zone label.
#[must_use]
pub fn node(name: &str, internal_ip: Ipv4Addr, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    topology.kubernetes.io/zone: {zone}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {internal_ip}\n"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_timestamp_matches_date() {
        let ours = super::utc_now_rfc3339();
        let date = crate::cmd::run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap();
        // Equal unless a second ticked between the two calls.
        assert_eq!(ours[..16], date.trim()[..16], "{ours} vs {date}");
    }
}
