//! Dual-stack Services with real packets: a `RequireDualStack` Service with one EndpointSlice per family,
//! as the API server and the EndpointSlice controller write them, answers over IPv6 and IPv4 through its
//! ClusterIPs, NodePorts and load-balancer IPs, TCP and UDP; each family reaches that family's pods only.
//!
//! Every mode serves both families: the netfilter modes with their ip6 tables, the eBPF mode with its
//! IPv6 programs (TC, tail-called from each hook's program).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Proto, request},
    echo6::{self, Echo6},
    lab::{EXTERNAL_IP6, node_ip6, node_name},
};

const TIMEOUT: Duration = Duration::from_secs(2);
const CLUSTER_IP4: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 60);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x60);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x60);
const NODE_PORT_TCP: u16 = 30660;
const NODE_PORT_UDP: u16 = 30661;

fn slice(name: &str, family: &str, endpoints: &[(IpAddr, String)]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: dual\naddressType: {family}\nports:\n- name: http\n  port: 8080\n  protocol: TCP\n- name: dns\n  port: 8080\n  protocol: UDP\nendpoints:\n"
    );
    for (addr, node) in endpoints {
        let _ = writeln!(y, "- addresses: ['{addr}']\n  nodeName: {node}\n  conditions: {{ready: true}}");
    }
    y
}

fn service() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dual\n  namespace: default\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {CLUSTER_IP4}\n  clusterIPs: [{CLUSTER_IP4}, '{CLUSTER_IP6}']\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n    nodePort: {NODE_PORT_TCP}\n  - name: dns\n    port: 53\n    protocol: UDP\n    targetPort: 8080\n    nodePort: {NODE_PORT_UDP}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: '{LB_IP6}'\n"
    )
}

#[test]
fn a_dual_stack_service_answers_on_both_families() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    assert!(lab.dual_stack(), "this topology has no IPv6 (PROXY_LAB_POD_NETWORK=vxlan)");
    let backends = [lab.pod(1, 2).clone(), lab.pod(2, 1).clone()];
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut echoes = Vec::new();
    for pod in &backends {
        lab.serve(pod, &[8080], &[8080]).unwrap();
        echoes.push(Echo6::start(&pod.ns, &pod.name, 8080).unwrap());
        v4.push((IpAddr::V4(pod.ip), node_name(pod.node)));
        v6.push((IpAddr::V6(pod.ip6.expect("a dual-stack pod")), node_name(pod.node)));
    }
    lab.write_manifest("dual.yaml", &service()).unwrap();
    lab.write_manifest("dual-v4.yaml", &slice("dual-v4", "IPv4", &v4)).unwrap();
    lab.write_manifest("dual-v6.yaml", &slice("dual-v6", "IPv6", &v6)).unwrap();
    lab.route_external6_via(LB_IP6, 1).unwrap();
    lab.start_agents().unwrap();
    let names: Vec<&str> = backends.iter().map(|p| p.name.as_str()).collect();
    let client = lab.pod(1, 1).clone();
    let client6 = client.ip6.unwrap();

    // The IPv4 half, in every mode.
    for proto in [Proto::Tcp, Proto::Udp] {
        let port = if proto == Proto::Tcp { 80 } else { 53 };
        let reply = request(&client.ns, proto, SocketAddrV4::new(CLUSTER_IP4, port), TIMEOUT)
            .unwrap_or_else(|e| panic!("IPv4 ClusterIP {proto:?}: {e:#}"));
        assert!(names.contains(&reply.backend.as_str()), "{reply:?}");
        assert_eq!(*reply.seen_source.ip(), client.ip, "pod traffic keeps its source");
    }

    let cluster_ip6 = |port| SocketAddrV6::new(CLUSTER_IP6, port, 0, 0);

    // Pod to the IPv6 ClusterIP: an IPv6 backend answers and sees the client pod's own address.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..16 {
        let tcp = echo6::tcp(&client.ns, cluster_ip6(80), TIMEOUT).unwrap_or_else(|e| panic!("TCP {i}: {e:#}"));
        assert_eq!(*tcp.seen_source.ip(), client6, "pod traffic keeps its source: {tcp:?}");
        seen.insert(tcp.backend);
        let udp = echo6::udp(&client.ns, cluster_ip6(53), TIMEOUT).unwrap_or_else(|e| panic!("UDP {i}: {e:#}"));
        assert_eq!(*udp.seen_source.ip(), client6, "{udp:?}");
        seen.insert(udp.backend);
    }
    // Both backends of 16 + 16 random picks: all on one has probability 2 × 2^-32.
    assert_eq!(seen.iter().map(String::as_str).collect::<Vec<_>>(), names, "both IPv6 endpoints take flows");

    // From outside to node 1's IPv6 NodePorts and to the IPv6 load-balancer IP (externalTrafficPolicy
    // Cluster: masqueraded to the address of node 1's interface towards the backend — uplink, pod bridge or
    // overlay device — as MASQUERADE takes it, so replies return through node 1 the way the request left).
    let external = lab.external_ns();
    let node1 = node_ip6(1);
    for (proto, target) in [
        ("TCP", SocketAddrV6::new(node1, NODE_PORT_TCP, 0, 0)),
        ("UDP", SocketAddrV6::new(node1, NODE_PORT_UDP, 0, 0)),
        ("TCP", SocketAddrV6::new(LB_IP6, 80, 0, 0)),
        ("UDP", SocketAddrV6::new(LB_IP6, 53, 0, 0)),
    ] {
        let reply = if proto == "TCP" {
            echo6::tcp(&external, target, TIMEOUT)
        } else {
            echo6::udp(&external, target, TIMEOUT)
        }
        .unwrap_or_else(|e| panic!("{proto} {target} from outside: {e:#}"));
        assert!(names.contains(&reply.backend.as_str()), "{reply:?}");
        assert_ne!(*reply.seen_source.ip(), EXTERNAL_IP6, "Cluster policy masquerades: {reply:?}");
        let masqueraded_to = lab.source6_from_node_to(1, &reply.backend);
        assert_eq!(*reply.seen_source.ip(), masqueraded_to, "masqueraded to node 1's outgoing interface: {reply:?}");
    }
    drop(echoes);
}

/// An IPv6-only Service `name` at `fd00:32::LAST`, port 80 → 8080, with more `spec` lines, a NodePort and a
/// `status`.
fn v6_service(name: &str, last: u16, extra_spec: &str, node_port: Option<u16>, status: &str) -> String {
    let cluster_ip = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, last);
    let node_port = node_port.map(|p| format!("    nodePort: {p}\n")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIP: '{cluster_ip}'\n  clusterIPs: ['{cluster_ip}']\n{extra_spec}  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n{node_port}{status}"
    )
}

fn v6_slice(service: &str, pods: &[&proxy_lab::PodRef]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-v6\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv6\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n"
    );
    for pod in pods {
        let _ = writeln!(
            y,
            "- addresses: ['{}']\n  nodeName: {}\n  conditions: {{ready: true}}",
            pod.ip6.unwrap(),
            node_name(pod.node)
        );
    }
    y
}

/// kube-proxy's policies over IPv6 (IPv6-only Services, as an IPv6-only cluster has): externalTrafficPolicy
/// Local keeps the client's address and drops where no endpoint is local; loadBalancerSourceRanges of the
/// family let a client in or drop it; a Service without endpoints is refused (`ICMPv6` port unreachable);
/// session affinity keeps a client on one endpoint; the node itself reaches a ClusterIP.
#[test]
fn ipv6_policies_source_ranges_refusals_and_affinity() {
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    assert!(lab.dual_stack(), "this topology has no IPv6 (PROXY_LAB_POD_NETWORK=vxlan)");
    let (a, b) = (lab.pod(1, 2).clone(), lab.pod(2, 1).clone());
    let echoes = [Echo6::start(&a.ns, &a.name, 8080).unwrap(), Echo6::start(&b.ns, &b.name, 8080).unwrap()];
    let lb = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x62);
    let outsider = Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0x65);
    let local = "  type: NodePort\n  externalTrafficPolicy: Local\n";
    lab.write_manifest("local6.yaml", &v6_service("local6", 0x61, local, Some(30670), "")).unwrap();
    lab.write_manifest("local6-v6.yaml", &v6_slice("local6", &[&b])).unwrap();
    let ranges = format!("  type: LoadBalancer\n  loadBalancerSourceRanges: ['{EXTERNAL_IP6}/128', 192.0.2.0/24]\n");
    let status = format!("status:\n  loadBalancer:\n    ingress:\n    - ip: '{lb}'\n");
    lab.write_manifest("ranges6.yaml", &v6_service("ranges6", 0x62, &ranges, None, &status)).unwrap();
    lab.write_manifest("ranges6-v6.yaml", &v6_slice("ranges6", &[&b])).unwrap();
    lab.write_manifest("empty6.yaml", &v6_service("empty6", 0x63, "", None, "")).unwrap();
    let sticky = "  sessionAffinity: ClientIP\n";
    lab.write_manifest("sticky6.yaml", &v6_service("sticky6", 0x64, sticky, None, "")).unwrap();
    lab.write_manifest("sticky6-v6.yaml", &v6_slice("sticky6", &[&a, &b])).unwrap();
    lab.route_external6_via(lb, 1).unwrap();
    lab.add_external_address6(outsider).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).clone();
    let vip = |last| SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, last), 80, 0, 0);

    let empty = echo6::tcp(&client.ns, vip(0x63), TIMEOUT).expect_err("a Service without endpoints answered");
    assert!(echo6::refused(&empty), "no endpoints: refused at once (ICMPv6 port unreachable), got {empty:#}");

    // externalTrafficPolicy Local: the client's own address on the node with the endpoint; dropped (not
    // refused) on the node without one.
    let external = lab.external_ns();
    let at = |node, port| SocketAddrV6::new(node_ip6(node), port, 0, 0);
    let from_client = |target| echo6::tcp_from(&external, Some(EXTERNAL_IP6), target, TIMEOUT);
    let kept = from_client(at(2, 30670)).unwrap_or_else(|e| panic!("Local policy, node 2: {e:#}"));
    assert_eq!((kept.backend.as_str(), *kept.seen_source.ip()), (b.name.as_str(), EXTERNAL_IP6), "{kept:?}");
    let dropped = from_client(at(1, 30670)).expect_err("node 1 has no local endpoint");
    assert!(!echo6::refused(&dropped), "a Local policy without local endpoints drops: {dropped:#}");

    // loadBalancerSourceRanges: the listed client gets in, another address of the same client is dropped.
    let target = SocketAddrV6::new(lb, 80, 0, 0);
    let inside =
        echo6::tcp_from(&external, Some(EXTERNAL_IP6), target, TIMEOUT).unwrap_or_else(|e| panic!("in range: {e:#}"));
    assert_eq!(inside.backend, b.name);
    let outside = echo6::tcp_from(&external, Some(outsider), target, TIMEOUT).expect_err("outside the source ranges");
    assert!(!echo6::refused(&outside), "outside the ranges: dropped, {outside:#}");

    // Session affinity: one client, one endpoint, from a pod and from a process of the node itself (in the
    // node's namespace and cgroup, where the eBPF mode's socket programs see it).
    let first = echo6::tcp(&client.ns, vip(0x64), TIMEOUT).unwrap_or_else(|e| panic!("pod: {e:#}"));
    for _ in 0..11 {
        let next = echo6::tcp(&client.ns, vip(0x64), TIMEOUT).unwrap();
        assert_eq!(next.backend, first.backend, "affinity keeps the pod on one endpoint");
    }
    let lab_client = std::path::Path::new(env!("CARGO_BIN_EXE_lab-client"));
    let from_node = |proto: &str| {
        let out = lab.run_on_node(1, lab_client, &[proto, &vip(0x64).to_string(), "2000"]).unwrap();
        let line = out.trim().strip_prefix("OK ").unwrap_or_else(|| panic!("node 1, {proto}: {out}")).to_owned();
        line.split_whitespace().next().unwrap_or_default().to_owned()
    };
    let node_first = from_node("tcp");
    assert!([a.name.as_str(), b.name.as_str()].contains(&node_first.as_str()), "{node_first}");
    // 16 connections over 2 endpoints: a broken affinity passes once in 2^15.
    for _ in 0..15 {
        assert_eq!(from_node("tcp"), node_first, "affinity keeps the node on one endpoint");
    }
    drop(echoes);
}

/// kube-proxy's masquerade decisions over IPv6: `masqueradeAll` masquerades pod traffic to a ClusterIP;
/// with a dual-stack `clusterCIDR` pod traffic (from either node) keeps its source and traffic from outside
/// the pods' IPv6 network is masqueraded; a Service whose only endpoint is terminating but serving still
/// takes new connections (kube-proxy's fallback), in the IPv6 table as in the IPv4 one.
#[test]
fn ipv6_masquerade_all_cluster_cidr_detection_and_terminating_fallback() {
    let cases: [(&[&str], bool); 2] =
        [(&["--masquerade-all"], true), (&["--cluster-cidr", "10.200.0.0/16,fd00:200::/32"], false)];
    for (flags, masquerade_all) in cases {
        let mut spec = LabSpec::default();
        spec.agent_args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut lab = Lab::start(spec).expect("lab");
        let backend = lab.pod(1, 2).clone();
        let echo = Echo6::start(&backend.ns, &backend.name, 8080).unwrap();
        lab.write_manifest("web6.yaml", &v6_service("web6", 0x71, "", None, "")).unwrap();
        lab.write_manifest("web6-v6.yaml", &v6_slice("web6", &[&backend])).unwrap();
        // The only endpoint terminating but still serving.
        let draining = v6_slice("draining6", &[&backend])
            .replace("{ready: true}", "{ready: false, serving: true, terminating: true}");
        lab.write_manifest("draining6.yaml", &v6_service("draining6", 0x72, "", None, "")).unwrap();
        lab.write_manifest("draining6-v6.yaml", &draining).unwrap();
        // A static route to the Service range through node 1, which kube-proxy supports (and masquerades).
        ip_route_external6(&lab, "fd00:32::/64", 1);
        lab.start_agents().unwrap();
        let vip = |last| SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, last), 80, 0, 0);
        for client in [lab.pod(1, 1).clone(), lab.pod(2, 1).clone()] {
            let reply = echo6::tcp(&client.ns, vip(0x71), TIMEOUT).unwrap_or_else(|e| panic!("{}: {e:#}", client.name));
            let kept = *reply.seen_source.ip() == client.ip6.unwrap();
            assert_eq!(kept, !masquerade_all, "{flags:?}: {} to the ClusterIP: {reply:?}", client.name);
        }
        if !masquerade_all {
            let reply =
                echo6::tcp(&lab.external_ns(), vip(0x71), TIMEOUT).unwrap_or_else(|e| panic!("external: {e:#}"));
            assert_ne!(*reply.seen_source.ip(), EXTERNAL_IP6, "outside the pods' network: masqueraded, {reply:?}");
        }
        let reply = echo6::tcp(&lab.pod(2, 1).ns, vip(0x72), TIMEOUT).unwrap_or_else(|e| panic!("terminating: {e:#}"));
        assert_eq!(reply.backend, backend.name, "serving-and-terminating endpoints take traffic when none is ready");
        drop(echo);
    }
}

fn ip_route_external6(lab: &Lab, cidr: &str, node: usize) {
    let via = node_ip6(node).to_string();
    proxy_lab::cmd::ip_in(&lab.external_ns(), &["-6", "route", "replace", cidr, "via", &via]).unwrap();
}

/// An IPv6 datagram bigger than the MTU leaves the client as fragments (IPv6 routers never fragment: only
/// the sender does, behind a Fragment extension header), and only the first carries the UDP header.
/// Through an IPv6 ClusterIP it must arrive whole, at a backend on another node and at one on the client's
/// own node: every fragment translated to the same backend. The test first proves the client's kernel
/// fragmented it and the backend's reassembled it.
#[test]
fn an_ipv6_datagram_fragmented_by_the_client_arrives_whole() {
    const BIG: usize = 4000;
    let mut lab = Lab::start(LabSpec::default()).expect("lab");
    assert!(lab.dual_stack(), "this topology has no IPv6 (PROXY_LAB_POD_NETWORK=vxlan)");
    let (remote, local) = (lab.pod(2, 2).clone(), lab.pod(1, 2).clone());
    let echoes =
        [Echo6::start(&remote.ns, &remote.name, 8080).unwrap(), Echo6::start(&local.ns, &local.name, 8080).unwrap()];
    let udp = |yaml: String| yaml.replace("protocol: TCP", "protocol: UDP");
    lab.write_manifest("remote6.yaml", &udp(v6_service("remote6", 0x81, "", None, ""))).unwrap();
    lab.write_manifest("remote6-v6.yaml", &udp(v6_slice("remote6", &[&remote]))).unwrap();
    lab.write_manifest("local6.yaml", &udp(v6_service("local6", 0x82, "", None, ""))).unwrap();
    lab.write_manifest("local6-v6.yaml", &udp(v6_slice("local6", &[&local]))).unwrap();
    lab.start_agents().unwrap();
    let client = lab.pod(1, 1).clone();
    for (last, backend) in [(0x81, &remote), (0x82, &local)] {
        let target = SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, last), 80, 0, 0);
        let sender = proxy_lab::snmp::Snapshot::take(&client.ns).unwrap();
        let receiver = proxy_lab::snmp::Snapshot::take(&backend.ns).unwrap();
        let reply = echo6::udp_sized(&client.ns, target, BIG, TIMEOUT);
        let fragments = sender.rise("Ip6FragCreates").unwrap();
        assert!(fragments >= 3, "{target}: the client's kernel did not fragment ({fragments} fragments)");
        let reply = reply.unwrap_or_else(|e| panic!("{target} → {}: a {BIG}-byte datagram: {e:#}", backend.name));
        assert_eq!(reply.backend, backend.name, "{target}");
        assert_eq!(reply.len, Some(BIG), "{target}: the backend must receive the datagram whole");
        assert!(receiver.rise("Ip6ReasmOKs").unwrap() >= 1, "{target}: the backend reassembled no datagram");
    }
    drop(echoes);
}
