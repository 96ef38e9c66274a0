//! Builds the eBPF object with the pinned nightly and bpf-linker, so the agent can never embed a stale or
//! missing one: cargo reruns this whenever proxy-ebpf or proxy-common changes.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let versions = root.join("scripts/versions.env");
    println!("cargo::rerun-if-changed={}", versions.display());
    println!("cargo::rerun-if-changed={}", root.join("proxy-common").display());
    let text = std::fs::read_to_string(&versions).with_context(|| format!("reading {}", versions.display()))?;
    let nightly = text
        .lines()
        .find_map(|l| l.strip_prefix("RUST_NIGHTLY="))
        .ok_or_else(|| anyhow!("RUST_NIGHTLY= missing from {}", versions.display()))?
        .trim()
        .to_owned();
    let ebpf_dir = root.join("proxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "proxy-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&nightly),
    )
    .with_context(|| {
        format!("building the eBPF object with {nightly} failed; run scripts/setup.sh to install the pinned toolchain and bpf-linker")
    })
}
