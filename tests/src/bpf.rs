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
