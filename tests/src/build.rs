//! Artifacts the lab needs from the workspace (the agent binary, the eBPF object): taken from an
//! environment variable when the caller built them (`cargo xtask test` does), otherwise built now with
//! cargo, which is a no-op when they are up to date, so a test never runs against a stale artifact.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context as _, bail};

/// Builds (once per process) with `cargo <args>` unless `env` names the artifact; returns its path, which
/// is `relative` under the target directory.
pub fn artifact(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    env: &str,
    args: &[&str],
    relative: &str,
) -> anyhow::Result<PathBuf> {
    cell.get_or_init(|| build(env, args, relative).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn build(env: &str, args: &[&str], relative: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(workspace)
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    Ok(target.join(relative))
}
