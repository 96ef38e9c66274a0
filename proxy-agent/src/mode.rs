//! Choosing the dataplane for `--mode auto`: eBPF where the kernel can run it, otherwise nftables where it
//! works, otherwise iptables.

use crate::cli::Mode;

/// Whether this kernel runs the eBPF dataplane: TCX (Linux 6.6) for the TC programs, and a `bpf()` syscall
/// that loads a TC program (probed; fails without the privileges or with BPF disabled).
fn ebpf_usable() -> Result<(), String> {
    let release = nix::sys::utsname::uname().map_err(|e| format!("uname: {e}"))?;
    let release = release.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < (6, 6) {
        return Err(format!("kernel {release} is older than 6.6 (no TCX)"));
    }
    match aya::sys::is_program_supported(aya::programs::ProgramType::SchedClassifier) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the kernel cannot load TC programs".into()),
        Err(e) => Err(format!("probing for BPF support failed: {e}")),
    }
}

/// The mode to run, and why (exported as the mode metric's `reason`).
#[must_use]
pub fn choose(requested: Mode) -> (Mode, &'static str) {
    match requested {
        Mode::Ebpf => (Mode::Ebpf, "requested"),
        Mode::Iptables => (Mode::Iptables, "requested"),
        Mode::Nftables => (Mode::Nftables, "requested"),
        // kube-proxy's IPVS mode: there is no IPVS here, and the eBPF dataplane plays the part IPVS played
        // (a kernel hash lookup per packet instead of a rule walk).
        Mode::Ipvs => {
            tracing::warn!("mode ipvs: no IPVS here; the eBPF dataplane serves in its place");
            (Mode::Ebpf, "ipvs requested: eBPF in its place")
        }
        Mode::Auto => {
            let ebpf = match ebpf_usable() {
                Ok(()) => return (Mode::Ebpf, "auto: the kernel runs eBPF"),
                Err(why) => why,
            };
            match crate::dataplane::nftables::usable() {
                Ok(()) => {
                    tracing::warn!(reason = %ebpf, "auto: eBPF unavailable, using nftables");
                    (Mode::Nftables, "auto: eBPF unavailable")
                }
                Err(nft) => {
                    tracing::warn!(ebpf = %ebpf, nftables = %nft, "auto: eBPF and nftables unavailable, using iptables");
                    (Mode::Iptables, "auto: eBPF and nftables unavailable")
                }
            }
        }
    }
}
