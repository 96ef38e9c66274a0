//! A fuzzer that holds every packet program of the real eBPF object to a reference, through
//! `BPF_PROG_TEST_RUN`: seeded, reproducible packets (Service flows of every frontend kind in both
//! directions, ICMP errors about them and about other flows, fragments in and out of order, IP options,
//! truncated and mutated headers, IPv6, VLAN, ARP, garbage), each run through the program it would meet
//! on a node, and the program's verdict and output packet compared with what [`scenario`] says it must be:
//! for packets that are not a Service's, not one bit changed; for translated ones, exactly the reference's
//! addresses and ports with every checksum recomputed in full from the content ([`wire`]).
//!
//! The programs run in a network namespace of the fuzzer's own (see [`fuzz`]): one veth pair, both ends
//! inside it, with a route to the remote backends and external clients through a neighbour of fixed MAC,
//! so XDP's FIB lookups succeed and its `XDP_TX` paths are exercised; a test run never transmits, and the
//! namespace goes with the fuzzer's thread. The socket programs take no packets and are not run here;
//! the lab tests cover them with real sockets.

pub mod scenario;
pub mod wire;
pub mod world;

use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use rand::{SeedableRng as _, rngs::SmallRng};

use crate::bpf::PrivateBpffs;

/// A packet program of the object, where it sits on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Prog {
    PodIngress,
    PodEgress,
    HostIngress,
    HostEgress,
    Xdp,
    XdpPass,
}

impl Prog {
    pub const ALL: [Self; 6] =
        [Self::PodIngress, Self::PodEgress, Self::HostIngress, Self::HostEgress, Self::Xdp, Self::XdpPass];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::PodIngress => "tc_pod_ingress",
            Self::PodEgress => "tc_pod_egress",
            Self::HostIngress => "tc_host_ingress",
            Self::HostEgress => "tc_host_egress",
            Self::Xdp => "xdp_host",
            Self::XdpPass => "xdp_pass",
        }
    }

    #[must_use]
    pub fn is_xdp(self) -> bool {
        matches!(self, Self::Xdp | Self::XdpPass)
    }

    /// The verdict that passes a packet on: `TC_ACT_OK` or `XDP_PASS`.
    #[must_use]
    pub fn pass(self) -> u32 {
        if self.is_xdp() { XDP_PASS } else { TC_ACT_OK }
    }

    /// The verdict that drops it: `TC_ACT_SHOT` or `XDP_DROP`.
    #[must_use]
    pub fn drop(self) -> u32 {
        if self.is_xdp() { XDP_DROP } else { TC_ACT_SHOT }
    }
}

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
/// `sizeof(struct __sk_buff)` and the offset of `mark` in it.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_IFINDEX_OFF: usize = 40;
/// `sizeof(struct xdp_md)`, and the offsets of `data_end` and `ingress_ifindex` in it.
const XDP_CTX_LEN: usize = 24;
const XDP_DATA_END_OFF: usize = 4;
const XDP_IFINDEX_OFF: usize = 12;
/// The fuzzer namespace's uplink (its MAC) and the neighbour every route goes through.
pub const UPLINK: &str = "fz0";
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
/// The (locked) MTU of the namespace's routes: XDP must leave a bigger packet to the stack, which owes its
/// sender "fragmentation needed".
pub const ROUTE_MTU: usize = 1400;

/// One packet for one program: what the reference calls it, where it goes, `skb->mark` on the way in.
#[derive(Clone, Copy)]
pub struct Probe<'a> {
    pub class: &'static str,
    pub prog: Prog,
    pub mark: u32,
    pub input: &'a [u8],
}

impl<'a> Probe<'a> {
    #[must_use]
    pub fn new(class: &'static str, prog: Prog, mark: u32, input: &'a [u8]) -> Self {
        Self { class, prog, mark, input }
    }
}

/// What a program did with one packet.
#[derive(Clone, Debug)]
pub struct Ran {
    pub verdict: u32,
    pub packet: Vec<u8>,
    /// `skb->mark` after the run (TC only).
    pub mark: u32,
}

/// A packet whose outcome differed from the reference.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub class: &'static str,
    pub prog: Prog,
    pub mark_in: u32,
    pub input: Vec<u8>,
    pub got: Ran,
    pub expected: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} through {} (mark in {:#x}):", self.class, self.prog.name(), self.mark_in)?;
        writeln!(f, "input:\n{}", wire::hex(&self.input))?;
        writeln!(f, "got verdict {} mark {:#x}:\n{}", self.got.verdict, self.got.mark, wire::hex(&self.got.packet))?;
        write!(f, "expected: {}", self.expected)
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub packets: u64,
    /// Inputs the kernel refused to run (shorter than an Ethernet header).
    pub refused: u64,
    pub by_class: BTreeMap<&'static str, u64>,
    pub by_prog: BTreeMap<Prog, u64>,
    pub mismatches: u64,
    pub mismatches_by_class: BTreeMap<&'static str, u64>,
    /// The first few mismatches, whole.
    pub first_mismatches: Vec<Mismatch>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} packets, {} mismatches, {} refused by the kernel",
            self.packets, self.mismatches, self.refused
        )?;
        for (prog, n) in &self.by_prog {
            writeln!(f, "  {:<16} {n}", prog.name())?;
        }
        for (class, n) in &self.by_class {
            match self.mismatches_by_class.get(class) {
                Some(bad) => writeln!(f, "  {class:<44} {n:>9}  MISMATCHED {bad}")?,
                None => writeln!(f, "  {class:<44} {n:>9}")?,
            }
        }
        for m in &self.first_mismatches {
            writeln!(f, "\n{m}")?;
        }
        Ok(())
    }
}

/// The loaded object, its maps programmed with [`world::frontends`], and the reference's bookkeeping.
pub struct Fuzzer {
    ebpf: Ebpf,
    pins: PrivateBpffs,
    object: std::path::PathBuf,
    pub rng: SmallRng,
    pub report: Report,
    pub frontends: Vec<world::Frontend>,
    /// The interface XDP runs on.
    uplink: u32,
    /// Client (address, port) pairs used since the object was last loaded: each flow gets a fresh one, so
    /// no two live flows of a run share a client tuple. (Two flows from one client port to two Services of
    /// one backend would rightly have the second's port remapped by conntrack, which this model of the
    /// path does not predict; the lab's `dig` test covers that case with real traffic.)
    used_clients: std::collections::HashSet<(std::net::Ipv4Addr, u16)>,
}

/// Scenarios between two fresh loads of the object: every scenario uses fresh client tuples, and a fresh
/// load clears the LRU maps (conntrack, SNAT, fragments) long before any of them fills up.
const SCENARIOS_PER_LOAD: u64 = 20_000;

impl Fuzzer {
    /// A client tuple from `draw` that no flow since the last load has used.
    pub fn fresh_client(
        &mut self,
        mut draw: impl FnMut(&mut SmallRng) -> (std::net::Ipv4Addr, u16),
    ) -> (std::net::Ipv4Addr, u16) {
        loop {
            let client = draw(&mut self.rng);
            if self.used_clients.insert(client) {
                return client;
            }
        }
    }

    fn load(object: &std::path::Path, pins: &PrivateBpffs, frontends: &[world::Frontend]) -> anyhow::Result<Ebpf> {
        // Each load gets maps of its own: clear the pins of the previous one.
        // (A bpffs may also hold the kernel's own `maps.debug` and `progs.debug`, which stay.)
        for entry in std::fs::read_dir(pins.path())? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "debug") {
                std::fs::remove_file(&path).with_context(|| format!("removing pin {}", path.display()))?;
            }
        }
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins.path()).load_file(object)?;
        for prog in Prog::ALL {
            let program = ebpf.program_mut(prog.name()).with_context(|| format!("{} missing", prog.name()))?;
            if prog.is_xdp() {
                let p: &mut Xdp = program.try_into()?;
                p.load().with_context(|| format!("loading {}", prog.name()))?;
            } else {
                let p: &mut SchedClassifier = program.try_into()?;
                p.load().with_context(|| format!("loading {}", prog.name()))?;
            }
        }
        world::program(&mut ebpf, frontends)?;
        Ok(ebpf)
    }

    pub fn new(seed: u64, pins: PrivateBpffs, uplink: u32) -> anyhow::Result<Self> {
        let object = crate::bpf::object()?;
        let frontends = world::frontends();
        let ebpf = Self::load(&object, &pins, &frontends)?;
        Ok(Self {
            ebpf,
            pins,
            object,
            rng: SmallRng::seed_from_u64(seed),
            report: Report::default(),
            frontends,
            uplink,
            used_clients: std::collections::HashSet::new(),
        })
    }

    /// Runs one packet through `prog` with `skb->mark` set to `mark`. `None` if the kernel refused the input.
    pub fn run(&mut self, prog: Prog, mark: u32, packet: &[u8]) -> Option<Ran> {
        self.report.packets += 1;
        *self.report.by_prog.entry(prog).or_default() += 1;
        let mut out = vec![0u8; packet.len() + 256];
        let program = self.ebpf.program(prog.name()).expect("loaded");
        let result = if prog.is_xdp() {
            let p: &Xdp = program.try_into().expect("xdp");
            let mut ctx_in = [0u8; XDP_CTX_LEN];
            let len = u32::try_from(packet.len()).expect("small packet");
            ctx_in[XDP_DATA_END_OFF..XDP_DATA_END_OFF + 4].copy_from_slice(&len.to_ne_bytes());
            ctx_in[XDP_IFINDEX_OFF..XDP_IFINDEX_OFF + 4].copy_from_slice(&self.uplink.to_ne_bytes());
            p.test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ..TestRunOptions::default()
            })
            .map(|r| (r, 0))
        } else {
            let p: &SchedClassifier = program.try_into().expect("classifier");
            let mut ctx_in = [0u8; SKB_CTX_LEN];
            ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
            // The packet arrives on the uplink: FIB lookups (for untracked fragments) ask from there.
            ctx_in[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&self.uplink.to_ne_bytes());
            let mut ctx_out = [0u8; SKB_CTX_LEN];
            let r = p.test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            });
            r.map(|r| {
                let mark = u32::from_ne_bytes(ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4].try_into().expect("4 bytes"));
                (r, mark)
            })
        };
        let Ok((r, mark)) = result else {
            self.report.refused += 1;
            return None;
        };
        out.truncate(r.data_size_out as usize);
        Some(Ran { verdict: r.return_value, packet: out, mark })
    }

    /// The drops the data path has counted so far, over every reason and CPU.
    #[must_use]
    pub fn drops_counted(&self) -> u64 {
        let map = self.ebpf.map(proxy_common::maps::DROPS).expect("DROPS");
        let drops: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map).expect("a per-CPU array");
        (0..proxy_common::drop::COUNT).map(|i| drops.get(&i, 0).map_or(0, |v| v.iter().sum::<u64>())).sum()
    }

    /// Records a packet's outcome against the reference: `ok` if they agree.
    pub fn check(&mut self, probe: &Probe<'_>, got: &Ran, ok: bool, expected: impl FnOnce() -> String) {
        *self.report.by_class.entry(probe.class).or_default() += 1;
        if ok {
            return;
        }
        self.report.mismatches += 1;
        *self.report.mismatches_by_class.entry(probe.class).or_default() += 1;
        if self.report.first_mismatches.len() < 5
            && !self.report.first_mismatches.iter().any(|m| m.class == probe.class)
        {
            self.report.first_mismatches.push(Mismatch {
                class: probe.class,
                prog: probe.prog,
                mark_in: probe.mark,
                input: probe.input.to_vec(),
                got: got.clone(),
                expected: expected(),
            });
        }
    }

    /// Runs scenarios until at least `packets` packets have gone through the programs.
    pub fn run_packets(&mut self, packets: u64) -> anyhow::Result<()> {
        let mut scenarios = 0u64;
        while self.report.packets < packets {
            if scenarios > 0 && scenarios.is_multiple_of(SCENARIOS_PER_LOAD) {
                self.ebpf = Self::load(&self.object, &self.pins, &self.frontends)?;
                self.used_clients.clear();
            }
            scenario::one(self);
            scenarios += 1;
        }
        Ok(())
    }
}

/// Runs `packets` packets from `seed` in a network namespace of the fuzzer's own, and returns the report.
pub fn fuzz(seed: u64, packets: u64) -> anyhow::Result<Report> {
    crate::bpf::object()?;
    let pins = PrivateBpffs::mount()?;
    std::thread::spawn(move || -> anyhow::Result<Report> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("a network namespace for the fuzzer")?;
        let uplink = build_namespace()?;
        scenario::reset_ip_ids();
        let mut fuzzer = Fuzzer::new(seed, pins, uplink)?;
        fuzzer.run_packets(packets)?;
        Ok(fuzzer.report)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the fuzzer's thread panicked"))?
}

/// Builds the fuzzer's namespace (the calling thread's own, fresh): the uplink at the node's address with
/// routes to the remote backends and the external clients through one neighbour. Returns the uplink's
/// ifindex. Commands started from this thread run in its namespace.
fn build_namespace() -> anyhow::Result<u32> {
    use crate::cmd::run;
    let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let node = format!("{}/24", world::NODE);
    let hop = "10.240.0.12";
    run("ip", &["link", "add", UPLINK, "address", &mac(UPLINK_MAC), "type", "veth", "peer", "name", "fz1"])?;
    run("ip", &["link", "set", UPLINK, "up"])?;
    // The FIB lookup of a forwarding path answers only for an interface that forwards.
    run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    run("ip", &["link", "set", "fz1", "up"])?;
    run("ip", &["addr", "add", &node, "dev", UPLINK])?;
    run("ip", &["neigh", "replace", hop, "lladdr", &mac(NEXT_HOP_MAC), "dev", UPLINK, "nud", "permanent"])?;
    // A node's default route: a packet to a Service address nobody translated would leave by it.
    run("ip", &["route", "add", "default", "via", hop, "dev", UPLINK])?;
    let mtu = ROUTE_MTU.to_string();
    for net in ["10.200.2.0/24", "203.0.113.0/24", "198.51.100.0/24"] {
        run("ip", &["route", "add", net, "via", hop, "dev", UPLINK, "mtu", "lock", &mtu])?;
    }
    Ok(nix::net::if_::if_nametoindex(UPLINK)?)
}
