//! The IPv6 programs' tail-call table (`IPV6_PROGRAMS`): each TC program hands IPv6 packets to the IPv6
//! program of its hook (`tc_pod_ingress6`, ...), so each family's path has the BPF stack to itself.
//!
//! The kernel empties a program array once no file descriptor or pin refers to it, so the table must be
//! pinned to outlive the agent (the pinned links keep the programs running). It is this build's own: it is
//! filled at load and pinned beside the previous agent's table, and takes that table's pin only once this
//! build's programs are on the interfaces (at start, or when an upgrade swaps them in), so the previous
//! programs keep sending IPv6 packets to the previous IPv6 programs and maps until then.

use std::path::Path;

use anyhow::Context as _;

/// The map's name in the object, and its pin's under the pin directory.
pub const MAP: &str = "IPV6_PROGRAMS";

/// Slot → program, as `proxy-ebpf/src/service_path.rs` (`ipv6`) numbers them.
pub const PROGRAMS: [(u32, &str); 4] =
    [(0, "tc_pod_ingress6"), (1, "tc_pod_egress6"), (2, "tc_host_ingress6"), (3, "tc_host_egress6")];

pub struct Ipv6Programs {
    /// Where the table is pinned until this build's programs serve.
    staged: std::path::PathBuf,
    pinned: bool,
}

impl Ipv6Programs {
    /// Takes the table from the loaded object, fills it with the loaded IPv6 programs, and pins it beside
    /// the previous agent's table (`IPV6_PROGRAMS_new`): from here on a failed start cannot leave programs
    /// on an interface whose IPv6 table the kernel has emptied.
    pub fn fill(ebpf: &mut aya::Ebpf, dir: &Path) -> anyhow::Result<Self> {
        let map = ebpf.take_map(MAP).with_context(|| format!("map {MAP} missing from the eBPF object"))?;
        let mut map =
            aya::maps::ProgramArray::try_from(map).with_context(|| format!("map {MAP} has an unexpected type"))?;
        for (slot, name) in PROGRAMS {
            let prog: &aya::programs::SchedClassifier = ebpf
                .program(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a TC classifier"))?;
            let fd = prog.fd().with_context(|| format!("program {name} is not loaded"))?;
            map.set(slot, fd, 0).with_context(|| format!("putting {name} into {MAP}"))?;
        }
        // bpffs refuses dots in names.
        let staged = dir.join(format!("{MAP}_new"));
        let _ = std::fs::remove_file(&staged);
        map.pin(&staged).with_context(|| format!("pinning {MAP} at {}", staged.display()))?;
        Ok(Self { staged, pinned: false })
    }

    /// Once this build's programs are on the interfaces: the table takes the place of the previous
    /// agent's (a rename, which replaces that pin at once). Retried on the next call if it fails.
    pub fn pin(&mut self, dir: &Path) -> anyhow::Result<()> {
        if self.pinned {
            return Ok(());
        }
        let path = dir.join(MAP);
        std::fs::rename(&self.staged, &path)
            .with_context(|| format!("moving {} to {}", self.staged.display(), path.display()))?;
        self.pinned = true;
        Ok(())
    }
}
