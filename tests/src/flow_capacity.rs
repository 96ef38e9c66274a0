//! How many concurrent flows the eBPF connection table holds with none lost.
//!
//! `flows` TCP flows from pods to a ClusterIP with ten backends, each opened by a SYN through the real
//! `tc_pod_ingress` program (`BPF_PROG_TEST_RUN`), with the table sized for `flows` as the agent sizes it
//! (`CONNTRACK` at two entries per flow). Then every flow's next segment (an ACK) goes through again: it
//! must reach the backend its SYN reached, from the flow's own entry — a flow whose entry was evicted
//! would be recorded afresh, which the data path's `CT_CREATED` counter shows. The map's memory is its
//! kernel accounting (`memlock` in the map's fdinfo).

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    time::Instant,
};

use anyhow::Context as _;
use aya::{
    EbpfLoader,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use proxy_common::{maps, stats};

use crate::{
    bpf::PrivateBpffs,
    fuzz::{
        wire::{Datagram, L4, ipv4_frame},
        world::{BackendDef, Frontend, Kind, program},
    },
};

/// What one measurement found.
#[derive(Clone, Copy, Debug)]
pub struct FlowCapacity {
    /// Flows opened.
    pub flows: u32,
    /// Flows whose entries were gone by their second packet.
    pub lost: u64,
    /// Second packets that reached another backend than their SYN.
    pub moved: u32,
    /// Entries in `CONNTRACK` after the first pass.
    pub entries: usize,
    /// `CONNTRACK`'s capacity and memory.
    pub capacity: u32,
    pub memlock_bytes: u64,
    /// Packets per second through the program, both passes.
    pub packets_per_second: f64,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 10);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SKB_CTX_LEN: usize = 192;

/// The client of flow `i`: addresses in 10.201.0.0/16, 50 000 ports each.
fn client(i: u32) -> (Ipv4Addr, u16) {
    let [_, _, hi, lo] = (i / 50_000).to_be_bytes();
    (Ipv4Addr::new(10, 201, hi, lo), u16::try_from(10_000 + i % 50_000).expect("below 60000"))
}

fn segment(i: u32, flags: u8) -> Vec<u8> {
    let (src, sport) = client(i);
    let dg = Datagram {
        src,
        dst: VIP,
        ttl: 64,
        id: 1,
        tos: 0,
        dont_fragment: true,
        options: Vec::new(),
        l4: L4::Tcp { sport, dport: 80, seq: 1, flags, payload: Vec::new() },
    };
    ipv4_frame(&dg.ip_bytes())
}

/// The IPv4 destination of a frame the program returned.
fn destination(frame: &[u8]) -> [u8; 4] {
    frame.get(30..34).and_then(|d| d.try_into().ok()).unwrap_or_default()
}

/// Every 1000 packets, moves the thread to the next CPU: real flows arrive on every CPU, and the kernel's
/// LRU keeps free entries per CPU, so a table must hold its flows whichever CPU adds them.
fn move_between_cpus(i: u32, cpus: usize) {
    if !i.is_multiple_of(1000) || cpus < 2 {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    let cpu = usize::try_from(i / 1000).unwrap_or(0) % cpus;
    // A CPU that is offline refuses the set; the thread then stays where it is.
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// `memlock` of the map behind `fd`, from `/proc/self/fdinfo`.
fn memlock(fd: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("memlock:")?.trim().parse().ok())
        .unwrap_or(0)
}

fn run(prog: &SchedClassifier, frame: &[u8], out: &mut [u8]) -> anyhow::Result<[u8; 4]> {
    let ctx_in = [0u8; SKB_CTX_LEN];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: Some(&ctx_in),
        ..TestRunOptions::default()
    })?;
    let n = usize::try_from(r.data_size_out)?.min(out.len());
    Ok(destination(&out[..n]))
}

/// Opens `flows` flows and sends each its second packet (see the module's text), in a network namespace
/// of its own (the programs send nothing; this keeps even their lookups off the host's).
pub fn measure(flows: u32) -> anyhow::Result<FlowCapacity> {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("a network namespace")?;
        measure_here(flows)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))?
}

fn measure_here(flows: u32) -> anyhow::Result<FlowCapacity> {
    let object = crate::bpf::object()?;
    let pins = PrivateBpffs::mount()?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
    // Sized as the agent sizes it (with its per-CPU headroom).
    let entries = proxy_common::capacity::lru_entries(flows, 2, u32::try_from(cpus)?);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.path())
        .map_max_entries(maps::CONNTRACK, entries)
        .load_file(&object)?;
    let backends: Vec<BackendDef> = (1..=10u8)
        .map(|k| BackendDef { id: u32::from(k), addr: Ipv4Addr::new(10, 200, 2, k), port: 8080, local: false })
        .collect();
    let web = Frontend {
        name: "web",
        kind: Kind::ClusterIp,
        addr: VIP,
        port: 80,
        proto: proxy_common::proto::TCP,
        rev_nat_id: 1,
        backends,
        masquerade_external: true,
        reject_when_empty: true,
        source_ranges: Vec::new(),
    };
    program(&mut ebpf, &[web])?;
    let prog: &mut SchedClassifier = ebpf.program_mut("tc_pod_ingress").context("tc_pod_ingress")?.try_into()?;
    prog.load()?;
    let prog: &SchedClassifier = ebpf.program("tc_pod_ingress").context("tc_pod_ingress")?.try_into()?;

    let started = Instant::now();
    let mut out = vec![0u8; 256];
    let mut first = Vec::with_capacity(flows as usize);
    for i in 0..flows {
        move_between_cpus(i, cpus);
        first.push(run(prog, &segment(i, SYN), &mut out)?);
    }
    let counters = |ebpf: &aya::Ebpf| -> anyhow::Result<u64> {
        let stats: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(ebpf.map("STATS").context("STATS")?)?;
        Ok(stats.get(&stats::CT_CREATED, 0)?.iter().sum())
    };
    let created_first = counters(&ebpf)?;
    let ct = ebpf.map(maps::CONNTRACK).context("CONNTRACK")?;
    let (capacity, memlock_bytes, held) = {
        let aya::maps::Map::LruHashMap(data) = ct else { anyhow::bail!("CONNTRACK is not an LRU hash") };
        let info = data.info()?;
        let held =
            aya::maps::HashMap::<_, proxy_common::conntrack::CtKey, proxy_common::conntrack::CtValue>::try_from(ct)?
                .keys()
                .count();
        (info.max_entries(), memlock(data.fd().as_fd().as_raw_fd()), held)
    };
    let prog: &SchedClassifier = ebpf.program("tc_pod_ingress").context("tc_pod_ingress")?.try_into()?;
    let mut moved = 0;
    for (i, dst) in (0..flows).zip(&first) {
        move_between_cpus(i, cpus);
        if run(prog, &segment(i, ACK), &mut out)? != *dst {
            moved += 1;
        }
    }
    let lost = counters(&ebpf)? - created_first;
    let seconds = started.elapsed().as_secs_f64();
    let packets_per_second = f64::from(flows) * 2.0 / seconds;
    Ok(FlowCapacity { flows, lost, moved, entries: held, capacity, memlock_bytes, packets_per_second })
}
