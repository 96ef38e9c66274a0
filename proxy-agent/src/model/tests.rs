//! The model, tested without a cluster or a kernel: objects in, table out.

use std::net::IpAddr;
use std::{fmt::Write as _, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::*;
use crate::store::{ClusterState, ObjectKey};

fn svc(yaml: &str) -> Service {
    serde_saphyr::from_str(yaml).expect("test Service parses")
}

fn slice(yaml: &str) -> EndpointSlice {
    serde_saphyr::from_str(yaml).expect("test EndpointSlice parses")
}

fn state(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
    let mut s = ClusterState::default();
    for x in services {
        s.services.insert(ObjectKey::of(&x.metadata), Arc::new(x));
    }
    for x in slices {
        s.endpoint_slices.insert(ObjectKey::of(&x.metadata), Arc::new(x));
    }
    s
}

fn run(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Desired {
    desired(&state(services, slices), &NodeIdentity { name: "node1".into(), ..NodeIdentity::default() })
}

const DNS: &str = r"
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.32.0.10
  clusterIPs: [10.32.0.10]
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
";

const DNS_SLICE: &str = r#"
metadata:
  name: kube-dns-abc
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports:
- {name: dns, port: 5353, protocol: UDP}
- {name: dns-tcp, port: 5354, protocol: TCP}
endpoints:
- addresses: ["10.200.1.10"]
  conditions: {ready: true}
- addresses: ["10.200.2.10"]
"#;

fn fe(ip: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend { addr: Ipv4Addr::from(ip).into(), port, protocol }
}

fn ep(ip: [u8; 4], port: u16) -> Endpoint {
    Endpoint { addr: Ipv4Addr::from(ip).into(), port, local: false }
}

#[test]
fn each_port_resolves_through_the_slice_port_of_the_same_name_and_protocol() {
    let d = run(vec![svc(DNS)], vec![slice(DNS_SLICE)]);
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    assert_eq!(d.table.frontends.len(), 2);
    let udp = &d.table.frontends[&fe([10, 32, 0, 10], 53, Protocol::Udp)];
    assert_eq!(udp.service.to_string(), "kube-system/kube-dns:dns");
    assert_eq!(udp.internal.endpoints, vec![ep([10, 200, 1, 10], 5353), ep([10, 200, 2, 10], 5353)]);
    let tcp = &d.table.frontends[&fe([10, 32, 0, 10], 53, Protocol::Tcp)];
    assert_eq!(tcp.internal.endpoints, vec![ep([10, 200, 1, 10], 5354), ep([10, 200, 2, 10], 5354)]);
}

#[test]
fn a_service_without_slices_has_a_frontend_with_no_backends() {
    let d = run(vec![svc(DNS)], vec![]);
    assert_eq!(d.table.frontends.len(), 2);
    assert!(d.table.frontends.values().all(|e| e.internal.endpoints.is_empty()));
}

#[test]
fn slices_of_other_services_and_namespaces_are_not_used() {
    let other_ns = DNS_SLICE.replace("namespace: kube-system", "namespace: default");
    let other_svc = DNS_SLICE.replace("service-name: kube-dns", "service-name: other").replace("kube-dns-abc", "x");
    let d = run(vec![svc(DNS)], vec![slice(&other_ns), slice(&other_svc)]);
    assert!(d.table.frontends.values().all(|e| e.internal.endpoints.is_empty()));
}

#[test]
fn backends_from_several_slices_are_merged_without_duplicates() {
    let second = DNS_SLICE.replace("kube-dns-abc", "kube-dns-def").replace("10.200.1.10", "10.200.3.10");
    let d = run(vec![svc(DNS)], vec![slice(DNS_SLICE), slice(&second)]);
    let udp = &d.table.frontends[&fe([10, 32, 0, 10], 53, Protocol::Udp)];
    assert_eq!(
        udp.internal.endpoints,
        vec![ep([10, 200, 1, 10], 5353), ep([10, 200, 2, 10], 5353), ep([10, 200, 3, 10], 5353)]
    );
}

fn conditions_slice(endpoints: &[(&str, &str)]) -> EndpointSlice {
    let mut y = String::from(
        "metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n",
    );
    for (addr, conditions) in endpoints {
        let _ = writeln!(y, "- addresses: [\"{addr}\"]\n  conditions: {conditions}");
    }
    slice(&y)
}

const WEB: &str = "metadata: {name: web, namespace: default}\nspec: {clusterIP: 10.32.0.20, ports: [{name: http, port: 80, targetPort: http}]}";

fn web_backends(endpoints: &[(&str, &str)]) -> Vec<Endpoint> {
    let d = run(vec![svc(WEB)], vec![conditions_slice(endpoints)]);
    d.table.frontends[&fe([10, 32, 0, 20], 80, Protocol::Tcp)].internal.endpoints.clone()
}

#[test]
fn ready_endpoints_are_used_and_terminating_ones_are_not_while_any_is_ready() {
    let got = web_backends(&[
        ("10.200.1.1", "{ready: true, serving: true, terminating: false}"),
        ("10.200.1.2", "{ready: false, serving: true, terminating: true}"),
        ("10.200.1.3", "{ready: false, serving: false, terminating: false}"),
    ]);
    assert_eq!(got, vec![ep([10, 200, 1, 1], 8080)]);
}

#[test]
fn serving_terminating_endpoints_are_used_when_none_is_ready() {
    let got = web_backends(&[
        ("10.200.1.2", "{ready: false, serving: true, terminating: true}"),
        ("10.200.1.3", "{ready: false, serving: false, terminating: true}"),
        ("10.200.1.4", "{ready: false, serving: false, terminating: false}"),
    ]);
    assert_eq!(got, vec![ep([10, 200, 1, 2], 8080)]);
}

#[test]
fn unset_conditions_mean_ready_as_the_api_documents() {
    assert_eq!(web_backends(&[("10.200.1.5", "{}")]), vec![ep([10, 200, 1, 5], 8080)]);
}

#[test]
fn headless_and_external_name_services_have_no_frontends() {
    let headless = svc("metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}");
    let external = svc("metadata: {name: e}\nspec: {type: ExternalName, externalName: example.org}");
    let d = run(vec![headless, external], vec![]);
    assert!(d.table.frontends.is_empty() && d.rejected.is_empty(), "{d:?}");
}

/// A `RequireDualStack` Service as the API server writes it, with one EndpointSlice per family: each
/// family's frontends (ClusterIP, NodePort on the node's address of that family, load-balancer IP) use that
/// family's endpoints only, and the load-balancer source ranges of that family only, as kube-proxy's one
/// proxier per family does.
#[test]
fn a_dual_stack_service_has_frontends_of_both_families_each_with_its_own_endpoints() {
    let dual = svc(
        "metadata: {name: d}\nspec: {type: LoadBalancer, ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv4, IPv6], clusterIP: 10.32.0.7, clusterIPs: [10.32.0.7, 'fd00:32::7'], loadBalancerSourceRanges: [192.0.2.0/24], ports: [{port: 80, nodePort: 30007}]}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.7}, {ip: '2001:db8::7'}]}}",
    );
    let v4 = "metadata: {name: d-v4, labels: {kubernetes.io/service-name: d}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.200.1.5], nodeName: n}]";
    let v6 = "metadata: {name: d-v6, labels: {kubernetes.io/service-name: d}}\naddressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: ['fd00:200:1::5'], nodeName: n}]";
    let node = NodeIdentity {
        name: "n".into(),
        addresses: vec!["10.240.0.11".parse().unwrap(), "fd00:240::11".parse().unwrap()],
        ..NodeIdentity::default()
    };
    let d = desired(&state(vec![dual], vec![slice(v4), slice(v6)]), &node);
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    let got: Vec<(String, FrontendKind, Vec<String>, usize)> = d
        .table
        .frontends
        .iter()
        .map(|(f, e)| {
            let endpoints = e.internal.endpoints.iter().map(ToString::to_string).collect();
            (f.to_string(), e.kind, endpoints, e.source_ranges.len())
        })
        .collect();
    let v4_ep = vec!["10.200.1.5:8080".to_owned()];
    let v6_ep = vec!["[fd00:200:1::5]:8080".to_owned()];
    assert_eq!(
        got,
        [
            ("10.32.0.7:80/TCP".to_owned(), FrontendKind::ClusterIp, v4_ep.clone(), 0),
            ("10.240.0.11:30007/TCP".to_owned(), FrontendKind::NodePort, v4_ep.clone(), 0),
            ("203.0.113.7:80/TCP".to_owned(), FrontendKind::LoadBalancer, v4_ep, 1),
            ("[2001:db8::7]:80/TCP".to_owned(), FrontendKind::LoadBalancer, v6_ep.clone(), 0),
            ("[fd00:32::7]:80/TCP".to_owned(), FrontendKind::ClusterIp, v6_ep.clone(), 0),
            ("[fd00:240::11]:30007/TCP".to_owned(), FrontendKind::NodePort, v6_ep, 0),
        ]
    );
}

#[test]
fn an_address_of_the_other_family_or_a_second_cluster_ip_of_one_family_is_rejected_naming_the_field() {
    let wrong = "metadata: {name: w-v6, labels: {kubernetes.io/service-name: w}}\naddressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: ['fd00::5', 10.200.1.5]}]";
    let d = run(
        vec![svc("metadata: {name: w}\nspec: {clusterIPs: ['fd00:32::9'], ports: [{port: 80}]}")],
        vec![slice(wrong)],
    );
    assert_eq!(d.rejected.len(), 1, "{:?}", d.rejected);
    assert_eq!((d.rejected[0].kind, d.rejected[0].field.as_str()), ("EndpointSlice", "endpoints[0].addresses[1]"));
    assert!(d.rejected[0].reason.contains("not an IPv6 address"), "{}", d.rejected[0]);
    for (spec, field) in [
        ("{clusterIPs: [10.32.0.8, 10.32.0.9], ports: [{port: 80}]}", "spec.clusterIPs[1]"),
        ("{clusterIPs: [10.32.0.8], ipFamilies: [IPv6], ports: [{port: 80}]}", "spec.clusterIPs[0]"),
        (
            "{clusterIPs: [10.32.0.8, 'fd00:32::8'], ipFamilyPolicy: SingleStack, ports: [{port: 80}]}",
            "spec.ipFamilyPolicy",
        ),
        ("{clusterIPs: [10.32.0.8], ipFamilies: [IPv5], ports: [{port: 80}]}", "spec.ipFamilies[0]"),
    ] {
        let d = run(vec![svc(&format!("metadata: {{name: x}}\nspec: {spec}"))], vec![]);
        assert_eq!(d.rejected.iter().map(|r| r.field.as_str()).collect::<Vec<_>>(), [field], "{spec}");
        assert!(d.table.frontends.is_empty(), "a rejected Service programs nothing: {spec}");
    }
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_first_service_and_the_second_is_rejected() {
    let a = svc("metadata: {name: a}\nspec: {clusterIP: 10.32.0.9, ports: [{port: 80}]}");
    let b = svc("metadata: {name: b}\nspec: {clusterIP: 10.32.0.9, ports: [{port: 80}]}");
    let d = run(vec![b, a], vec![]);
    assert_eq!(d.table.frontends[&fe([10, 32, 0, 9], 80, Protocol::Tcp)].service.name, "a");
    assert_eq!(d.rejected.len(), 1);
    assert_eq!(d.rejected[0].object, "default/b");
}

fn rejection_of_service(yaml: &str) -> Rejection {
    let d = run(vec![svc(yaml)], vec![]);
    assert!(d.table.frontends.is_empty(), "a rejected Service must not be programmed");
    assert_eq!(d.rejected.len(), 1, "{d:?}");
    d.rejected[0].clone()
}

#[test]
fn bad_services_are_rejected_naming_object_and_field() {
    let cases = [
        ("spec: {clusterIP: 10.32.0.300, ports: [{port: 80}]}", "spec.clusterIP", "is not an IP address"),
        (
            "spec: {clusterIP: 10.32.0.3, clusterIPs: [10.32.0.4], ports: [{port: 80}]}",
            "spec.clusterIP",
            "does not match",
        ),
        ("spec: {clusterIPs: [bogus], ports: [{port: 80}]}", "spec.clusterIPs[0]", "is not an IP address"),
        ("spec: {clusterIP: 10.32.0.3, ports: [{port: 0}]}", "spec.ports[0].port", "not a port number"),
        ("spec: {clusterIP: 10.32.0.3, ports: [{port: 80}, {port: 65536}]}", "spec.ports[1].port", "not a port number"),
        (
            "spec: {clusterIP: 10.32.0.3, ports: [{port: 80, protocol: QUIC}]}",
            "spec.ports[0].protocol",
            "unknown protocol",
        ),
        (
            "spec: {clusterIP: 10.32.0.3, ports: [{port: 80, targetPort: 0}]}",
            "spec.ports[0].targetPort",
            "not a port number",
        ),
        (
            "spec: {clusterIP: 10.32.0.3, ports: [{port: 80, targetPort: '70000'}]}",
            "spec.ports[0].targetPort",
            "not a port",
        ),
    ];
    for (spec, field, reason) in cases {
        let r = rejection_of_service(&format!("metadata: {{name: bad, namespace: prod}}\n{spec}"));
        assert_eq!((r.kind, r.object.as_str(), r.field.as_str()), ("Service", "prod/bad", field), "{spec}");
        assert!(r.reason.contains(reason), "{spec}: {}", r.reason);
        assert!(r.to_string().starts_with("Service prod/bad: "), "{r}");
    }
}

#[test]
fn bad_endpoint_slices_are_rejected_and_their_service_keeps_other_slices() {
    let bad = DNS_SLICE.replace("kube-dns-abc", "kube-dns-bad").replace("10.200.2.10", "10.200.2.999");
    let d = run(vec![svc(DNS)], vec![slice(DNS_SLICE.replace("10.200.2.10", "10.200.3.3").as_str()), slice(&bad)]);
    assert_eq!(d.rejected.len(), 1);
    assert_eq!(d.rejected[0].field, "endpoints[1].addresses[0]");
    assert_eq!(d.rejected[0].object, "kube-system/kube-dns-bad");
    let udp = &d.table.frontends[&fe([10, 32, 0, 10], 53, Protocol::Udp)];
    assert_eq!(udp.internal.endpoints, vec![ep([10, 200, 1, 10], 5353), ep([10, 200, 3, 3], 5353)]);

    let bad_port = DNS_SLICE.replace("port: 5353", "port: 0");
    let d = run(vec![svc(DNS)], vec![slice(&bad_port)]);
    assert_eq!(d.rejected[0].field, "ports[0].port");
    let bad_proto = DNS_SLICE.replace("protocol: UDP", "protocol: ICMP");
    let d = run(vec![svc(DNS)], vec![slice(&bad_proto)]);
    assert_eq!(d.rejected[0].field, "ports[0].protocol");
}

#[test]
fn ipv6_slices_do_not_feed_an_ipv4_service_and_fqdn_and_unowned_slices_are_ignored() {
    let v6 = DNS_SLICE.replace("addressType: IPv4", "addressType: IPv6").replace("10.200.1.10", "fd00::1");
    let unowned = DNS_SLICE.replace("labels: {kubernetes.io/service-name: kube-dns}", "labels: {}");
    let d = run(vec![svc(DNS)], vec![slice(&v6), slice(&unowned)]);
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    assert!(d.table.frontends.values().all(|e| e.internal.endpoints.is_empty()));
}

#[test]
fn the_model_is_deterministic() {
    let input = state(vec![svc(DNS), svc(WEB)], vec![slice(DNS_SLICE)]);
    let node = NodeIdentity { name: "n".into(), ..NodeIdentity::default() };
    assert_eq!(desired(&input, &node), desired(&input.clone(), &node));
}

#[test]
fn sctp_with_port_translation_is_rejected_and_without_it_is_programmed() {
    let svc_yaml =
        "metadata: {name: sig}\nspec: {clusterIP: 10.32.0.30, ports: [{name: s, port: 2905, protocol: SCTP}]}";
    let slice_yaml = |port: u16| {
        format!(
            "metadata: {{name: sig-1, labels: {{kubernetes.io/service-name: sig}}}}\naddressType: IPv4\nports: [{{name: s, port: {port}, protocol: SCTP}}]\nendpoints: [{{addresses: [10.200.1.9]}}]"
        )
    };
    let d = run(vec![svc(svc_yaml)], vec![slice(&slice_yaml(2905))]);
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    assert_eq!(
        d.table.frontends[&fe([10, 32, 0, 30], 2905, Protocol::Sctp)].internal.endpoints,
        vec![ep([10, 200, 1, 9], 2905)]
    );
    let d = run(vec![svc(svc_yaml)], vec![slice(&slice_yaml(3868))]);
    assert!(d.table.frontends.is_empty());
    assert_eq!(d.rejected[0].field, "spec.ports[0].targetPort");
}

#[test]
fn node_ports_follow_node_port_addresses() {
    let np = svc(
        "metadata: {name: np}\nspec: {type: NodePort, clusterIP: 10.32.0.40, ports: [{port: 80, nodePort: 30080}]}",
    );
    let mut state = state(vec![np], vec![]);
    let node = |addrs: NodePortAddresses| NodeIdentity {
        name: "node1".into(),
        addresses: vec![Ipv4Addr::new(10, 240, 0, 11).into(), Ipv4Addr::new(192, 168, 9, 1).into()],
        node_port_addresses: addrs,
        service_cidrs: Vec::new(),
    };
    let node_ports = |n: &NodeIdentity, s: &ClusterState| -> Vec<IpAddr> {
        desired(s, n)
            .table
            .frontends
            .iter()
            .filter(|(_, e)| e.kind == FrontendKind::NodePort)
            .map(|(f, _)| f.addr)
            .collect()
    };
    assert_eq!(node_ports(&node(NodePortAddresses::All), &state).len(), 2);
    assert_eq!(
        node_ports(&node(NodePortAddresses::Cidrs(vec![(Ipv4Addr::new(192, 168, 0, 0).into(), 16)])), &state),
        vec![Ipv4Addr::new(192, 168, 9, 1)]
    );
    let node_obj: k8s_openapi::api::core::v1::Node = serde_saphyr::from_str(
        "metadata: {name: node1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.9.1}]}",
    )
    .unwrap();
    state.nodes.insert("node1".into(), Arc::new(node_obj));
    assert_eq!(node_ports(&node(NodePortAddresses::Primary), &state), vec![Ipv4Addr::new(192, 168, 9, 1)]);
}

/// kube-proxy runs one proxier per family, and each serves only the Services with a cluster IP of its
/// family: on a dual-stack node an IPv4-only Service has no NodePort on the IPv6 addresses and its IPv6
/// external IP is ignored; `nodePortAddresses` CIDRs of one family leave the other family on every address.
#[test]
fn families_follow_the_services_cluster_ips_and_node_port_addresses_per_family() {
    let np = svc(
        "metadata: {name: np}\nspec: {type: NodePort, clusterIP: 10.32.0.40, externalIPs: ['fd00:250::40'], ports: [{port: 80, nodePort: 30080}]}",
    );
    let dual = svc(
        "metadata: {name: dual}\nspec: {type: NodePort, clusterIPs: [10.32.0.41, 'fd00:32::41'], ports: [{port: 81, nodePort: 30081}]}",
    );
    let state = state(vec![np, dual], vec![]);
    let node = |addrs: NodePortAddresses| NodeIdentity {
        name: "node1".into(),
        addresses: vec![
            "10.240.0.11".parse().unwrap(),
            "192.168.9.1".parse().unwrap(),
            "fd00:240::11".parse().unwrap(),
            "fd00:9::1".parse().unwrap(),
        ],
        node_port_addresses: addrs,
        service_cidrs: Vec::new(),
    };
    let frontends = |n: &NodeIdentity| -> Vec<String> {
        desired(&state, n)
            .table
            .frontends
            .keys()
            .filter(|f| f.port >= 30000 || f.addr.is_ipv6())
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        frontends(&node(NodePortAddresses::All)),
        [
            "10.240.0.11:30080/TCP",
            "10.240.0.11:30081/TCP",
            "192.168.9.1:30080/TCP",
            "192.168.9.1:30081/TCP",
            "[fd00:9::1]:30081/TCP",
            "[fd00:32::41]:81/TCP",
            "[fd00:240::11]:30081/TCP",
        ]
    );
    let v6_only: IpAddr = "fd00:240::".parse().unwrap();
    assert_eq!(
        frontends(&node(NodePortAddresses::Cidrs(vec![(v6_only, 64)]))),
        [
            "10.240.0.11:30080/TCP",
            "10.240.0.11:30081/TCP",
            "192.168.9.1:30080/TCP",
            "192.168.9.1:30081/TCP",
            "[fd00:32::41]:81/TCP",
            "[fd00:240::11]:30081/TCP",
        ],
        "IPv6 CIDRs narrow IPv6 only"
    );
}

#[test]
fn load_balancer_ingress_with_ip_mode_proxy_gets_no_frontend() {
    let lb = svc(
        "metadata: {name: lb}\nspec: {type: LoadBalancer, clusterIP: 10.32.0.41, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.5, ipMode: VIP}, {ip: 203.0.113.6, ipMode: Proxy}]}}",
    );
    let d = run(vec![lb], vec![]);
    let lbs: Vec<IpAddr> =
        d.table.frontends.iter().filter(|(_, e)| e.kind == FrontendKind::LoadBalancer).map(|(f, _)| f.addr).collect();
    assert_eq!(lbs, vec![IpAddr::from(Ipv4Addr::new(203, 0, 113, 5))]);
}

#[test]
fn traffic_policies_shape_the_external_and_internal_sets() {
    let y = "metadata: {name: p}\nspec: {type: NodePort, clusterIP: 10.32.0.42, externalTrafficPolicy: Local, internalTrafficPolicy: Local, ports: [{name: h, port: 80, nodePort: 30042}]}";
    let sl = "metadata: {name: p-1, labels: {kubernetes.io/service-name: p}}\naddressType: IPv4\nports: [{name: h, port: 8080}]\nendpoints: [{addresses: [10.200.1.5], nodeName: node1}, {addresses: [10.200.2.5], nodeName: node2}]";
    let n = NodeIdentity {
        name: "node1".into(),
        addresses: vec![Ipv4Addr::new(10, 240, 0, 11).into()],
        ..NodeIdentity::default()
    };
    let d = desired(&state(vec![svc(y)], vec![slice(sl)]), &n);
    let local = Endpoint { addr: Ipv4Addr::new(10, 200, 1, 5).into(), port: 8080, local: true };
    let remote = Endpoint { addr: Ipv4Addr::new(10, 200, 2, 5).into(), port: 8080, local: false };
    let cluster_ip = &d.table.frontends[&fe([10, 32, 0, 42], 80, Protocol::Tcp)];
    assert_eq!(cluster_ip.internal.endpoints, vec![local], "iTP Local: pods use local endpoints");
    assert_eq!(cluster_ip.external.endpoints, vec![local], "iTP applies to all ClusterIP traffic, as kube-proxy's");
    assert!(cluster_ip.masquerade_external);
    let node_port = &d.table.frontends[&fe([10, 240, 0, 11], 30042, Protocol::Tcp)];
    assert_eq!(node_port.external.endpoints, vec![local], "eTP Local: external traffic uses local endpoints");
    assert_eq!(node_port.internal.endpoints, vec![local, remote], "pods reach every endpoint");
    assert!(!node_port.masquerade_external, "eTP Local keeps the client's address");
}

#[test]
fn reject_when_empty_only_when_no_endpoint_exists_anywhere() {
    let y = "metadata: {name: q}\nspec: {clusterIP: 10.32.0.43, internalTrafficPolicy: Local, ports: [{name: h, port: 80}]}";
    let remote_only = "metadata: {name: q-1, labels: {kubernetes.io/service-name: q}}\naddressType: IPv4\nports: [{name: h, port: 8080}]\nendpoints: [{addresses: [10.200.2.5], nodeName: node2}]";
    let n = NodeIdentity { name: "node1".into(), ..NodeIdentity::default() };
    let d = desired(&state(vec![svc(y)], vec![slice(remote_only)]), &n);
    let e = &d.table.frontends[&fe([10, 32, 0, 43], 80, Protocol::Tcp)];
    assert!(e.internal.endpoints.is_empty() && !e.internal.reject_when_empty, "filtered by policy: drop");
    let d = desired(&state(vec![svc(y)], vec![]), &n);
    let e = &d.table.frontends[&fe([10, 32, 0, 43], 80, Protocol::Tcp)];
    assert!(e.internal.reject_when_empty && e.external.reject_when_empty, "no endpoints at all: reject");
}

#[test]
fn health_checks_are_served_for_local_policy_services_with_their_local_count() {
    let y = "metadata: {name: h, namespace: web}\nspec: {type: LoadBalancer, clusterIP: 10.32.0.44, externalTrafficPolicy: Local, healthCheckNodePort: 32100, ports: [{name: h, port: 80, nodePort: 30044}]}";
    let sl = "metadata: {name: h-1, namespace: web, labels: {kubernetes.io/service-name: h}}\naddressType: IPv4\nports: [{name: h, port: 8080}]\nendpoints: [{addresses: [10.200.1.5], nodeName: node1}, {addresses: [10.200.2.5], nodeName: node2}]";
    let n = NodeIdentity { name: "node1".into(), ..NodeIdentity::default() };
    let d = desired(&state(vec![svc(y)], vec![slice(sl)]), &n);
    assert_eq!(d.health_checks[&32100], HealthCheck { service: "web/h".into(), local_endpoints: 1 });
}

/// `proxy-agent.io/lb-algorithm`: `maglev` and `random` reach every frontend of the Service; anything else
/// rejects the Service naming the annotation and the value.
#[test]
fn the_lb_algorithm_annotation_is_read_and_checked() {
    use crate::model::{LbAlgorithm, validate};
    let with = |value: &str| {
        svc(&format!(
            "metadata: {{name: m, annotations: {{proxy-agent.io/lb-algorithm: {value}}}}}\nspec: {{clusterIP: 10.32.0.50, ports: [{{port: 80}}]}}"
        ))
    };
    assert_eq!(validate::service(&with("maglev")).unwrap().lb_algorithm, Some(LbAlgorithm::Maglev));
    assert_eq!(validate::service(&with("random")).unwrap().lb_algorithm, Some(LbAlgorithm::Random));
    let plain = svc("metadata: {name: m}\nspec: {clusterIP: 10.32.0.50, ports: [{port: 80}]}");
    assert_eq!(validate::service(&plain).unwrap().lb_algorithm, None);
    let err = validate::service(&with("fastest")).unwrap_err();
    assert_eq!(err.field, "metadata.annotations[proxy-agent.io/lb-algorithm]");
    assert!(err.reason.contains("\"fastest\""), "{err}");
}

/// The table's service CIDRs: the configured ones joined by every `ServiceCIDR`'s IPv4 ranges (host bits
/// cleared, the IPv6 one of a pair skipped), sorted, once each; a range that does not parse rejects its
/// object by name and field and leaves the others.
#[test]
fn service_cidrs_join_the_flag_and_every_service_cidr_object() {
    let mut state = ClusterState::default();
    for (name, cidrs) in [
        ("kubernetes", "[10.32.0.0/16, 'fd00:10:96::/112']"),
        ("extra", "[10.33.0.7/24]"),
        ("broken", "[10.34.0.0/99]"),
    ] {
        let obj = serde_saphyr::from_str(&format!("metadata: {{name: {name}}}\nspec: {{cidrs: {cidrs}}}")).unwrap();
        state.service_cidrs.insert(name.into(), Arc::new(obj));
    }
    let node = NodeIdentity {
        name: "node1".into(),
        service_cidrs: vec![(Ipv4Addr::new(10, 32, 0, 0).into(), 16)],
        ..NodeIdentity::default()
    };
    let d = desired(&state, &node);
    let v6: IpAddr = "fd00:10:96::".parse().unwrap();
    assert_eq!(
        d.table.service_cidrs,
        vec![(Ipv4Addr::new(10, 32, 0, 0).into(), 16), (Ipv4Addr::new(10, 33, 0, 0).into(), 24), (v6, 112)]
    );
    assert_eq!(d.rejected.len(), 1, "{:?}", d.rejected);
    let r = &d.rejected[0];
    assert_eq!((r.kind, r.object.as_str(), r.field.as_str()), ("ServiceCIDR", "broken", "spec.cidrs[0]"));
}
