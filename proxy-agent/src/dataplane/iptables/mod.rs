//! The iptables fallback dataplane: kube-proxy's own chain layout and names, so `iptables-save | grep KUBE`
//! reads as users know it. Applied with `iptables-restore --noflush`, atomically per table, rewriting only
//! the chains that changed.

pub mod naming;
pub mod print;

use std::process::Command;

use anyhow::{Context as _, bail};

use super::ApplyStats;
use super::netfilter::{
    self, Family,
    dataplane::{Backend, NetfilterDataplane, Previous},
    plan::Plan,
};
use print::{Chains, Ruleset};

/// Jumps from the built-in chains into kube-proxy's, as kube-proxy installs them. Each is inserted at the top
/// of its chain, so a chain holds them in the reverse of this order: the ClusterIPs check, listed first,
/// runs after the filter `KUBE-SERVICES` rules (a Service port's own DROP or REJECT decides first).
const HOOKS: &[(&str, &str, &str)] = &[
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
    ("filter", "INPUT", "-m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"cluster IPs check\" -j KUBE-CLUSTER-IPS-CHECK",
    ),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"cluster IPs check\" -j KUBE-CLUSTER-IPS-CHECK",
    ),
    ("filter", "OUTPUT", "-m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
];

/// kube-proxy's iptables layout, applied with `iptables-restore`.
pub struct Iptables;

pub type IptablesDataplane = NetfilterDataplane<Iptables>;

/// The family's tool: `iptables`, `iptables-save`, `iptables-restore`, or their `ip6tables` twins.
fn tool(family: Family, suffix: &str) -> String {
    format!("{}{suffix}", if family.is_ipv6() { "ip6tables" } else { "iptables" })
}

fn iptables(family: Family, args: &[&str]) -> anyhow::Result<bool> {
    let program = tool(family, "");
    let out = Command::new(&program)
        .arg("-w")
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    Ok(out.status.success())
}

/// kube-proxy's chains as installed now, from `iptables-save` (or `ip6tables-save`).
fn installed(family: Family, table: &str) -> anyhow::Result<Chains> {
    let program = tool(family, "-save");
    let out = Command::new(&program).args(["-t", table]).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} -t {table} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(parse_save(&String::from_utf8_lossy(&out.stdout)))
}

/// The chains of an `iptables-save` dump this mode owns ([`print::is_owned`]), and their rules.
fn parse_save(dump: &str) -> Chains {
    let mut chains = Chains::new();
    for line in dump.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if print::is_owned(name) {
                chains.entry(name.to_owned()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let name = rule.split_whitespace().next().unwrap_or_default();
            if let Some(rules) = chains.get_mut(name) {
                rules.push(line.to_owned());
            }
        }
    }
    chains
}

/// kube-proxy's cleanup for iptables: removes the jumps from the built-in chains and every chain it owns
/// ([`print::is_owned`]; kubelet's `KUBE-` chains stay).
/// Used when another mode starts, so two dataplanes never translate the same packets. Missing iptables or
/// missing chains are not errors.
pub fn cleanup() -> anyhow::Result<usize> {
    let mut removed = 0;
    for family in Family::ALL {
        removed += cleanup_family(family)?;
    }
    Ok(removed)
}

fn cleanup_family(family: Family) -> anyhow::Result<usize> {
    use std::fmt::Write as _;
    if Iptables::usable(family).is_err() {
        return Ok(0);
    }
    for (table, chain, rule) in HOOKS {
        let words = shell_words(rule);
        let mut delete = vec!["-t", table, "-D", chain];
        delete.extend(words.iter().map(String::as_str));
        while iptables(family, &delete)? {}
    }
    let mut input = String::new();
    let mut removed = 0;
    for table in ["nat", "filter"] {
        let chains = installed(family, table)?;
        if chains.is_empty() {
            continue;
        }
        let _ = writeln!(input, "*{table}");
        for name in chains.keys() {
            let _ = writeln!(input, ":{name} - [0:0]");
        }
        for name in chains.keys() {
            let _ = writeln!(input, "-X {name}");
        }
        let _ = writeln!(input, "COMMIT");
        removed += chains.len();
    }
    if removed > 0 {
        Iptables::commit(family, &input)?;
    }
    Ok(removed)
}

/// Whether kube-proxy's iptables layout (ours or kube-proxy's own) is installed: `KUBE-SERVICES` in the
/// nat table, which every Service's rules hang off.
pub fn installed_here() -> bool {
    Command::new("iptables").args(["-w", "-t", "nat", "-S", "KUBE-SERVICES"]).output().is_ok_and(|o| o.status.success())
}

/// Whether kube-proxy's IPv6 iptables layout (ours or kube-proxy's own) is installed.
pub fn ipv6_installed_here() -> bool {
    Command::new("ip6tables")
        .args(["-w", "-t", "nat", "-S", "KUBE-SERVICES"])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Iptables {
    /// Creates kube-proxy's fixed chains if needed and makes sure the built-in chains jump to them.
    fn ensure_hooks(family: Family) -> anyhow::Result<()> {
        for (table, chains) in [("nat", &print::NAT_FIXED[..]), ("filter", &print::FILTER_FIXED[..])] {
            for chain in chains {
                if !iptables(family, &["-t", table, "-S", chain])? {
                    iptables(family, &["-t", table, "-N", chain])?;
                }
            }
        }
        let mut missing = false;
        for (table, chain, rule) in HOOKS {
            let mut check = vec!["-t", table, "-C", chain];
            let words = shell_words(rule);
            check.extend(words.iter().map(String::as_str));
            missing |= !iptables(family, &check)?;
        }
        if !missing {
            return Ok(());
        }
        // Some jump is missing (a first start, an upgrade that added one, someone's flush): all of them are
        // laid again, so their order is this build's whatever was there before.
        for (table, chain, rule) in HOOKS {
            let words = shell_words(rule);
            let mut delete = vec!["-t", table, "-D", chain];
            delete.extend(words.iter().map(String::as_str));
            while iptables(family, &delete)? {}
        }
        for (table, chain, rule) in HOOKS {
            let words = shell_words(rule);
            let mut insert = vec!["-t", table, "-I", chain];
            insert.extend(words.iter().map(String::as_str));
            if !iptables(family, &insert)? {
                bail!("could not hook {table}/{chain}: {} -t {table} -I {chain} {rule}", tool(family, ""));
            }
        }
        Ok(())
    }
}

/// Splits a rule into arguments, keeping double-quoted comments whole.
fn shell_words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The `iptables-restore --noflush` input for one table: changed and new chains are declared (which
/// flushes them) and refilled; chains no longer wanted are flushed and deleted. Unchanged chains are left
/// alone. Counts (written, deleted) rules.
fn restore_input(table: &str, old: Option<&Chains>, new: &Chains, out: &mut String) -> (usize, usize) {
    use std::fmt::Write as _;
    let (mut written, mut deleted) = (0, 0);
    let changed: Vec<(&String, &Vec<String>)> =
        new.iter().filter(|(name, rules)| old.and_then(|o| o.get(*name)) != Some(rules)).collect();
    let gone: Vec<(&String, &Vec<String>)> =
        old.into_iter().flatten().filter(|(name, _)| !new.contains_key(*name)).collect();
    if changed.is_empty() && gone.is_empty() {
        return (0, 0);
    }
    let _ = writeln!(out, "*{table}");
    for (name, _) in changed.iter().chain(&gone) {
        let _ = writeln!(out, ":{name} - [0:0]");
    }
    // Rules first (they may jump to new chains), deletions last (nothing refers to them any more).
    for (name, rules) in &changed {
        for rule in *rules {
            let _ = writeln!(out, "{rule}");
        }
        written += rules.len();
        deleted += old.and_then(|o| o.get(*name)).map_or(0, Vec::len);
    }
    for (name, rules) in &gone {
        let _ = writeln!(out, "-X {name}");
        deleted += rules.len();
    }
    let _ = writeln!(out, "COMMIT");
    (written, deleted)
}

impl Backend for Iptables {
    type Ruleset = Ruleset;
    /// `iptables-save` gives every rule back as it was printed: what the kernel holds is exact.
    type Installed = Ruleset;
    const NAME: &'static str = "iptables";

    fn print(plan: &Plan) -> Ruleset {
        print::print(plan)
    }

    fn usable(family: Family) -> Result<(), String> {
        let program = tool(family, "");
        match Command::new(&program).args(["-w", "-t", "nat", "-S", "POSTROUTING"]).output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!("{program} -t nat failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
            Err(e) => Err(format!("running {program}: {e}")),
        }
    }

    fn installed(family: Family) -> anyhow::Result<Ruleset> {
        Self::ensure_hooks(family)?;
        Ok(Ruleset { nat: installed(family, "nat")?, filter: installed(family, "filter")? })
    }

    fn transaction(_: Family, old: &Previous<'_, Self>, new: &Ruleset) -> (String, ApplyStats) {
        let (Previous::Applied(old) | Previous::Installed(old)) = old;
        let mut input = String::new();
        let (w1, d1) = restore_input("nat", Some(&old.nat), &new.nat, &mut input);
        let (w2, d2) = restore_input("filter", Some(&old.filter), &new.filter, &mut input);
        (input, ApplyStats { writes: w1 + w2, deletes: d1 + d2 })
    }

    fn commit(family: Family, input: &str) -> anyhow::Result<()> {
        // iptables-restore commits each table whole or not at all.
        netfilter::run_with_input(&tool(family, "-restore"), &["-w", "--noflush"], input)
    }

    fn occupancy(r: &Ruleset) -> Vec<(&'static str, usize)> {
        vec![
            ("iptables-nat-rules", r.nat.values().map(Vec::len).sum()),
            ("iptables-filter-rules", r.filter.values().map(Vec::len).sum()),
        ]
    }
}

#[cfg(test)]
mod tests;
