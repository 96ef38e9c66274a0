//! Running the system tools the lab is built with (iproute2, sysctl), with errors that say what failed.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs `program args…`, returning its stdout; fails with its stderr if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed? scripts/setup.sh installs it)"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args…`
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// `ip -n NS args…`
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Sets a sysctl inside a namespace.
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "exec", ns, "sysctl", "-qw", &format!("{key}={value}")]).map(drop)
}
