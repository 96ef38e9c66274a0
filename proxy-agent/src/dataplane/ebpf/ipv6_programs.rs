//! The IPv6 programs' tail-call table (`IPV6_PROGRAMS`): each TC program hands IPv6 packets to the IPv6
//! program of its hook (`tc_pod_ingress6`, ...), so each family's path has the BPF stack to itself.
//!
//! The kernel empties a program array once no file descriptor or pin refers to it, so the table must be
//! pinned to outlive the agent (the pinned links keep the programs running). It is this build's own: it is
//! filled at load, and pinned in place of the previous agent's table only once this build's programs are
//! on the interfaces (at start, or when an upgrade swaps them in), so the previous programs keep sending
//! IPv6 packets to the previous IPv6 programs and maps until then.

use std::path::Path;

use anyhow::Context as _;

/// The map's name in the object, and its pin's under the pin directory.
pub const MAP: &str = "IPV6_PROGRAMS";

/// Slot → program, as `proxy-ebpf/src/service_path.rs` (`ipv6`) numbers them.
pub const PROGRAMS: [(u32, &str); 4] =
    [(0, "tc_pod_ingress6"), (1, "tc_pod_egress6"), (2, "tc_host_ingress6"), (3, "tc_host_egress6")];

pub struct Ipv6Programs {
    /// Until pinned: pinning hands the map to its pin.
    map: Option<aya::maps::ProgramArray<aya::maps::MapData>>,
}

impl Ipv6Programs {
    /// Takes the table from the loaded object and fills it with the loaded IPv6 programs.
    pub fn fill(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
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
        Ok(Self { map: Some(map) })
    }

    /// Pins the table at `<dir>/IPV6_PROGRAMS`, replacing the previous agent's (once per agent).
    pub fn pin(&mut self, dir: &Path) -> anyhow::Result<()> {
        let Some(map) = self.map.take() else { return Ok(()) };
        let path = dir.join(MAP);
        // Pinned beside, then renamed over: the previous table stays referenced until this one replaces it.
        let fresh = dir.join(format!("{MAP}_new"));
        let _ = std::fs::remove_file(&fresh);
        map.pin(&fresh).with_context(|| format!("pinning {MAP} at {}", fresh.display()))?;
        std::fs::rename(&fresh, &path).with_context(|| format!("moving {} to {}", fresh.display(), path.display()))?;
        Ok(())
    }
}
