//! Replacing kube-proxy on a live node, and going back, under sustained traffic with held connections.
//!
//! Node 1 runs kube-proxy's iptables layout (the iptables mode writes exactly kube-proxy's chains), and
//! its agent is replaced by one in eBPF mode; then the other way. New connections from a pod to a
//! ClusterIP and from outside to a NodePort run back to back throughout, and connections opened before
//! the switch are held across it: none may fail, and the held ones keep their backends. The Service is
//! dual-stack and IPv6 connections are held too: each family's flows are handed over in its own tables.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    thread,
    time::{Duration, Instant},
};

use proxy_common::{
    addr::In6,
    conntrack::{CtKey, CtValue, DIR_FORWARD, FLAG_KERNEL_NAT},
    pod::MapAddress,
};
use proxy_lab::{
    Lab, LabSpec,
    cmd::run,
    echo::{TcpSession, UdpSession},
    echo6::{Echo6, Reply6},
    lab::{node_ip, node_ip6, node_name},
    manifests::{Endpoint, Port, Svc},
    traffic::{Bounds, RequestLoops},
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a held connection's answer may take: a segment lost while the dataplanes switch is
/// retransmitted (the first retransmission comes after at least 200 ms, the next after twice that), which
/// keeps the connection; a broken one is reset or stays silent past this.
const HELD_TIMEOUT: Duration = Duration::from_secs(5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 120);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x32, 0, 0, 0, 0, 0, 0x120);
const NODE_PORT: u16 = 30120;

/// A lab whose agents run `mode`, serving one dual-stack NodePort Service with a backend on each node
/// (the IPv6 servers returned).
fn lab_in(mode: &str) -> (Lab, Vec<Echo6>) {
    let spec = LabSpec { agent_args: vec!["--mode".into(), mode.into()], ..LabSpec::default() };
    let mut lab = Lab::start(spec).expect("lab");
    assert!(lab.dual_stack(), "this topology has no IPv6 (PROXY_LAB_POD_NETWORK=vxlan)");
    let mut servers6 = Vec::new();
    for (n, k) in [(1, 2), (2, 2)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[5353]).unwrap();
        servers6.push(Echo6::start(&pod.ns, &pod.name, 8080).unwrap());
    }
    let mut svc = Svc::new(
        "moved",
        VIP,
        vec![
            Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 },
            Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
        ],
    );
    svc.type_ = "NodePort";
    svc.node_ports = vec![NODE_PORT, NODE_PORT + 1];
    svc.cluster_ip6 = Some(VIP6);
    let endpoints =
        vec![Endpoint::ready(lab.pod(1, 2).ip, node_name(1)), Endpoint::ready(lab.pod(2, 2).ip, node_name(2))];
    let endpoints6 = [(1, 2), (2, 2)].map(|(n, k)| Endpoint::ready(lab.pod(n, k).ip6.unwrap(), node_name(n)));
    lab.write_manifest("svc.yaml", &svc.with_endpoints_of_both_families(&endpoints, &endpoints6)).unwrap();
    lab.start_agents().unwrap();
    (lab, servers6)
}

/// Connections held across the switch: four from a pod to the ClusterIP, one from outside to node 1's
/// NodePort, and (when `udp`) a UDP flow from the pod; over IPv6, two from the pod to the IPv6 ClusterIP
/// and one from outside to node 1's IPv6 NodePort.
struct Held {
    tcp: Vec<TcpSession>,
    tcp6: Vec<TcpSession<Reply6>>,
    udp: Option<UdpSession>,
}

/// How many IPv6 connections [`Held`] holds.
const HELD6: usize = 3;

impl Held {
    fn open(lab: &Lab, udp: bool) -> Self {
        let pod_ns = lab.pod(1, 1).ns.clone();
        let mut tcp: Vec<TcpSession> =
            (0..4).map(|_| TcpSession::open(&pod_ns, SocketAddrV4::new(VIP, 80), HELD_TIMEOUT).unwrap()).collect();
        tcp.push(TcpSession::open(&lab.external_ns(), SocketAddrV4::new(node_ip(1), NODE_PORT), HELD_TIMEOUT).unwrap());
        let mut tcp6: Vec<TcpSession<Reply6>> = (0..HELD6 - 1)
            .map(|_| TcpSession::open6(&pod_ns, SocketAddrV6::new(VIP6, 80, 0, 0), HELD_TIMEOUT).unwrap())
            .collect();
        let node_port6 = SocketAddrV6::new(node_ip6(1), NODE_PORT, 0, 0);
        tcp6.push(TcpSession::open6(&lab.external_ns(), node_port6, HELD_TIMEOUT).unwrap());
        let udp = udp.then(|| UdpSession::open(&pod_ns, SocketAddrV4::new(VIP, 53), HELD_TIMEOUT).unwrap());
        Self { tcp, tcp6, udp }
    }

    /// Each held flow's backend now; panics naming the flow that failed.
    fn backends(&self, when: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .tcp
            .iter()
            .enumerate()
            .map(|(i, s)| s.ask().unwrap_or_else(|e| panic!("{when}: held connection {i} failed: {e:#}")).backend)
            .collect();
        out.extend(self.tcp6.iter().enumerate().map(|(i, s)| {
            s.ask().unwrap_or_else(|e| panic!("{when}: held IPv6 connection {i} failed: {e:#}")).backend
        }));
        if let Some(udp) = &self.udp {
            out.push(udp.ask().unwrap_or_else(|e| panic!("{when}: the held UDP flow failed: {e:#}")).backend);
        }
        out
    }
}

/// New connections from a pod to the ClusterIP and from outside to node 1's NodePort, back to back
/// (bounded: 60 s and 30000 requests per client).
fn load(lab: &Lab) -> RequestLoops {
    let clients = [
        (lab.pod(1, 1).ns.clone(), SocketAddrV4::new(VIP, 80)),
        (lab.external_ns(), SocketAddrV4::new(node_ip(1), NODE_PORT)),
    ];
    let bounds = Bounds { at_most: Duration::from_secs(60), requests: 30_000, pause: Duration::ZERO, timeout: TIMEOUT };
    RequestLoops::start(&clients, bounds).unwrap()
}

/// The kernel conntrack entries of node 1 whose original destination is `dst` and whose replies come
/// from elsewhere (netfilter DNATed them): `conntrack -L` lines.
fn kernel_dnat_entries(lab: &Lab, dst: impl Into<IpAddr>) -> Vec<String> {
    let dst: IpAddr = dst.into();
    let family = if dst.is_ipv6() { "ipv6" } else { "ipv4" };
    let (ns, dst_arg) = (lab.node_ns(1), dst.to_string());
    let out = run("ip", &["netns", "exec", &ns, "conntrack", "-L", "-f", family, "-d", &dst_arg]).unwrap();
    out.lines()
        .filter(|l| {
            let srcs: Vec<&str> = l.split_whitespace().filter(|w| w.starts_with("src=")).collect();
            // The reply tuple's source is a backend, not the address the client asked for.
            srcs.len() == 2 && srcs[1] != format!("src={dst}")
        })
        .map(str::to_owned)
        .collect()
}

fn kube_chains(lab: &Lab) -> Vec<String> {
    let out = run("ip", &["netns", "exec", &lab.node_ns(1), "iptables-save"]).unwrap();
    out.lines().filter(|l| l.starts_with(":KUBE-")).map(str::to_owned).collect()
}

/// Node 1's eBPF flow entries of one family's table: (left to the kernel's NAT, translated by the
/// programs), forward entries.
fn ebpf_flows_of<A: MapAddress + Copy>(lab: &Lab, table: &str) -> (usize, usize) {
    let map = lab.pinned_map(1, table).unwrap();
    let map: aya::maps::HashMap<_, CtKey<A>, CtValue<A>> = aya::maps::HashMap::try_from(map).unwrap();
    let forward: Vec<CtValue<A>> =
        map.iter().filter_map(Result::ok).filter(|(k, _)| k.dir == DIR_FORWARD).map(|(_, v)| v).collect();
    let kernel = forward.iter().filter(|v| v.flags & FLAG_KERNEL_NAT != 0).count();
    (kernel, forward.len() - kernel)
}

fn ebpf_flows(lab: &Lab) -> (usize, usize) {
    ebpf_flows_of::<u32>(lab, proxy_common::maps::CONNTRACK)
}

fn ebpf_flows6(lab: &Lab) -> (usize, usize) {
    ebpf_flows_of::<In6>(lab, proxy_common::maps::CONNTRACK6)
}

#[test]
fn the_ebpf_agent_takes_over_from_kube_proxys_iptables_rules_without_a_failed_request() {
    takes_over_from("iptables");
}

/// The same from the nftables mode's table, which goes whole (its NAT chains with it): the agent's own
/// table keeps conntrack and the NAT hooks on for the flows it translated.
#[test]
fn the_ebpf_agent_takes_over_from_an_nftables_table_without_a_failed_request() {
    takes_over_from("nftables");
}

fn nft_tables(lab: &Lab) -> String {
    run("ip", &["netns", "exec", &lab.node_ns(1), "nft", "list", "tables"]).unwrap()
}

fn takes_over_from(mode: &str) {
    let (mut lab, _servers6) = lab_in(mode);
    let held = Held::open(&lab, true);
    let first = held.backends("before");
    // The situation: netfilter translated the held flows, and the mode's rules are in place.
    let dnat = kernel_dnat_entries(&lab, VIP);
    assert!(dnat.len() >= 5, "the held pod flows are DNATed by netfilter: {dnat:#?}");
    let dnat6 = kernel_dnat_entries(&lab, VIP6);
    assert!(dnat6.len() >= HELD6 - 1, "the held IPv6 pod flows are DNATed by netfilter: {dnat6:#?}");
    let rules_in_place = |lab: &Lab| {
        if mode == "iptables" {
            kube_chains(lab).iter().any(|c| c.starts_with(":KUBE-SERVICES"))
        } else {
            nft_tables(lab).lines().any(|l| l == "table ip proxy-agent")
        }
    };
    assert!(rules_in_place(&lab), "{mode}: the rules are in place");

    let traffic = load(&lab);
    thread::sleep(Duration::from_millis(700));
    let before = traffic.answered();
    lab.restart_agent_with(1, &["--mode", "ebpf"]).unwrap();
    let log = lab.agent(1).log();
    assert!(log.contains("took over from the netfilter rules"), "{log}");
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(held.backends("after the switch"), first, "held flows keep their backends");
    let (ok, failed) = traffic.finish();
    eprintln!("{mode}: {ok} requests answered, {failed} failed, {} after the switch began", ok - before);
    assert_eq!(failed, 0, "no request may fail while the eBPF agent takes over:\n{}", lab.agent(1).log());
    assert!(ok > before, "traffic flowed after the switch");

    // The rules are gone; the held flows are the kernel's NAT's, new ones the programs'.
    assert!(!rules_in_place(&lab), "{mode}: the rules are removed");
    assert_eq!(kube_chains(&lab), Vec::<String>::new(), "no KUBE- chains");
    let tables = nft_tables(&lab);
    for family in ["ip", "ip6"] {
        let keeper = format!("table {family} proxy-agent-conntrack");
        assert!(tables.lines().any(|l| l == keeper), "conntrack and NAT are kept on ({keeper}): {tables}");
    }
    let (kernel, translated) = ebpf_flows(&lab);
    assert!(kernel >= 5, "the held flows are left to the kernel's NAT ({kernel} entries)");
    assert!(translated > 0, "new flows are translated by the programs");
    let (kernel6, _) = ebpf_flows6(&lab);
    assert!(kernel6 >= HELD6, "the held IPv6 flows are left to the kernel's NAT ({kernel6} entries)");
    assert_eq!(held.backends("after the rules went"), first, "held flows outlive the rules that made them");
    lab.assert_no_leaks();
}

#[test]
fn an_iptables_agent_drains_the_ebpf_dataplane_without_a_failed_request() {
    let (mut lab, _servers6) = lab_in("ebpf");
    let held = Held::open(&lab, false);
    let first = held.backends("before");
    let (_, translated) = ebpf_flows(&lab);
    assert!(translated >= 5, "the held flows are the programs' ({translated} entries)");
    let (_, translated6) = ebpf_flows6(&lab);
    assert!(translated6 >= HELD6, "the held IPv6 flows are the programs' ({translated6} entries)");

    let traffic = load(&lab);
    thread::sleep(Duration::from_millis(700));
    let before = traffic.answered();
    lab.restart_agent_with(1, &["--mode", "iptables", "--drain-timeout", "60s"]).unwrap();
    lab.agent(1).wait_for_log("draining the eBPF dataplane", 0, Duration::from_secs(10)).unwrap();
    thread::sleep(Duration::from_millis(1000));
    // The held flows keep the programs' translation, so the drain is still on; new flows are netfilter's.
    assert_eq!(held.backends("while draining"), first, "held flows keep their backends");
    assert!(lab.pin_dir(1).exists(), "the programs stay while flows they translated are alive");
    let dnat = kernel_dnat_entries(&lab, VIP);
    assert!(!dnat.is_empty(), "new pod connections are DNATed by netfilter now");
    assert!(kube_chains(&lab).iter().any(|c| c.starts_with(":KUBE-SERVICES")), "kube-proxy's chains are in place");

    // The IPv4 flows end first: the IPv6 ones the programs translated keep the drain on by themselves.
    let Held { tcp, tcp6, udp } = held;
    drop((tcp, udp));
    // Several housekeeping rounds (one a second) that each count the live flows.
    thread::sleep(Duration::from_secs(3));
    assert!(lab.pin_dir(1).exists(), "the programs stay while IPv6 flows they translated are alive");
    let held6 = Held { tcp: Vec::new(), tcp6, udp: None };
    assert_eq!(held6.backends("while draining, IPv4 flows ended"), first[5..], "held IPv6 flows keep their backends");
    drop(held6);
    let ended = Instant::now();
    let deadline = ended + Duration::from_secs(15);
    while lab.pin_dir(1).exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("the drain ended {:?} after the last held flow", ended.elapsed());
    assert!(!lab.pin_dir(1).exists(), "once its flows ended the eBPF dataplane is removed:\n{}", lab.agent(1).log());
    thread::sleep(Duration::from_millis(700));
    let (ok, failed) = traffic.finish();
    eprintln!("{ok} requests answered, {failed} failed, {} after the switch began", ok - before);
    assert_eq!(failed, 0, "no request may fail while the eBPF dataplane drains:\n{}", lab.agent(1).log());
    assert!(ok > before, "traffic flowed after the switch");
    lab.assert_no_leaks();
}
