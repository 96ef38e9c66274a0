//! Keeps the TC programs attached to every pod-facing interface, including pods created after start-up.

use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId};

/// Which interfaces face pods: names matching any of these patterns (`*` matches any run of characters).
#[derive(Clone, Debug)]
pub struct InterfacePatterns(Vec<String>);

impl InterfacePatterns {
    #[must_use]
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob_match(p, name))
    }
}

fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else { return false };
            (0..=tail.len()).filter(|i| tail.is_char_boundary(*i)).any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

pub const INGRESS_PROGRAM: &str = "tc_pod_ingress";
pub const EGRESS_PROGRAM: &str = "tc_pod_egress";

struct Attached {
    name: String,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// The interfaces the programs are attached to, by ifindex.
#[derive(Default)]
pub struct Attachments {
    by_index: BTreeMap<u32, Attached>,
}

impl Attachments {
    /// Attaches to new matching interfaces and forgets those that are gone. Returns the names newly attached.
    pub fn refresh(&mut self, ebpf: &mut aya::Ebpf, patterns: &InterfacePatterns) -> anyhow::Result<Vec<String>> {
        let present: BTreeMap<u32, String> = nix::net::if_::if_nameindex()
            .context("listing network interfaces")?
            .iter()
            .filter_map(|i| Some((i.index(), i.name().to_str().ok()?.to_owned())))
            .filter(|(_, name)| patterns.matches(name))
            .collect();

        // A deleted interface took its TCX links with it; drop our handles. An index reused by a new
        // interface with another name is a new attachment.
        let stale: Vec<u32> =
            self.by_index.iter().filter(|(idx, a)| present.get(idx) != Some(&a.name)).map(|(idx, _)| *idx).collect();
        for idx in stale {
            let gone = self.by_index.remove(&idx).expect("listed above");
            drop(program(ebpf, INGRESS_PROGRAM)?.take_link(gone.ingress));
            drop(program(ebpf, EGRESS_PROGRAM)?.take_link(gone.egress));
            tracing::debug!(interface = %gone.name, "pod interface gone");
        }

        let mut added = Vec::new();
        for (idx, name) in present {
            if self.by_index.contains_key(&idx) {
                continue;
            }
            let ingress = program(ebpf, INGRESS_PROGRAM)?
                .attach(idx, TcAttachType::Ingress)
                .with_context(|| format!("attaching {INGRESS_PROGRAM} to {name}"))?;
            let egress = match program(ebpf, EGRESS_PROGRAM)?.attach(idx, TcAttachType::Egress) {
                Ok(id) => id,
                Err(e) => {
                    // Never leave an interface half-attached: DNAT without reverse NAT breaks every flow.
                    let _ = program(ebpf, INGRESS_PROGRAM)?.detach(ingress);
                    return Err(e).with_context(|| format!("attaching {EGRESS_PROGRAM} to {name}"));
                }
            };
            self.by_index.insert(idx, Attached { name: name.clone(), ingress, egress });
            added.push(name);
        }
        Ok(added)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.by_index.len()
    }
}

fn program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a TC classifier"))
}

/// Loads both TC programs into the kernel (the verifier runs here; its log is part of the error).
pub fn load_programs(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
        program(ebpf, name)?.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_shell_globs() {
        let p = InterfacePatterns::new(vec!["veth*".into(), "lxc*x".into(), "eth0".into()]);
        assert!(p.matches("veth12ab"));
        assert!(p.matches("veth"));
        assert!(p.matches("lxcABCx"));
        assert!(p.matches("eth0"));
        assert!(!p.matches("eth1"));
        assert!(!p.matches("lxcABC"));
        assert!(!p.matches("cali1"));
    }
}
