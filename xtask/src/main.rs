//! Developer and CI tasks: `cargo xtask <task>`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer and CI tasks for the service proxy")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (release, with BTF) with the pinned nightly, and check it.
    BuildEbpf,
    /// The whole test suite: formatting, clippy (userspace and eBPF), unit and lab tests. Needs root.
    Test,
    /// Bring up a small cluster in network namespaces and send real requests to its Services.
    Demo,
    /// A kind cluster without kube-proxy, the agent installed from deploy/, real traffic (tests/e2e/run.sh).
    /// Needs kind, kubectl and docker or podman; `E2E_MODE`, `E2E_ENGINE` and `E2E_KEEP` tune it.
    E2e,
    /// The benchmark on the lab (release builds): every mode at 1 to 100k Services, NodePort paths, the
    /// control plane; writes bench-results/ (report.md, SVG plots). Needs root. Arguments after `--` go to
    /// the benchmark (`--scales 1,1000`, `--modes ebpf,nftables`, `--repeats 3`, `--seconds 2`, `--tiny`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Generated packets through every packet program of the eBPF object (`BPF_PROG_TEST_RUN`), each held
    /// to the reference model (release build). `--packets N` (default 10 million), `--seed S`. Needs root.
    Fuzz {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::BuildEbpf => build_ebpf(&root).map(drop),
        Task::Test => test(&root),
        Task::Demo => demo(&root),
        Task::E2e => run(Command::new("bash").arg(root.join("tests/e2e/run.sh")).current_dir(&root)),
        Task::Bench { args } => bench(&root, &args),
        Task::Fuzz { args } => fuzz(&root, &args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// A pinned version from scripts/versions.env, the one place versions are written down.
fn pinned(root: &Path, key: &str) -> anyhow::Result<String> {
    let path = root.join("scripts/versions.env");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("{key}= missing from {}", path.display()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// `cargo` through rustup with the pinned nightly, for the bpfel-unknown-none target.
fn nightly_cargo(root: &Path) -> anyhow::Result<Command> {
    let nightly = pinned(root, "RUST_NIGHTLY")?;
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &nightly, "cargo"]).current_dir(root);
    // The outer cargo's toolchain must not leak into the nightly build.
    for key in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(key);
    }
    Ok(cmd)
}

const EBPF_FLAGS: &str = "-Cdebuginfo=2\x1f-Clink-arg=--btf";

fn build_ebpf(root: &Path) -> anyhow::Result<PathBuf> {
    let mut cmd = nightly_cargo(root)?;
    cmd.args([
        "build",
        "--package",
        "proxy-ebpf",
        "--bins",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .env("CARGO_ENCODED_RUSTFLAGS", EBPF_FLAGS);
    run(&mut cmd)?;
    let object = root.join("target/bpfel-unknown-none/release/proxy-ebpf");
    let bytes = std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    let sections = elf_section_names(&bytes).context("the eBPF object is not a valid ELF file")?;
    for wanted in [".BTF", "maps", "classifier"] {
        if !sections.iter().any(|s| s == wanted || s.starts_with(&format!("{wanted}/"))) {
            bail!("{} has no {wanted} section (sections: {sections:?})", object.display());
        }
    }
    eprintln!("xtask: eBPF object {} ({} bytes, with BTF)", object.display(), bytes.len());
    Ok(object)
}

/// Section names of a little-endian ELF64 file; enough to check the object carries BTF and its programs.
fn elf_section_names(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..4)? != b"\x7fELF" || elf.get(4)? != &2 {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let strtab = usize::try_from(u64_at(shoff + shstrndx * shentsize + 0x18)?).ok()?;
    (0..shnum)
        .map(|i| {
            let name_off = usize::try_from(u32_at(shoff + i * shentsize)?).ok()?;
            let start = strtab + name_off;
            let end = start + elf.get(start..)?.iter().position(|b| *b == 0)?;
            Some(String::from_utf8_lossy(elf.get(start..end)?).into_owned())
        })
        .collect()
}

fn require_root(task: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("`cargo xtask {task}` needs root: the lab creates network namespaces and loads eBPF programs");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn test(root: &Path) -> anyhow::Result<()> {
    require_root("test")?;
    run(Command::new("cargo").args(["fmt", "--all", "--check"]).current_dir(root))?;
    run(Command::new("cargo")
        .args(["clippy", "--workspace", "--exclude", "proxy-ebpf", "--all-targets", "--", "-D", "warnings"])
        .current_dir(root))?;
    let mut ebpf_clippy = nightly_cargo(root)?;
    ebpf_clippy
        .args([
            "clippy",
            "--package",
            "proxy-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_ENCODED_RUSTFLAGS", EBPF_FLAGS);
    run(&mut ebpf_clippy)?;
    let object = build_ebpf(root)?;
    // Built once here, so the lab's test binaries do not each run cargo again.
    run(Command::new("cargo").args(["build", "--package", "proxy-agent"]).current_dir(root))?;
    let mut totals = cargo_test(root, &object, &["--workspace", "--exclude", "proxy-ebpf"], &[])?;
    let mut add = |(passed, failed): (u64, u64)| {
        totals.0 += passed;
        totals.1 += failed;
    };
    // Parity: the lab's behaviour tests again, against each fallback dataplane.
    for mode in ["iptables", "nftables"] {
        add(cargo_test(root, &object, &parity_args(), &[("PROXY_LAB_MODE", mode)])?);
    }
    // The other pod topologies, in every mode: pods on a Linux bridge (flannel, the `bridge` plugin), and
    // that bridge with other nodes' pods across a VXLAN overlay (flannel's `vxlan` backend).
    for mode in ["ebpf", "iptables", "nftables"] {
        let env = [("PROXY_LAB_MODE", mode), ("PROXY_LAB_POD_NETWORK", "bridge")];
        add(cargo_test(root, &object, &BRIDGE_ARGS, &env)?);
        let env = [("PROXY_LAB_MODE", mode), ("PROXY_LAB_POD_NETWORK", "vxlan")];
        add(cargo_test(root, &object, &VXLAN_ARGS, &env)?);
    }
    println!("tests: {} passed, {} failed", totals.0, totals.1);
    if totals.1 > 0 {
        bail!("{} tests failed", totals.1);
    }
    if totals.0 == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// Lab tests that are not run again per fallback mode, and why.
const NOT_PER_MODE: [(&str, &str); 4] = [
    ("xdp_and_tc_paths_give_identical_results_for_external_traffic", "the fallback modes have no XDP path"),
    (
        "cluster_cidr_detects_pod_traffic_arriving_from_other_nodes",
        "a documented difference: the netfilter modes do not SNAT this flow (docs/semantics.md)",
    ),
    ("each_mode_removes_the_others_leftovers_and_reports_itself", "it switches through every mode itself"),
    ("an_invalid_config_file_stops_start_up_naming_field_and_value", "it stops before a dataplane starts"),
];

/// `cargo test` arguments for the bridge topology's run: the Service behaviour and kube-proxy's own
/// scenarios (the others exercise the dataplane's handling of packets, which the topology does not change).
const BRIDGE_ARGS: [&str; 10] = [
    "--package",
    "proxy-lab",
    "--test",
    "service_semantics",
    "--test",
    "kube_proxy_conformance",
    "--test",
    "clusterip",
    "--test",
    "dual_stack",
];

/// `cargo test` arguments for the overlay's run: the Service behaviour and dual-stack suites (the overlay
/// carries both families), less two eBPF-only tests that
/// assume a routed underlay: XDP cannot forward a flow that leaves by another interface (the overlay
/// device), so it hands them all to TC; and the cluster-CIDR test expects the node's own address as the
/// masquerade source, where the overlay device's is right.
const VXLAN_ARGS: [&str; 11] = [
    "--package",
    "proxy-lab",
    "--test",
    "service_semantics",
    "--test",
    "dual_stack",
    "--",
    "--skip",
    "xdp_and_tc_paths_give_identical_results_for_external_traffic",
    "--skip",
    "cluster_cidr_detects_pod_traffic_arriving_from_other_nodes",
];

/// `cargo test` arguments for a parity run: the behaviour test binaries, less [`NOT_PER_MODE`].
fn parity_args() -> Vec<&'static str> {
    let mut args = vec!["--package", "proxy-lab"];
    for test in [
        "clusterip",
        "service_semantics",
        "restart",
        "operations",
        "packet_classes",
        "real_clients",
        "flow_lifetimes",
        "kube_proxy_conformance",
        "pod_networks",
        "dual_stack",
        "sctp",
    ] {
        args.extend(["--test", test]);
    }
    args.push("--");
    for (test, _why) in NOT_PER_MODE {
        args.extend(["--skip", test]);
    }
    args
}

/// Runs the tests, passing their output through; returns the passed and failed counts of every test
/// binary, which `test` totals on the suite's last line. `env` sets the lab's dataplane and topology.
fn cargo_test(root: &Path, object: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};

    let mut cmd = Command::new("cargo");
    cmd.envs(env.iter().copied());
    cmd.arg("test")
        .args(args)
        .current_dir(root)
        .env("PROXY_AGENT_BIN", root.join("target/debug/proxy-agent"))
        .env("PROXY_EBPF_OBJECT", object)
        .stdout(std::process::Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.spawn().context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        bail!("cargo test failed ({status})");
    }
    Ok((passed, failed))
}

/// The number just before `label` in a `test result:` line, e.g. `5` in `ok. 5 passed; 0 failed`.
fn count_before(line: &str, label: &str) -> u64 {
    line.split_once(label)
        .and_then(|(before, _)| before.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn bench(root: &Path, args: &[String]) -> anyhow::Result<()> {
    require_root("bench")?;
    let object = build_ebpf(root)?;
    run(Command::new("cargo").args(["build", "--release", "--package", "proxy-agent"]).current_dir(root))?;
    run(Command::new("cargo")
        .args(["run", "--release", "--package", "proxy-lab", "--bin", "bench", "--"])
        .args(args)
        .current_dir(root)
        .env("PROXY_AGENT_BIN", root.join("target/release/proxy-agent"))
        .env("PROXY_EBPF_OBJECT", object))
}

fn fuzz(root: &Path, args: &[String]) -> anyhow::Result<()> {
    require_root("fuzz")?;
    let object = build_ebpf(root)?;
    run(Command::new("cargo")
        .args(["run", "--release", "--package", "proxy-lab", "--bin", "fuzz", "--"])
        .args(args)
        .current_dir(root)
        .env("PROXY_EBPF_OBJECT", object))
}

fn demo(root: &Path) -> anyhow::Result<()> {
    require_root("demo")?;
    run(Command::new("cargo").args(["run", "--quiet", "--package", "proxy-lab", "--bin", "demo"]).current_dir(root))
}
