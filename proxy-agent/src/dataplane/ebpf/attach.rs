//! Keeps the TC programs attached to every pod-facing interface, including pods created after start-up.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::interfaces::Interface;
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, SchedClassifierLinkId},
    xdp::{XdpLink, XdpLinkId},
};

/// Which interfaces face pods: names matching any of these patterns (`*` matches any run of characters).
#[derive(Clone, Debug, Default)]
pub struct InterfacePatterns(Vec<String>);

impl InterfacePatterns {
    #[must_use]
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob_match(p, name))
    }
}

fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else { return false };
            (0..=tail.len()).filter(|i| tail.is_char_boundary(*i)).any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

/// What an interface faces, which decides the programs it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The host end of a pod's veth.
    Pod,
    /// A host interface towards other nodes and the outside.
    Host,
}

impl Role {
    const fn programs(self) -> [(&'static str, TcAttachType); 2] {
        match self {
            Self::Pod => [("tc_pod_ingress", TcAttachType::Ingress), ("tc_pod_egress", TcAttachType::Egress)],
            Self::Host => [("tc_host_ingress", TcAttachType::Ingress), ("tc_host_egress", TcAttachType::Egress)],
        }
    }
}

/// Every TC program in the object.
pub const PROGRAMS: [&str; 4] = ["tc_pod_ingress", "tc_pod_egress", "tc_host_ingress", "tc_host_egress"];

pub const XDP_PROGRAM: &str = "xdp_host";

struct Attached {
    name: String,
    role: Role,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
    xdp: Option<XdpLinkId>,
}

/// How the XDP program is attached to host interfaces; TC handles everything either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpSetting {
    /// In the driver (veth and most NICs): the fast path.
    Native,
    /// In the stack, for drivers without native XDP: correct, not faster than TC.
    Generic,
    /// TC only.
    Off,
}

/// The interfaces the programs are attached to, by ifindex. Every link is pinned under `links_dir`, so the
/// data path keeps running while no agent runs, and the next agent swaps its programs into the same links
/// atomically instead of detaching and attaching (no gap, no double attachment).
pub struct Attachments {
    by_index: BTreeMap<u32, Attached>,
    xdp: XdpSetting,
    links_dir: PathBuf,
}

/// Where the link of `prog` on interface `idx`/`name` is pinned.
fn link_pin(dir: &Path, idx: u32, name: &str, prog: &str) -> PathBuf {
    dir.join(format!("if-{idx}-{}-{prog}", pin_safe(name)))
}

/// An interface name as it can stand in a pin's name: bpffs refuses dots, which VLAN (`eth0.100`) and
/// overlay (`flannel.1`) devices have.
fn pin_safe(name: &str) -> String {
    name.replace('.', "_")
}

/// Attaches `$prog` through the link pinned at `$pin` when there is one (replacing the previous program in
/// it atomically), otherwise attaches anew with `$attach` and pins the link. TC and XDP programs share the
/// steps but not a trait, hence a macro.
macro_rules! attach_pinned {
    ($prog:ident, $link:ty, $pin:expr, $attach:expr) => {{
        let pin: &Path = $pin;
        let adopted = PinnedLink::from_pin(pin).ok().map(|old| {
            <$link>::try_from(FdLink::from(old)).map_err(anyhow::Error::from).and_then(|l| Ok($prog.attach_to_link(l)?))
        });
        match adopted {
            Some(Ok(id)) => Ok(id),
            other => {
                if let Some(Err(e)) = other {
                    // A link whose interface went away cannot take a program: start over.
                    tracing::debug!(pin = %pin.display(), error = %e, "pinned link unusable; attaching anew");
                    let _ = std::fs::remove_file(pin);
                }
                let id = $attach?;
                let fd: FdLink = $prog.take_link(id)?.try_into().context("the link is not a bpf_link")?;
                let pinned = fd.pin(pin).with_context(|| format!("pinning {}", pin.display()))?;
                Ok($prog.attach_to_link(<$link>::try_from(FdLink::from(pinned))?)?)
            }
        }
    }};
}

fn attach_tc(
    prog: &mut SchedClassifier,
    idx: u32,
    ty: TcAttachType,
    pin: &Path,
) -> anyhow::Result<SchedClassifierLinkId> {
    attach_pinned!(prog, SchedClassifierLink, pin, prog.attach(idx, ty))
}

fn attach_xdp(prog: &mut Xdp, idx: u32, mode: XdpMode, pin: &Path) -> anyhow::Result<XdpLinkId> {
    attach_pinned!(prog, XdpLink, pin, prog.attach(idx, mode))
}

/// Which interfaces get which programs.
#[derive(Clone, Debug)]
pub struct InterfaceRoles {
    pub pods: InterfacePatterns,
    pub hosts: InterfacePatterns,
}

impl InterfaceRoles {
    /// The role of each interface that gets programs, by index. Pod patterns win over host patterns.
    ///
    /// A packet crossing a Linux bridge passes the port it came in by, the bridge, and the port it leaves
    /// by, so programs on a bridge and on its ports would translate it twice (two SNATs, two port
    /// allocations). One of the two gets them:
    /// - a bridge that faces pods (it or its ports match the pod patterns: `cni0` with `veth*` ports) is
    ///   never attached; its ports are, since only they see traffic between two pods of the bridge, and a
    ///   bridge matched by the pod patterns (kube-proxy's `--pod-bridge-interface`) lends its ports the
    ///   pod role;
    /// - a bridge that holds the uplink (a host pattern matches it or one of its ports: `br0` over `eth0`)
    ///   is the host interface, as the node's address is on it; its ports are not attached.
    #[must_use]
    pub fn assign(&self, interfaces: &[Interface]) -> BTreeMap<u32, (String, Role)> {
        let host_bridge = |bridge: &str| {
            self.hosts.matches(bridge)
                || interfaces.iter().any(|i| i.bridge.as_deref() == Some(bridge) && self.hosts.matches(&i.name))
        };
        interfaces
            .iter()
            .filter_map(|i| {
                let role = if i.is_bridge {
                    (!self.pods.matches(&i.name) && host_bridge(&i.name)).then_some(Role::Host)
                } else if let Some(bridge) = &i.bridge {
                    let pod_port =
                        self.pods.matches(&i.name) || (self.pods.matches(bridge) && !self.hosts.matches(&i.name));
                    (pod_port && (self.pods.matches(bridge) || !host_bridge(bridge))).then_some(Role::Pod)
                } else if self.pods.matches(&i.name) {
                    Some(Role::Pod)
                } else if self.hosts.matches(&i.name) {
                    Some(Role::Host)
                } else {
                    None
                };
                Some((i.index, (i.name.clone(), role?)))
            })
            .collect()
    }
}

impl Attachments {
    pub fn new(xdp: XdpSetting, links_dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&links_dir).with_context(|| format!("creating {}", links_dir.display()))?;
        Ok(Self { by_index: BTreeMap::new(), xdp, links_dir })
    }

    /// Unpins links of interfaces that no longer exist (their links went with them).
    fn forget_stale_pins(&self, present: &BTreeMap<u32, (String, Role)>) {
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else { return };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(rest) = file.to_str().and_then(|f| f.strip_prefix("if-")) else { continue };
            let Some((idx, rest)) = rest.split_once('-') else { continue };
            let alive = idx.parse::<u32>().ok().and_then(|i| present.get(&i)).is_some_and(|(name, _)| {
                rest.strip_prefix(pin_safe(name).as_str()).is_some_and(|p| p.starts_with('-'))
            });
            if !alive {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Attaches XDP to a host interface; on failure the interface keeps its TC programs and the failure is
    /// logged, never fatal.
    fn attach_xdp(&self, ebpf: &mut aya::Ebpf, idx: u32, name: &str) -> anyhow::Result<Option<XdpLinkId>> {
        let pin = link_pin(&self.links_dir, idx, name, XDP_PROGRAM);
        let mode = match self.xdp {
            XdpSetting::Off => {
                // A previous agent's XDP link would otherwise keep running.
                let _ = std::fs::remove_file(&pin);
                return Ok(None);
            }
            XdpSetting::Native => XdpMode::Driver,
            XdpSetting::Generic => XdpMode::Skb,
        };
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .with_context(|| format!("program {XDP_PROGRAM} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {XDP_PROGRAM} is not an XDP program"))?;
        match attach_xdp(prog, idx, mode, &pin) {
            Ok(link) => Ok(Some(link)),
            Err(e) => {
                tracing::warn!(interface = name, ?mode, error = %e, "XDP attach failed; TC handles this interface");
                Ok(None)
            }
        }
    }

    /// Attaches to new matching interfaces and forgets those that are gone. Returns the names newly attached.
    pub fn refresh(
        &mut self,
        ebpf: &mut aya::Ebpf,
        roles: &InterfaceRoles,
        interfaces: &[Interface],
    ) -> anyhow::Result<Vec<String>> {
        let present = roles.assign(interfaces);
        self.forget_stale_pins(&present);

        // A deleted interface took its TCX links with it; drop our handles. An index reused by a new
        // interface with another name is a new attachment.
        let stale: Vec<u32> = self
            .by_index
            .iter()
            .filter(|(idx, a)| present.get(idx).is_none_or(|(name, role)| *name != a.name || *role != a.role))
            .map(|(idx, _)| *idx)
            .collect();
        for idx in stale {
            let gone = self.by_index.remove(&idx).expect("listed above");
            for (prog, link) in gone.links {
                drop(program(ebpf, prog)?.take_link(link));
            }
            if let Some(link) = gone.xdp {
                let prog: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).context("xdp program")?.try_into()?;
                drop(prog.take_link(link));
            }
            tracing::debug!(interface = %gone.name, "interface gone");
        }

        let mut added = Vec::new();
        for (idx, (name, role)) in present {
            if self.by_index.contains_key(&idx) {
                continue;
            }
            let mut links = Vec::new();
            for (prog, attach_type) in role.programs() {
                let pin = link_pin(&self.links_dir, idx, &name, prog);
                match attach_tc(program(ebpf, prog)?, idx, attach_type, &pin) {
                    Ok(link) => links.push((prog, link)),
                    Err(e) => {
                        // Never leave an interface half-attached: DNAT without reverse NAT breaks every flow.
                        for (prog, link) in links {
                            let _ = program(ebpf, prog)?.detach(link);
                            let _ = std::fs::remove_file(link_pin(&self.links_dir, idx, &name, prog));
                        }
                        return Err(e).with_context(|| format!("attaching {prog} to {name}"));
                    }
                }
            }
            let xdp = if role == Role::Host { self.attach_xdp(ebpf, idx, &name)? } else { None };
            added.push(format!("{name} ({role:?}{})", if xdp.is_some() { " + XDP" } else { "" }));
            self.by_index.insert(idx, Attached { name, role, links, xdp });
        }
        Ok(added)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.by_index.len()
    }

    /// The indexes of the interfaces with programs.
    pub fn indexes(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_index.keys().copied()
    }
}

fn program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a TC classifier"))
}

/// Loads every program into the kernel, the IPv6 ones too (tail-called, not attached); the verifier runs
/// here, and its log is part of the error.
pub fn load_programs(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    use super::ipv6_programs::{TC, XDP, programs};
    for name in PROGRAMS.iter().copied().chain(programs(TC)) {
        program(ebpf, name)?.load().with_context(|| format!("loading {name}"))?;
    }
    for name in std::iter::once(XDP_PROGRAM).chain(programs(XDP)) {
        let xdp: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not an XDP program"))?;
        xdp.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_shell_globs() {
        let p = InterfacePatterns::new(vec!["veth*".into(), "lxc*x".into(), "eth0".into()]);
        assert!(p.matches("veth12ab"));
        assert!(p.matches("veth"));
        assert!(p.matches("lxcABCx"));
        assert!(p.matches("eth0"));
        assert!(!p.matches("eth1"));
        assert!(!p.matches("lxcABC"));
        assert!(!p.matches("cali1"));
    }

    fn iface(index: u32, name: &str, is_bridge: bool, bridge: Option<&str>) -> Interface {
        Interface { index, name: name.into(), is_bridge, bridge: bridge.map(Into::into) }
    }

    fn roles(pods: &str, hosts: &str) -> InterfaceRoles {
        let split = |s: &str| s.split(',').map(str::to_owned).collect();
        InterfaceRoles { pods: InterfacePatterns::new(split(pods)), hosts: InterfacePatterns::new(split(hosts)) }
    }

    fn named(assigned: &BTreeMap<u32, (String, Role)>) -> Vec<(String, Role)> {
        assigned.values().cloned().collect()
    }

    #[test]
    fn a_pod_bridge_is_never_attached_its_ports_are() {
        let node = [
            iface(1, "eth0", false, None),
            iface(2, "cni0", true, None),
            iface(3, "veth1a2b", false, Some("cni0")),
            iface(4, "veth3c4d", false, Some("cni0")),
            iface(5, "flannel.1", false, None),
        ];
        let default = roles(crate::cli::DEFAULT_POD_INTERFACES, crate::cli::DEFAULT_HOST_INTERFACES);
        assert_eq!(
            named(&default.assign(&node)),
            [
                ("eth0".into(), Role::Host),
                ("veth1a2b".into(), Role::Pod),
                ("veth3c4d".into(), Role::Pod),
                ("flannel.1".into(), Role::Host)
            ]
        );
        // kube-proxy's --pod-bridge-interface alone: the bridge's ports face pods, whatever their names.
        let bridge_only = roles("cni0", "eth*");
        assert_eq!(
            named(&bridge_only.assign(&node)),
            [("eth0".into(), Role::Host), ("veth1a2b".into(), Role::Pod), ("veth3c4d".into(), Role::Pod)]
        );
    }

    #[test]
    fn a_bridge_over_the_uplink_is_the_host_interface_and_its_ports_are_not_attached() {
        let node = [
            iface(1, "br0", true, None),
            iface(2, "eth0", false, Some("br0")),
            iface(3, "vethvm", false, Some("br0")),
            iface(4, "cali12", false, None),
        ];
        let default = roles(crate::cli::DEFAULT_POD_INTERFACES, crate::cli::DEFAULT_HOST_INTERFACES);
        assert_eq!(named(&default.assign(&node)), [("br0".into(), Role::Host), ("cali12".into(), Role::Pod)]);
    }

    #[test]
    fn the_default_patterns_cover_the_common_pod_networks() {
        let default = roles(crate::cli::DEFAULT_POD_INTERFACES, crate::cli::DEFAULT_HOST_INTERFACES);
        // Calico, Cilium, flannel / bridge / kindnet / Weave, AWS VPC CNI, Azure CNI, GKE.
        for pod in [
            "cali0a1b2c3d4e5",
            "lxc12ab34cd",
            "veth9f8e7d6c",
            "vethwepl1234",
            "eni0a1b2c3d4e5",
            "azv0a1b2c3d",
            "gke1a2b3c4d5",
        ] {
            assert_eq!(default.assign(&[iface(7, pod, false, None)]).get(&7).map(|r| r.1), Some(Role::Pod), "{pod}");
        }
        for host in ["eth0", "ens5", "enp0s3", "eno1", "bond0", "flannel.1"] {
            assert_eq!(default.assign(&[iface(7, host, false, None)]).get(&7).map(|r| r.1), Some(Role::Host), "{host}");
        }
        // The node's own devices get nothing; nor do overlays not tested here.
        for other in ["vxlan.calico", "tunl0", "cilium_host", "lo", "docker0", "kube-ipvs0"] {
            assert!(default.assign(&[iface(7, other, false, None)]).is_empty(), "{other}");
        }
    }
}
