//! The IPv6 programs' tail-call tables: each TC program hands IPv6 packets to the IPv6 program of its hook
//! (`IPV6_PROGRAMS`: `tc_pod_ingress6`, ...), and the XDP program hands IPv6 frames to `xdp_host6`, which
//! hands its later steps on to two more (`XDP_IPV6_PROGRAMS`), so each family's path has the BPF stack to
//! itself.
//!
//! The kernel empties a program array once no file descriptor or pin refers to it, so a table must be
//! pinned to outlive the agent (the pinned links keep the programs running). The tables are this build's
//! own: filled at load and pinned beside the previous agent's, they take those tables' pins only once this
//! build's programs are on the interfaces (at start, or when an upgrade swaps them in), so the previous
//! programs keep sending IPv6 packets to the previous IPv6 programs and maps until then.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// A tail-call table: its map's name in the object (and its pin's under the pin directory), and the
/// program of each slot as `proxy-ebpf` numbers them.
pub struct Table {
    pub map: &'static str,
    pub programs: &'static [(u32, &'static str)],
}

/// The TC table (`proxy-ebpf/src/service_path.rs`, `ipv6`) and the XDP one (`xdp_host.rs`, `ipv6`).
pub const TABLES: [Table; 2] = [
    Table {
        map: "IPV6_PROGRAMS",
        programs: &[(0, "tc_pod_ingress6"), (1, "tc_pod_egress6"), (2, "tc_host_ingress6"), (3, "tc_host_egress6")],
    },
    Table { map: "XDP_IPV6_PROGRAMS", programs: &[(0, "xdp_host6"), (1, "xdp_host6_reply"), (2, "xdp_host6_snat")] },
];

/// Whether `map` is one of the tables (this build's own, never adopted from a previous agent).
pub fn is_table(map: &str) -> bool {
    TABLES.iter().any(|t| t.map == map)
}

/// The IPv6 programs of a table, by name.
pub fn programs(table: usize) -> impl Iterator<Item = &'static str> {
    TABLES[table].programs.iter().map(|(_, name)| *name)
}

/// Index of the TC table in [`TABLES`]; the XDP table's.
pub const TC: usize = 0;
pub const XDP: usize = 1;

pub struct Ipv6Programs {
    /// Each table's pin until this build's programs serve, and its final pin.
    staged: Vec<(PathBuf, PathBuf)>,
    pinned: bool,
}

impl Ipv6Programs {
    /// Takes the tables from the loaded object, fills them with the loaded IPv6 programs, and pins them
    /// beside the previous agent's tables (`IPV6_PROGRAMS_new`, ...): from here on a failed start cannot
    /// leave programs on an interface whose IPv6 tables the kernel has emptied.
    pub fn fill(ebpf: &mut aya::Ebpf, dir: &Path) -> anyhow::Result<Self> {
        let mut staged = Vec::new();
        for table in &TABLES {
            let name = table.map;
            let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
            let mut map =
                aya::maps::ProgramArray::try_from(map).with_context(|| format!("map {name} has an unexpected type"))?;
            for (slot, program) in table.programs {
                let fd = ebpf
                    .program(program)
                    .with_context(|| format!("program {program} missing from the eBPF object"))?
                    .fd()
                    .with_context(|| format!("program {program} is not loaded"))?;
                map.set(*slot, fd, 0).with_context(|| format!("putting {program} into {name}"))?;
            }
            // bpffs refuses dots in names.
            let path = dir.join(format!("{name}_new"));
            let _ = std::fs::remove_file(&path);
            map.pin(&path).with_context(|| format!("pinning {name} at {}", path.display()))?;
            staged.push((path, dir.join(name)));
        }
        Ok(Self { staged, pinned: false })
    }

    /// Once this build's programs are on the interfaces: the tables take the place of the previous
    /// agent's (renames, which replace those pins at once). Retried on the next call if one fails.
    pub fn pin(&mut self) -> anyhow::Result<()> {
        if self.pinned {
            return Ok(());
        }
        for (staged, path) in &self.staged {
            if staged.exists() || !path.exists() {
                std::fs::rename(staged, path)
                    .with_context(|| format!("moving {} to {}", staged.display(), path.display()))?;
            }
        }
        self.pinned = true;
        Ok(())
    }
}
