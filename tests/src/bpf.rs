//! Running the data path's programs on crafted packets with `BPF_PROG_TEST_RUN`, for what real sockets
//! cannot show: protocols this kernel has no sockets for (SCTP), and exact packet bytes.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use crate::cmd::run;

/// The eBPF object: `PROXY_EBPF_OBJECT` if set (`cargo xtask test` sets it), otherwise built now by
/// `cargo xtask build-ebpf`.
pub fn object() -> anyhow::Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    crate::build::artifact(
        &PATH,
        "PROXY_EBPF_OBJECT",
        &["xtask", "build-ebpf"],
        "bpfel-unknown-none/release/proxy-ebpf",
    )
}

/// A bpffs of the test's own for the object's pinned maps; unmounted and removed on drop.
pub struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    pub fn mount() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        run("mount", &["-t", "bpf", "bpffs", &dir.path().to_string_lossy()])?;
        Ok(Self { dir })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[&self.dir.path().to_string_lossy()]) {
            eprintln!("bpffs teardown: {e:#}");
        }
    }
}

/// The Internet checksum of `bytes` (RFC 1071).
#[must_use]
pub fn inet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// `CRC32c` (Castagnoli), as SCTP uses it.
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// The object loaded with the TC programs `programs` loaded, its maps pinned in a bpffs of its own, and
/// the IPv6 tail-call table filled with those of the IPv6 programs among them, as the agent fills it
/// (slots as `proxy-ebpf/src/service_path.rs` numbers them), so a frame sent to an IPv4-hook program
/// takes the same way as on an interface.
///
/// # Errors
/// When the object cannot be built or loaded, or a program does not verify.
pub fn load_tc(programs: &[&str]) -> anyhow::Result<(aya::Ebpf, PrivateBpffs)> {
    use anyhow::Context as _;
    use aya::programs::SchedClassifier;
    const IPV6_SLOTS: [(u32, &str); 4] =
        [(0, "tc_pod_ingress6"), (1, "tc_pod_egress6"), (2, "tc_host_ingress6"), (3, "tc_host_egress6")];
    let pins = PrivateBpffs::mount()?;
    let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(pins.path()).load_file(object()?)?;
    for name in programs {
        let prog: &mut SchedClassifier =
            ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    let mut fds = Vec::new();
    for (slot, name) in IPV6_SLOTS.iter().filter(|(_, name)| programs.contains(name)) {
        let prog: &SchedClassifier = ebpf.program(name).with_context(|| format!("no program {name}"))?.try_into()?;
        fds.push((*slot, prog.fd()?.try_clone()?));
    }
    let mut table = aya::maps::ProgramArray::try_from(ebpf.map_mut("IPV6_PROGRAMS").context("no IPV6_PROGRAMS")?)?;
    for (slot, fd) in &fds {
        table.set(*slot, fd, 0)?;
    }
    Ok((ebpf, pins))
}

/// Runs `prog` once on `frame`: its verdict and the frame as it left.
///
/// # Errors
/// When the kernel refuses the test run.
pub fn run_once(prog: &aya::programs::SchedClassifier, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 64];
    let result =
        prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })?;
    out.truncate(usize::try_from(result.data_size_out)?);
    Ok((result.return_value, out))
}
