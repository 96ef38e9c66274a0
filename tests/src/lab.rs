//! Building and tearing down the namespace cluster.
//!
//! ```text
//!   pod ns (10.200.N.X/32) ── veth ── node ns N (eth0 10.240.0.1N) ── veth ── underlay ns (bridge br0)
//!                                                                              │
//!                                                        external ns (10.240.0.100) ── veth ──┘
//! ```
//! Each node routes every other node's pod CIDR (10.200.N.0/24) via that node, and runs with strict
//! `rp_filter`, as most distributions ship. How pods hang off their node is the [`PodNetwork`]:
//! - routed (Calico, Cilium, AWS VPC CNI, Azure, GKE, kindnet/`ptp`): each pod has a /32 and a default
//!   route to 169.254.1.1, which its node answers ARP for (the node holds that address on lo);
//! - bridged (flannel, the reference `bridge` plugin): pods share the node's /24 on bridge `cni0`, which
//!   holds their gateway; traffic between two pods of a node is bridged, never routed.
//!
//! The routed and bridged labs are dual-stack, with unique-local addresses that exist only inside the lab:
//! nodes at `fd00:240::1N/64` ([`node_ip6`]), the external client at `fd00:240::64`, pods at
//! `fd00:200:N::K/128` behind a link-local gateway `fe80::1` (routed) or `fd00:200:N::(10+K)/64` on the
//! bridge at `fd00:200:N::1` (bridged), each node's pod prefix `fd00:200:N::/64` routed via that node. The
//! VXLAN lab is dual-stack too: its overlay device carries both families (IPv4 underlay), holding
//! `fd00:200:N::f1` ([`overlay_ip6`]) beside `10.200.N.0`, and the other nodes' pod prefixes of both
//! families go through it, as flannel's dual-stack `vxlan` backend routes them.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    agent::{Agent, AgentConfig},
    bulk::BulkServer,
    cmd::{ip, ip_in, run, sysctl_in},
    daemon::Daemon,
    echo::{EchoServer, Outcome, Proto},
};

/// Interface name prefix of the host end of pod veths in the default lab; the agents are told it.
pub const POD_IFACE_PREFIX: &str = "vp";
/// The pods' bridge in a [`PodNetwork::Bridge`] lab, named as flannel and the `bridge` plugin name it.
pub const POD_BRIDGE: &str = "cni0";
/// The address pods use as their gateway; every node answers ARP for it.
const POD_GATEWAY: &str = "169.254.1.1";
/// Prefix of every namespace a lab creates; followed by the creating process's pid.
const NS_PREFIX: &str = "kpl";

#[derive(Clone, Debug)]
pub struct LabSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Whether pods leave L4 checksums to the (virtual) device. Both ways must work.
    pub tx_checksum_offload: bool,
    /// Extra flags for every agent.
    pub agent_args: Vec<String>,
    /// Run the agents with only these capabilities (`setpriv` names: `net_admin`, `bpf`, …) instead of all
    /// of root's.
    pub agent_capabilities: Option<Vec<String>>,
    /// Start the agents from this binary instead of the build under test (upgrade tests).
    pub agent_binary: Option<PathBuf>,
    pub pod_network: PodNetwork,
}

/// How pods are wired to their node: the two topologies pod networks build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// Each pod a /32 behind a veth whose host end is named `{name}{k}`, taking `names` in turn across a
    /// node's pods (`cali`, `lxc`, `eni`, …). Only the lab's own [`POD_IFACE_PREFIX`] is given to the agents
    /// (`--pod-interfaces`); any other name must be matched by the agent's defaults.
    Routed { names: Vec<&'static str> },
    /// Bridge [`POD_BRIDGE`] holding 10.200.N.1/24, the pods' gateway; pods at 10.200.N.(10+k)/24 on veth
    /// ports named as the `bridge` plugin names them (`veth` and 8 hex digits), hairpin on, and
    /// `bridge-nf-call-iptables` on, as flannel's installation requires. The agents get no
    /// `--pod-interfaces`: the defaults must find the ports.
    Bridge,
    /// [`PodNetwork::Bridge`], with other nodes' pods reached over a VXLAN overlay as flannel's `vxlan`
    /// backend builds it: `flannel.1` holding 10.200.N.0/32, a route per node's pod CIDR via that node's
    /// `flannel.1` address, its MAC as a permanent neighbour and a forwarding entry to its node's address.
    /// Pods get the overlay's MTU (1450).
    Vxlan,
}

impl PodNetwork {
    /// `PROXY_LAB_POD_NETWORK`: `bridge`, or routed with the lab's own names when unset (`routed`).
    /// `cargo xtask test` runs the behaviour tests once more on the bridge.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var("PROXY_LAB_POD_NETWORK").as_deref() {
            Ok("bridge") => Self::Bridge,
            Ok("vxlan") => Self::Vxlan,
            Ok("routed") | Err(_) => Self::Routed { names: vec![POD_IFACE_PREFIX] },
            Ok(other) => panic!("PROXY_LAB_POD_NETWORK={other}: expected bridge, vxlan or routed"),
        }
    }

    /// Pods on a bridge (with or without an overlay).
    #[must_use]
    pub fn bridged(&self) -> bool {
        matches!(self, Self::Bridge | Self::Vxlan)
    }

    /// The agents' `--pod-interfaces`, when the defaults are not what this lab tests.
    fn pod_interfaces_flag(&self) -> Option<String> {
        match self {
            Self::Routed { names } if names == &[POD_IFACE_PREFIX] => Some(format!("{POD_IFACE_PREFIX}*")),
            _ => None,
        }
    }
}

impl Default for LabSpec {
    /// The agents run in [`mode`].
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 3,
            tx_checksum_offload: true,
            agent_args: vec!["--mode".to_owned(), mode()],
            agent_capabilities: None,
            agent_binary: None,
            pod_network: PodNetwork::from_env(),
        }
    }
}

/// The dataplane the lab's agents run: `PROXY_LAB_MODE` (`ebpf`, `iptables`, `nftables`), `ebpf` when unset.
/// `cargo xtask test` runs the behaviour tests once per mode this way.
#[must_use]
pub fn mode() -> String {
    std::env::var("PROXY_LAB_MODE").unwrap_or_else(|_| "ebpf".to_owned())
}

/// The zone of node `n` in the lab's Node objects: odd nodes in zone-a, even ones in zone-b.
#[must_use]
pub fn node_zone(node: usize) -> &'static str {
    if node % 2 == 1 { "zone-a" } else { "zone-b" }
}

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub name: String,
    pub node: usize,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, in a dual-stack lab.
    pub ip6: Option<Ipv6Addr>,
    /// The node's end of the pod's veth.
    pub host_end: String,
}

pub struct Lab {
    prefix: String,
    dir: PathBuf,
    /// This lab's cgroup (v2), with one child per node for the node's own processes.
    cgroup: Option<PathBuf>,
    cgroup2_mounted: bool,
    bpffs: PathBuf,
    bpffs_mounted: bool,
    /// Every namespace created, in creation order; deleted in reverse.
    namespaces: Vec<String>,
    pods: Vec<PodRef>,
    spec: LabSpec,
    agents: Vec<Agent>,
    servers: Vec<EchoServer>,
    servers6: Vec<crate::echo6::Echo6>,
    bulk_servers: Vec<BulkServer>,
    /// Real servers (dnsmasq, nginx) started in pods.
    daemons: Vec<Daemon>,
    /// Destinations a test expects to leave a node by its default route (see [`Lab::expect_leaks_to`]).
    expected_leaks: Vec<std::net::IpAddr>,
    /// `xdp_pass` on the underlay ends of the nodes' uplinks (see [`Lab::attach_underlay_xdp`]), and the
    /// bpffs its object's maps are pinned in. Dropped before the namespaces go.
    underlay_xdp: Option<(aya::Ebpf, crate::bpf::PrivateBpffs)>,
}

#[must_use]
pub fn node_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, 0, 10 + u8::try_from(node).expect("small node number"))
}

#[must_use]
pub fn node_name(node: usize) -> String {
    format!("node{node}")
}

pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 100);

/// Node `node`'s IPv6 address on the lab's network, in a dual-stack lab.
#[must_use]
pub fn node_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0x10 + u16::try_from(node).expect("small node number"))
}

/// An address family of the lab: its tests and figures say which one they ran over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// The families `lab` serves: both, in every topology.
    #[must_use]
    pub fn of(lab: &Lab) -> Vec<Self> {
        if lab.dual_stack() { vec![Self::V4, Self::V6] } else { vec![Self::V4] }
    }

    /// `pod`'s address in this family.
    #[must_use]
    pub fn pod(self, pod: &PodRef) -> std::net::IpAddr {
        match self {
            Self::V4 => pod.ip.into(),
            Self::V6 => pod.ip6.expect("a dual-stack lab's pod has an IPv6 address").into(),
        }
    }

    /// Node `n`'s address in this family.
    #[must_use]
    pub fn node(self, n: usize) -> std::net::IpAddr {
        match self {
            Self::V4 => node_ip(n).into(),
            Self::V6 => node_ip6(n).into(),
        }
    }
}

pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0x64);

/// A routed pod's IPv6 gateway: the link-local address every pod veth's node end holds.
const POD_GATEWAY6: &str = "fe80::1";

/// Pod `k` of node `node`'s IPv6 address (see the module's description).
fn pod_ip6(node: usize, k: usize, bridged: bool) -> Ipv6Addr {
    let n = u16::try_from(node).expect("small node number");
    let k = u16::try_from(k).expect("small pod number");
    Ipv6Addr::new(0xfd00, 0x200, n, 0, 0, 0, 0, if bridged { 10 + k } else { k })
}

/// Node `node`'s pod bridge's IPv6 address, the bridged pods' gateway.
fn pod_bridge_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x200, u16::try_from(node).expect("small node number"), 0, 0, 0, 0, 1)
}

/// Node `node`'s IPv6 address on the VXLAN overlay device (IPv4's is `10.200.N.0`).
#[must_use]
pub fn overlay_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x200, u16::try_from(node).expect("small node number"), 0, 0, 0, 0, 0xf1)
}

/// `ip -6 addr add … nodad`: usable at once, without duplicate address detection's second of waiting.
fn add_ip6(ns: &str, addr: &str, dev: &str) -> anyhow::Result<()> {
    ip_in(ns, &["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
    Ok(())
}

impl Lab {
    /// Builds the topology: underlay, nodes, pods and the external client. Agents start separately.
    pub fn start(spec: LabSpec) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if !nix::unistd::geteuid().is_root() {
            anyhow::bail!("the lab needs root: it creates network namespaces, mounts bpffs and loads eBPF programs");
        }
        sweep_stale_labs();
        let prefix = format!("{NS_PREFIX}{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(dir.join("manifests"))?;
        let mut lab = Self {
            cgroup: None,
            cgroup2_mounted: false,
            bpffs: dir.join("bpffs"),
            prefix,
            dir,
            bpffs_mounted: false,
            namespaces: Vec::new(),
            pods: Vec::new(),
            spec,
            agents: Vec::new(),
            servers: Vec::new(),
            servers6: Vec::new(),
            bulk_servers: Vec::new(),
            daemons: Vec::new(),
            expected_leaks: Vec::new(),
            underlay_xdp: None,
        };
        // On error, `lab` is dropped here and removes whatever was built so far.
        lab.build().context("building the lab")?;
        Ok(lab)
    }

    fn add_ns(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}-{suffix}", self.prefix);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip_in(&name, &["link", "set", "lo", "up"])?;
        // Links made here (and veth ends moved here) get usable link-local addresses at once: duplicate
        // address detection would hold them tentative for a second, and IPv6 neighbours with them.
        for key in ["net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"] {
            sysctl_in(&name, key, "0")?;
        }
        Ok(name)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.bpffs)?;
        run("mount", &["-t", "bpf", "bpffs", path_str(&self.bpffs)?])?;
        self.bpffs_mounted = true;

        // `ip netns exec` remounts /sys, hiding the host's cgroup mount from the agents: mount the cgroup v2
        // hierarchy a second time under the lab's directory, where they can see it.
        let cgroup2 = self.dir.join("cgroup2");
        std::fs::create_dir_all(&cgroup2)?;
        run("mount", &["-t", "cgroup2", "none", path_str(&cgroup2)?])?;
        self.cgroup2_mounted = true;
        let cgroup = cgroup2.join(&self.prefix);
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        self.cgroup = Some(cgroup);
        for n in 1..=self.spec.nodes {
            std::fs::create_dir_all(self.node_cgroup(n))?;
        }

        let dual_stack = self.dual_stack();
        let underlay = self.add_ns("ul")?;
        ip_in(&underlay, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&underlay, &["link", "set", "br0", "up"])?;

        for n in 1..=self.spec.nodes {
            let ns = self.add_ns(&format!("n{n}"))?;
            Self::plug_into_underlay(&underlay, &ns, &format!("n{n}"), node_ip(n))?;
            if dual_stack {
                add_ip6(&ns, &format!("{}/64", node_ip6(n)), "eth0")?;
                sysctl_in(&ns, "net.ipv6.conf.all.forwarding", "1")?;
            }
            for (key, value) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "1"),
                ("net.ipv4.conf.default.rp_filter", "1"),
                // The kernel sends a redirect if `all` or the interface says so: both must be off, or a node
                // forwarding a packet back out eth0 (to the lab's "outside") sends a redirect, and that
                // suppresses the ICMP error a REJECT sends right after, so a refusal reads as a drop.
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
                ("net.ipv4.conf.eth0.send_redirects", "0"),
            ] {
                sysctl_in(&ns, key, value)?;
            }
            if self.spec.pod_network.bridged() {
                Self::add_pod_bridge(&ns, n, dual_stack)?;
            } else {
                // Link scope: the node never picks the pods' gateway address as a source (masquerade, its
                // own connections); it only answers ARP for it.
                ip_in(&ns, &["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", "lo", "scope", "link"])?;
            }
            // Like a real node, a default route (to the lab's "outside"): traffic for addresses nobody
            // translated goes through the forward path (where a REJECT rule can see it), not straight to
            // "network unreachable".
            ip_in(&ns, &["route", "add", "default", "via", &EXTERNAL_IP.to_string()])?;
            if dual_stack {
                ip_in(&ns, &["-6", "route", "add", "default", "via", &EXTERNAL_IP6.to_string()])?;
            }
            if self.spec.pod_network == PodNetwork::Vxlan {
                self.add_overlay(&ns, n)?;
            } else {
                for other in (1..=self.spec.nodes).filter(|o| *o != n) {
                    let via = node_ip(other).to_string();
                    ip_in(&ns, &["route", "add", &format!("10.200.{other}.0/24"), "via", &via])?;
                    if dual_stack {
                        let via = node_ip6(other).to_string();
                        ip_in(&ns, &["-6", "route", "add", &format!("fd00:200:{other}::/64"), "via", &via])?;
                    }
                }
            }
            for k in 1..=self.spec.pods_per_node {
                self.add_pod(&ns, n, k)?;
            }
        }

        let external = self.add_ns("ext")?;
        Self::plug_into_underlay(&underlay, &external, "ext", EXTERNAL_IP)?;
        if dual_stack {
            add_ip6(&external, &format!("{EXTERNAL_IP6}/64"), "eth0")?;
        }
        crate::leaks::watch(&external)?;
        self.attach_underlay_xdp(&underlay)?;

        // The Node objects, as the API server would have them.
        let nodes: Vec<String> =
            (1..=self.spec.nodes).map(|n| crate::manifests::node(&node_name(n), node_ip(n), node_zone(n))).collect();
        self.write_manifest("nodes.yaml", &nodes.join("---\n"))?;
        Ok(())
    }

    /// Whether this lab has IPv6 addresses too: every topology has since the VXLAN overlay carries IPv6;
    /// tests still ask, so a topology without IPv6 would skip their IPv6 turns rather than fail them.
    #[must_use]
    pub fn dual_stack(&self) -> bool {
        true
    }

    /// Native-mode `XDP_TX` on a node's uplink (a veth) delivers only if the underlay end runs an XDP program
    /// too: veth wakes the receiving side only then. A physical switch port needs nothing; the lab attaches
    /// `xdp_pass` to every underlay port to stand in for one.
    fn attach_underlay_xdp(&mut self, underlay: &str) -> anyhow::Result<()> {
        let object = crate::bpf::object()?;
        let pins = crate::bpf::PrivateBpffs::mount()?;
        let pin_dir = pins.path().to_owned();
        let ports: Vec<String> = (1..=self.spec.nodes).map(|n| format!("n{n}")).chain(["ext".to_owned()]).collect();
        let ebpf = crate::netns::in_netns(underlay, move || -> anyhow::Result<aya::Ebpf> {
            let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(&pin_dir).load_file(&object)?;
            let prog: &mut aya::programs::Xdp = ebpf.program_mut("xdp_pass").context("xdp_pass")?.try_into()?;
            prog.load()?;
            for port in &ports {
                let name = std::ffi::CString::new(port.as_str())?;
                prog.attach(name.as_c_str(), aya::programs::XdpMode::Driver)
                    .with_context(|| format!("attaching xdp_pass to {port}"))?;
            }
            Ok(ebpf)
        })??;
        self.underlay_xdp = Some((ebpf, pins));
        Ok(())
    }

    /// Connects namespace `ns` to the underlay bridge with a veth whose `ns` end is `eth0` at `addr`/24.
    fn plug_into_underlay(underlay: &str, ns: &str, port: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        ip_in(underlay, &["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip_in(underlay, &["link", "set", port, "master", "br0", "up"])?;
        ip_in(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        // The underlay stands for a physical network: frames on it carry complete checksums, as they do on
        // a wire. (A veth would otherwise pass CHECKSUM_PARTIAL packets along, which XDP cannot tell apart.)
        run("ip", &["netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    /// The node's pod bridge, as flannel's `bridge` plugin sets it up: the gateway address on it, and
    /// bridged IPv4 traffic handed to netfilter (`br_netfilter`), without which kube-proxy's rules never see
    /// the replies that one pod of the bridge sends another.
    fn add_pod_bridge(node_ns: &str, node: usize, dual_stack: bool) -> anyhow::Result<()> {
        ip_in(node_ns, &["link", "add", POD_BRIDGE, "type", "bridge"])?;
        ip_in(node_ns, &["addr", "add", &format!("10.200.{node}.1/24"), "dev", POD_BRIDGE])?;
        if dual_stack {
            add_ip6(node_ns, &format!("fd00:200:{node}::1/64"), POD_BRIDGE)?;
        }
        ip_in(node_ns, &["link", "set", POD_BRIDGE, "up"])?;
        sysctl_in(node_ns, "net.bridge.bridge-nf-call-iptables", "1")?;
        sysctl_in(node_ns, "net.bridge.bridge-nf-call-ip6tables", "1")
    }

    /// Node `node`'s end of the VXLAN overlay (see [`PodNetwork::Vxlan`]).
    fn add_overlay(&self, node_ns: &str, node: usize) -> anyhow::Result<()> {
        let mac = |n: usize| format!("02:f1:00:00:00:{n:02x}");
        let local = node_ip(node).to_string();
        ip_in(
            node_ns,
            &[
                "link",
                "add",
                "flannel.1",
                "address",
                &mac(node),
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local,
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        ip_in(node_ns, &["addr", "add", &format!("10.200.{node}.0/32"), "dev", "flannel.1"])?;
        add_ip6(node_ns, &format!("{}/128", overlay_ip6(node)), "flannel.1")?;
        ip_in(node_ns, &["link", "set", "flannel.1", "mtu", "1450", "up"])?;
        for other in (1..=self.spec.nodes).filter(|o| *o != node) {
            let gateway = format!("10.200.{other}.0");
            ip_in(node_ns, &["neigh", "add", &gateway, "lladdr", &mac(other), "dev", "flannel.1", "nud", "permanent"])?;
            let dst = node_ip(other).to_string();
            run(
                "ip",
                &["netns", "exec", node_ns, "bridge", "fdb", "append", &mac(other), "dev", "flannel.1", "dst", &dst],
            )?;
            let cidr = format!("10.200.{other}.0/24");
            ip_in(node_ns, &["route", "add", &cidr, "via", &gateway, "dev", "flannel.1", "onlink"])?;
            let gateway6 = overlay_ip6(other).to_string();
            let neigh6 =
                ["-6", "neigh", "add", &gateway6, "lladdr", &mac(other), "dev", "flannel.1", "nud", "permanent"];
            ip_in(node_ns, &neigh6)?;
            let cidr6 = format!("fd00:200:{other}::/64");
            ip_in(node_ns, &["-6", "route", "add", &cidr6, "via", &gateway6, "dev", "flannel.1", "onlink"])?;
        }
        Ok(())
    }

    fn add_pod(&mut self, node_ns: &str, node: usize, k: usize) -> anyhow::Result<()> {
        let ns = self.add_ns(&format!("n{node}p{k}"))?;
        let addr = Ipv4Addr::new(10, 200, u8::try_from(node)?, 10 + u8::try_from(k)?);
        let host_end = match &self.spec.pod_network {
            PodNetwork::Routed { names } => format!("{}{k}", names[(k - 1) % names.len()]),
            // Unique per node and pod, and nothing like `vp`: only the agent's defaults can match it.
            PodNetwork::Bridge | PodNetwork::Vxlan => {
                format!("veth{:08x}", 0x5eed_0000_u32 + u32::try_from(node * 256 + k)?)
            }
        };
        ip_in(node_ns, &["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        match self.spec.pod_network {
            PodNetwork::Routed { .. } => {
                ip_in(node_ns, &["link", "set", &host_end, "up"])?;
                // `src`: the node's own connections to pods come from its address, not from the gateway on lo.
                let node_addr = node_ip(node).to_string();
                ip_in(node_ns, &["route", "add", &format!("{addr}/32"), "dev", &host_end, "src", &node_addr])?;
                ip_in(&ns, &["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
                let ip6 = pod_ip6(node, k, false);
                add_ip6(node_ns, &format!("{POD_GATEWAY6}/64"), &host_end)?;
                let node_addr = node_ip6(node).to_string();
                ip_in(node_ns, &["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_end, "src", &node_addr])?;
                add_ip6(&ns, &format!("{ip6}/128"), "eth0")?;
            }
            PodNetwork::Bridge | PodNetwork::Vxlan => {
                ip_in(node_ns, &["link", "set", &host_end, "master", POD_BRIDGE, "up"])?;
                // The `bridge` plugin's hairpinMode: a pod reaching itself through a Service gets its packets
                // back out of its own port.
                ip_in(node_ns, &["link", "set", &host_end, "type", "bridge_slave", "hairpin", "on"])?;
                ip_in(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                if self.dual_stack() {
                    add_ip6(&ns, &format!("{}/64", pod_ip6(node, k, true)), "eth0")?;
                }
            }
        }
        ip_in(&ns, &["link", "set", "eth0", "up"])?;
        // veth marks packets checksum-verified while rx checksumming is on, so a wrong checksum written by
        // the dataplane would go unnoticed. With it off, the pod's stack verifies every checksum it receives.
        run("ip", &["netns", "exec", &ns, "ethtool", "-K", "eth0", "rx", "off"])?;
        if !self.spec.tx_checksum_offload {
            // Senders then compute full checksums instead of leaving them for the device (CHECKSUM_PARTIAL):
            // the dataplane's incremental updates must be right on both kinds of packet.
            run("ip", &["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"])?;
        }
        if self.spec.pod_network == PodNetwork::Vxlan {
            ip_in(node_ns, &["link", "set", &host_end, "mtu", "1450"])?;
            ip_in(&ns, &["link", "set", "eth0", "mtu", "1450"])?;
        }
        if self.spec.pod_network.bridged() {
            ip_in(&ns, &["route", "add", "default", "via", &format!("10.200.{node}.1"), "dev", "eth0"])?;
        } else {
            ip_in(&ns, &["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
            ip_in(&ns, &["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])?;
        }
        let ip6 = self.dual_stack().then(|| pod_ip6(node, k, self.spec.pod_network.bridged()));
        if ip6.is_some() {
            let gateway =
                if self.spec.pod_network.bridged() { format!("fd00:200:{node}::1") } else { POD_GATEWAY6.into() };
            ip_in(&ns, &["-6", "route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        }
        self.pods.push(PodRef { name: format!("pod-{node}-{k}"), node, ns, ip: addr, ip6, host_end });
        Ok(())
    }

    /// The IPv6 addresses node `node` may masquerade to or send from: its uplink's, on a pod bridge the
    /// bridge's, on the VXLAN overlay the overlay device's.
    #[must_use]
    pub fn node_sources6(&self, node: usize) -> Vec<Ipv6Addr> {
        let mut sources = vec![node_ip6(node)];
        if self.spec.pod_network.bridged() {
            sources.push(pod_bridge_ip6(node));
        }
        if self.spec.pod_network == PodNetwork::Vxlan {
            sources.push(overlay_ip6(node));
        }
        sources
    }

    /// [`Lab::source_from_node`] over IPv6: the address node `node` masquerades to (or sends from) towards
    /// a pod of node `pod_node` — the outgoing interface's, as MASQUERADE takes it.
    #[must_use]
    pub fn source6_from_node(&self, node: usize, pod_node: usize) -> Ipv6Addr {
        match self.spec.pod_network {
            PodNetwork::Bridge | PodNetwork::Vxlan if node == pod_node => pod_bridge_ip6(node),
            PodNetwork::Vxlan => overlay_ip6(node),
            _ => node_ip6(node),
        }
    }

    /// [`Lab::source6_from_node`] towards the pod named `backend` (`pod-N-K`).
    #[must_use]
    pub fn source6_from_node_to(&self, node: usize, backend: &str) -> Ipv6Addr {
        let pod_node = self.pods.iter().find(|p| p.name == backend).map_or(0, |p| p.node);
        self.source6_from_node(node, pod_node)
    }

    /// The source address a packet from node `node` has when it reaches a pod of node `pod_node` after
    /// masquerade (or when the node itself connects): the address of the interface it leaves by, which
    /// netfilter's MASQUERADE and the kernel's source selection both take. That is the pod bridge's for a
    /// pod of the node's own bridge, the overlay device's for a pod across an overlay, and the node's
    /// address otherwise.
    #[must_use]
    pub fn source_from_node(&self, node: usize, pod_node: usize) -> Ipv4Addr {
        let n = u8::try_from(node).expect("small node number");
        match self.spec.pod_network {
            PodNetwork::Bridge | PodNetwork::Vxlan if node == pod_node => Ipv4Addr::new(10, 200, n, 1),
            PodNetwork::Vxlan => Ipv4Addr::new(10, 200, n, 0),
            _ => node_ip(node),
        }
    }

    /// [`Lab::source_from_node`] towards the pod named `backend` (`pod-N-K`).
    #[must_use]
    pub fn source_from_node_to(&self, node: usize, backend: &str) -> Ipv4Addr {
        let pod_node = self.pods.iter().find(|p| p.name == backend).map_or(0, |p| p.node);
        self.source_from_node(node, pod_node)
    }

    /// Pod `k` (1-based) of node `node` (1-based).
    #[must_use]
    pub fn pod(&self, node: usize, k: usize) -> &PodRef {
        self.pods
            .iter()
            .find(|p| p.node == node && p.name == format!("pod-{node}-{k}"))
            .expect("pod exists in this lab")
    }

    #[must_use]
    pub fn pods(&self) -> &[PodRef] {
        &self.pods
    }

    #[must_use]
    pub fn node_ns(&self, node: usize) -> String {
        format!("{}-n{node}", self.prefix)
    }

    #[must_use]
    pub fn external_ns(&self) -> String {
        format!("{}-ext", self.prefix)
    }

    /// Routes `addr` from the external client's namespace via node `node`, as a router or a load balancer
    /// in front of the cluster would (external IPs and load-balancer IPs are not on any interface).
    pub fn route_external_via(&self, addr: Ipv4Addr, node: usize) -> anyhow::Result<()> {
        ip_in(&self.external_ns(), &["route", "replace", &format!("{addr}/32"), "via", &node_ip(node).to_string()])?;
        Ok(())
    }

    /// Routes the IPv6 `addr` from the external client's namespace via node `node` (see
    /// [`Lab::route_external_via`]).
    pub fn route_external6_via(&self, addr: Ipv6Addr, node: usize) -> anyhow::Result<()> {
        let via = node_ip6(node).to_string();
        ip_in(&self.external_ns(), &["-6", "route", "replace", &format!("{addr}/128"), "via", &via])?;
        Ok(())
    }

    /// Gives the external client a second address on the lab's network (`addr`/24): a client the tests
    /// can put outside a Service's source ranges.
    pub fn add_external_address(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        ip_in(&self.external_ns(), &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        Ok(())
    }

    /// Gives the external client a second IPv6 address on the lab's network (`addr`/64), in a dual-stack
    /// lab. It is deprecated at once (`preferred_lft 0`), so the kernel's source selection keeps picking
    /// the client's own address (it would prefer the newest of two alike) and only a socket bound to this
    /// one sends from it, as with IPv4's second address.
    pub fn add_external_address6(&self, addr: Ipv6Addr) -> anyhow::Result<()> {
        let addr = format!("{addr}/64");
        ip_in(&self.external_ns(), &["-6", "addr", "add", &addr, "dev", "eth0", "nodad", "preferred_lft", "0"])?;
        Ok(())
    }

    /// Gives node `node` a secondary IPv6 address (`addr`/64) on its uplink, before its agent starts.
    pub fn add_node_address6(&self, node: usize, addr: Ipv6Addr) -> anyhow::Result<()> {
        add_ip6(&self.node_ns(node), &format!("{addr}/64"), "eth0")
    }

    /// Gives node `node` a secondary address (`addr`/24) on its uplink, before its agent starts (agents
    /// read the node's addresses at start): an address `--nodeport-addresses` can leave out.
    pub fn add_node_address(&self, node: usize, addr: Ipv4Addr) -> anyhow::Result<()> {
        ip_in(&self.node_ns(node), &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        Ok(())
    }

    /// Routes the network `cidr` from the external client's namespace via node `node`: a static route to
    /// the Service range through a node, which kube-proxy supports (it masquerades such traffic).
    /// An IPv6 `cidr` goes via the node's IPv6 address.
    pub fn route_external_net_via(&self, cidr: &str, node: usize) -> anyhow::Result<()> {
        if cidr.contains(':') {
            let via = node_ip6(node).to_string();
            ip_in(&self.external_ns(), &["-6", "route", "replace", cidr, "via", &via])?;
            return Ok(());
        }
        ip_in(&self.external_ns(), &["route", "replace", cidr, "via", &node_ip(node).to_string()])?;
        Ok(())
    }

    /// The cgroup of node `node`'s own processes; the agent's socket programs are attached to it.
    #[must_use]
    pub fn node_cgroup(&self, node: usize) -> PathBuf {
        self.cgroup.as_ref().map(|c| c.join(node_name(node))).unwrap_or_default()
    }

    /// One request from a process on node `node` itself (its namespace and cgroup), using the `lab-client`
    /// binary at `client`.
    pub fn request_from_node(
        &self,
        node: usize,
        client: &Path,
        proto: Proto,
        target: SocketAddrV4,
    ) -> anyhow::Result<Outcome> {
        let proto = if proto == Proto::Udp { "udp" } else { "tcp" };
        let out = self.run_on_node(node, client, &[proto, &target.to_string(), "2000"])?;
        Ok(Outcome::from_client_output(&out))
    }

    /// [`Lab::request_from_node`] to an IPv6 target.
    pub fn request6_from_node(
        &self,
        node: usize,
        client: &Path,
        proto: Proto,
        target: std::net::SocketAddrV6,
    ) -> anyhow::Result<crate::echo6::Outcome6> {
        let proto = if proto == Proto::Udp { "udp" } else { "tcp" };
        let out = self.run_on_node(node, client, &[proto, &target.to_string(), "2000"])?;
        Ok(crate::echo6::Outcome6::from_client_output(&out))
    }

    /// Runs the `lab-client` binary at `client` with `args` as a process of node `node` itself (its
    /// namespace and cgroup); returns what it printed.
    pub fn run_on_node(&self, node: usize, client: &Path, args: &[&str]) -> anyhow::Result<String> {
        let procs = self.node_cgroup(node).join("cgroup.procs");
        let args: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        // The shell joins the cgroup, then becomes the client in the node's namespace.
        let script = format!(
            "echo $$ > '{}' && exec ip netns exec '{}' '{}' {}",
            procs.display(),
            self.node_ns(node),
            client.display(),
            args.join(" ")
        );
        run("sh", &["-c", &script])
    }

    /// The directory every agent reads manifests from (one "API server" for the whole lab).
    #[must_use]
    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes (or replaces) one manifest file. The write is atomic: agents never read half a file.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifest_dir().join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.manifest_dir().join(file))?;
        Ok(())
    }

    /// Starts an echo server named after the pod, on the given ports.
    pub fn serve(&mut self, pod: &PodRef, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
        self.servers.push(EchoServer::start(&pod.ns, &pod.name, tcp, udp)?);
        Ok(())
    }

    /// Starts the IPv6 echo (TCP and UDP, [`crate::echo6::Echo6`]) on each of `ports` in `pod`, beside the
    /// IPv4 one [`Lab::serve`] starts; a dual-stack lab only.
    pub fn serve6(&mut self, pod: &PodRef, ports: &[u16]) -> anyhow::Result<()> {
        anyhow::ensure!(self.dual_stack(), "this topology has no IPv6");
        for &port in ports {
            self.servers6.push(crate::echo6::Echo6::start(&pod.ns, &pod.name, port)?);
        }
        Ok(())
    }

    /// Starts a bulk TCP server (uploads counted, downloads sent; see [`crate::bulk`]) named after the
    /// pod, on `port`.
    pub fn serve_bulk(&mut self, pod: &PodRef, port: u16) -> anyhow::Result<()> {
        self.bulk_servers.push(BulkServer::start(&pod.ns, &pod.name, port)?);
        Ok(())
    }

    /// Starts a real server (`program args…`) in `pod`'s namespace under `name`; its output goes to a file
    /// of the lab's directory. It is killed by [`Lab::stop_daemon`] or at teardown.
    pub fn start_daemon(&mut self, pod: &PodRef, name: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        self.daemons.push(Daemon::start(&pod.ns, name, program, args, &log)?);
        Ok(())
    }

    /// Kills the server started under `name`.
    pub fn stop_daemon(&mut self, name: &str) {
        self.daemons.retain(|d| d.name() != name);
    }

    /// Fails if any server started with [`Lab::start_daemon`] has exited, quoting its output.
    pub fn check_daemons(&mut self) -> anyhow::Result<()> {
        self.daemons.iter_mut().try_for_each(Daemon::check_running)
    }

    /// A directory of the lab's own (removed at teardown) for a test's files.
    #[must_use]
    pub fn work_dir(&self) -> &Path {
        &self.dir
    }

    /// Starts one agent per node and waits until each has programmed its first table.
    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        self.start_agents_within(Duration::from_secs(20))
    }

    /// [`Lab::start_agents`], waiting up to `timeout` for each agent's first sync (large tables take longer).
    pub fn start_agents_within(&mut self, timeout: Duration) -> anyhow::Result<()> {
        for n in 1..=self.spec.nodes {
            let config = AgentConfig {
                node_name: node_name(n),
                netns: self.node_ns(n),
                manifests: self.manifest_dir(),
                pin_dir: self.pin_dir(n),
                log: self.dir.join(format!("agent-{}.log", node_name(n))),
                pod_interfaces: self.spec.pod_network.pod_interfaces_flag(),
                capabilities: self.spec.agent_capabilities.clone(),
                extra_args: [
                    vec!["--cgroup".to_owned(), self.node_cgroup(n).to_string_lossy().into_owned()],
                    self.spec.agent_args.clone(),
                ]
                .concat(),
                env: Vec::new(),
                kubeconfig: None,
                binary: self.spec.agent_binary.clone(),
            };
            self.agents.push(Agent::spawn(config)?);
        }
        for agent in &mut self.agents {
            agent.wait_for_log("service table applied", 0, timeout)?;
        }
        Ok(())
    }

    /// Kills node `node`'s agent with SIGKILL and starts a new one with the same configuration (its log file
    /// is started afresh); waits until the new one has applied its first table.
    pub fn restart_agent_hard(&mut self, node: usize) -> anyhow::Result<()> {
        let agent = &mut self.agents[node - 1];
        agent.kill_hard();
        let config = agent.config().clone();
        *agent = Agent::spawn(config)?;
        agent.wait_for_log("service table applied", 0, Duration::from_secs(20))
    }

    /// Kills node `node`'s agent (SIGKILL) and starts one that watches the API server of `kubeconfig` (or
    /// the manifests, with `None`), with the same flags; waits until its log shows `ready` (which may not be
    /// its first sync: it may start while the API server is away).
    pub fn restart_agent_watching(
        &mut self,
        node: usize,
        kubeconfig: Option<&Path>,
        ready: &str,
    ) -> anyhow::Result<()> {
        let agent = &mut self.agents[node - 1];
        agent.kill_hard();
        let mut config = agent.config().clone();
        config.kubeconfig = kubeconfig.map(Path::to_owned);
        *agent = Agent::spawn(config)?;
        agent.wait_for_log(ready, 0, Duration::from_secs(20))
    }

    /// Stops node `node`'s agent (SIGTERM) and starts the build under test in its place, with the same
    /// flags (an upgrade from [`LabSpec::agent_binary`]); waits until it has applied its first table.
    pub fn upgrade_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let agent = &mut self.agents[node - 1];
        agent.stop();
        let mut config = agent.config().clone();
        config.binary = None;
        *agent = Agent::spawn(config)?;
        agent.wait_for_log("service table applied", 0, Duration::from_secs(20))
    }

    /// Stops node `node`'s agent (SIGTERM) and starts one with `extra_args` instead of the lab's own (the
    /// `--cgroup` flag is kept); waits until it has applied its first table.
    pub fn restart_agent_with(&mut self, node: usize, extra_args: &[&str]) -> anyhow::Result<()> {
        self.restart_agent_with_env(node, extra_args, &[])
    }

    /// [`Lab::restart_agent_with`], with extra environment variables for the new agent.
    pub fn restart_agent_with_env(
        &mut self,
        node: usize,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let cgroup = self.node_cgroup(node).to_string_lossy().into_owned();
        let agent = &mut self.agents[node - 1];
        agent.stop();
        let mut config = agent.config().clone();
        config.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        config.extra_args = ["--cgroup", cgroup.as_str()].iter().chain(extra_args).map(|s| (*s).to_owned()).collect();
        *agent = Agent::spawn(config)?;
        agent.wait_for_log("service table applied", 0, Duration::from_secs(20))
    }

    /// The agent of node `node` (1-based).
    pub fn agent(&mut self, node: usize) -> &mut Agent {
        &mut self.agents[node - 1]
    }

    /// Waits until every agent has applied a table since it had applied `seen[i]` of them.
    pub fn wait_for_sync(&mut self, seen: &[usize]) -> anyhow::Result<()> {
        for (agent, seen) in self.agents.iter_mut().zip(seen) {
            agent.wait_for_log("service table applied", *seen, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Where node `node`'s agent pins its maps and links.
    #[must_use]
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.bpffs.join(node_name(node))
    }

    /// Where node `node`'s agent pins map `name`: `NAME_vN`, the layout version its build gives the map
    /// (the highest, should there be several).
    #[must_use]
    pub fn pin_path(&self, node: usize, name: &str) -> PathBuf {
        let dir = self.pin_dir(node);
        let prefix = format!("{name}_v");
        let version = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok()?.strip_prefix(&prefix)?.parse::<u32>().ok())
            .max()
            .unwrap_or(1);
        dir.join(format!("{prefix}{version}"))
    }

    /// The pinned map `name` of node `node`'s agent, opened from the test process.
    pub fn pinned_map(&self, node: usize, name: &str) -> anyhow::Result<aya::maps::Map> {
        let pin = self.pin_path(node, name);
        let data = aya::maps::MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        Ok(aya::maps::Map::from_map_data(data)?)
    }

    /// The data-path counters of node `node` (`proxy_common::stats`), summed over CPUs, read from its
    /// pinned `STATS` map.
    pub fn stats(&self, node: usize) -> anyhow::Result<Vec<u64>> {
        let map = self.pinned_map(node, proxy_common::maps::STATS)?;
        let counters: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map)?;
        (0..proxy_common::stats::COUNT).map(|i| Ok(counters.get(&i, 0)?.iter().sum())).collect()
    }

    /// How many tables each agent has applied so far; pass to [`Lab::wait_for_sync`] after a change.
    #[must_use]
    pub fn sync_counts(&self) -> Vec<usize> {
        self.agents.iter().map(|a| a.count_in_log("service table applied")).collect()
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 temp path")
}

impl Lab {
    /// Packets that reached the external client's namespace addressed to someone else: what a node sent
    /// out by its default route (in the lab, nothing legitimate does). See [`crate::leaks`].
    pub fn leaks(&self) -> anyhow::Result<Vec<crate::leaks::Leak>> {
        crate::leaks::read(&self.external_ns())
    }

    /// Leaks to destinations the test did not declare with [`Lab::expect_leaks_to`].
    pub fn unexpected_leaks(&self) -> anyhow::Result<Vec<crate::leaks::Leak>> {
        Ok(self.leaks()?.into_iter().filter(|l| !self.expected_leaks.contains(&l.dst)).collect())
    }

    /// Fails if any packet left a node by its default route to a destination not declared with
    /// [`Lab::expect_leaks_to`]. Every lab also checks this when it is torn down.
    pub fn assert_no_leaks(&self) {
        let leaks = self.unexpected_leaks().expect("reading the lab's leak record");
        assert!(leaks.is_empty(), "packets left a node by its default route: {leaks:?}");
    }

    /// Declares that packets to `addr` may leave a node by its default route in this test (an address
    /// the dataplane deliberately leaves alone, as kube-proxy does).
    pub fn expect_leaks_to(&mut self, addr: impl Into<std::net::IpAddr>) {
        self.expected_leaks.push(addr.into());
    }

    /// Forgets the leaks recorded so far (a test that switches modes checks each mode's on its own).
    pub fn forget_leaks(&self) -> anyhow::Result<()> {
        crate::leaks::forget(&self.external_ns())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Read before the namespaces go; reported after teardown, so a failing check leaves nothing behind.
        let leaks = if std::thread::panicking() { Ok(Vec::new()) } else { self.unexpected_leaks() };
        for agent in &mut self.agents {
            agent.stop();
        }
        self.agents.clear();
        self.servers.clear();
        self.servers6.clear();
        self.bulk_servers.clear();
        self.daemons.clear();
        self.underlay_xdp = None;
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("lab teardown: {e:#}");
            }
        }
        if self.bpffs_mounted {
            unmount(&self.bpffs);
        }
        if let Some(cgroup) = self.cgroup.take() {
            remove_cgroup(&cgroup);
        }
        if self.cgroup2_mounted {
            unmount(&self.dir.join("cgroup2"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        match leaks {
            Ok(leaks) if !leaks.is_empty() => panic!("packets left a node by its default route: {leaks:?}"),
            Ok(_) => {}
            Err(e) => panic!("reading the lab's leak record: {e:#}"),
        }
    }
}

/// Whether something is mounted at `path`, from /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|line| line.split_whitespace().nth(4).is_some_and(|m| Path::new(m) == path))
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Removes a lab cgroup and its node children (empty once their processes have exited).
/// Unmounts a lab's mount. A mount can be busy for a moment after its users exit (seen once in CI: a
/// lab's cgroup2 mount outlived its test), so this retries briefly, then detaches it lazily: nothing of
/// the lab stays mounted either way.
fn unmount(path: &Path) {
    let target = path.to_string_lossy();
    for _ in 0..10 {
        if run("umount", &[&target]).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(e) = run("umount", &["--lazy", &target]) {
        eprintln!("lab teardown: {e:#}");
    }
}

fn remove_cgroup(cgroup: &Path) {
    if let Ok(children) = std::fs::read_dir(cgroup) {
        for child in children.flatten().filter(|c| c.path().is_dir()) {
            let _ = std::fs::remove_dir(child.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(cgroup) {
        eprintln!("lab teardown: removing cgroup {}: {e}", cgroup.display());
    }
}

/// Removes namespaces and mounts left by lab processes that died without tearing down (SIGKILL, OOM).
fn sweep_stale_labs() {
    let own = std::process::id();
    sweep_labs(|pid| pid != own && !Path::new(&format!("/proc/{pid}")).exists());
}

/// Tears down every lab of this process: for a signal handler, since a process ended by a signal drops
/// nothing. Agents are killed, then namespaces, mounts, cgroups and files removed.
pub fn sweep_own_labs() {
    let own = std::process::id();
    sweep_labs(|pid| pid == own);
}

/// Tears down the labs whose owning process `pid` matches.
fn sweep_labs(owned_by: impl Fn(u32) -> bool) {
    let Ok(list) = ip(&["netns", "list"]) else { return };
    let mut labs: Vec<&str> = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if owned_by(pid) {
            let lab = name.split('-').next().unwrap_or(name);
            kill_agents_of(lab);
            let _ = ip(&["netns", "del", name]);
            if !labs.contains(&lab) {
                labs.push(lab);
            }
        }
    }
    // A lab whose namespaces are gone may still have left its directory and mounts.
    let dirs = std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten();
    let leftover: Vec<String> = dirs
        .filter_map(|d| d.file_name().into_string().ok())
        .filter(|name| {
            let pid = name.strip_prefix(NS_PREFIX).and_then(|rest| rest.split('x').next()?.parse::<u32>().ok());
            pid.is_some_and(&owned_by) && !name.contains('-') && !name.contains('.')
        })
        .collect();
    for lab in leftover.iter().map(String::as_str) {
        if !labs.contains(&lab) {
            labs.push(lab);
        }
    }
    for lab in labs {
        let dir = std::env::temp_dir().join(lab);
        if is_mount_point(&dir.join("bpffs")) {
            unmount(&dir.join("bpffs"));
        }
        if let Some(cg) = cgroup2_mount() {
            let cgroup = cg.join(lab);
            if cgroup.is_dir() {
                remove_cgroup(&cgroup);
            }
        }
        if is_mount_point(&dir.join("cgroup2")) {
            unmount(&dir.join("cgroup2"));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// SIGKILLs the agents a lab started: the processes whose command line names the lab's directory.
fn kill_agents_of(lab: &str) {
    let marker = format!("/{lab}/");
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&marker) && pid != i32::try_from(std::process::id()).unwrap_or(0)
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
