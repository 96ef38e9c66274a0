//! The nftables fallback dataplane: one table of its own (`ip proxy-agent`) whose verdict maps find a
//! Service in one lookup. Every change is one `nft -f` transaction, so traffic sees the old ruleset or the
//! new one and never a mix, and only what changed is written: map elements added or removed, changed chains
//! flushed and refilled, chains no longer wanted deleted.

pub mod naming;
pub mod print;

use std::{collections::BTreeSet, fmt::Write as _, process::Command};

use anyhow::{Context as _, bail};

use super::{
    ApplyStats,
    netfilter::{
        self, Family,
        dataplane::{Backend, NetfilterDataplane, Previous},
        plan::Plan,
    },
};
use print::{Ruleset, TABLE_NAME, nft_family};

/// Tables removed when another mode starts, and on cleanup: this mode's own, and kube-proxy's nftables-mode
/// tables.
const LEFTOVER_TABLES: [(&str, &str); 4] =
    [("ip", TABLE_NAME), ("ip6", TABLE_NAME), ("ip", "kube-proxy"), ("ip6", "kube-proxy")];

/// One table of our own, applied with `nft -f`.
pub struct Nftables;

pub type NftablesDataplane = NetfilterDataplane<Nftables>;

/// The names of what the table holds now, read from the kernel.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub chains: BTreeSet<String>,
    pub maps: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

fn nft(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new("nft").args(args).output().context("running nft (is it installed?)")
}

/// The names of `kind` (`chain`, `map`, `set`) declared in our table, from `nft -j list chains|maps|sets`
/// of the table's family.
///
/// # Errors
/// When the output is not nft's JSON.
fn names_in_table(json: &str, family: Family, kind: &str) -> anyhow::Result<BTreeSet<String>> {
    let dump: serde_json::Value = serde_json::from_str(json).context("nft -j printed no JSON")?;
    let objects = dump["nftables"].as_array().context("nft -j: no \"nftables\" array")?;
    Ok(objects
        .iter()
        .filter_map(|o| o.get(kind))
        .filter(|o| o["family"] == nft_family(family) && o["table"] == TABLE_NAME)
        .filter_map(|o| o["name"].as_str().map(str::to_owned))
        .collect())
}

/// What our table holds now (names only; listing rules and elements would cost as much as the table).
fn installed(family: Family) -> anyhow::Result<Installed> {
    let nft_family = nft_family(family);
    let mut names = Vec::new();
    for (what, kind) in [("chains", "chain"), ("maps", "map"), ("sets", "set")] {
        let out = nft(&["-j", "--terse", "list", what, nft_family])?;
        if !out.status.success() {
            bail!("nft -j list {what} {nft_family} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        names.push(names_in_table(&String::from_utf8_lossy(&out.stdout), family, kind)?);
    }
    let [chains, maps, sets] = names.try_into().expect("three lists");
    Ok(Installed { chains, maps, sets })
}

/// One `nft -f` transaction that turns `old` into `new`, and what it writes and deletes. Ordered so every
/// reference is valid at each step: objects are declared before anything refers to them, and deleted
/// only after the rules and elements that referred to them are gone.
#[must_use]
pub fn transaction(family: Family, old: &Previous<'_, Nftables>, new: &Ruleset) -> (String, ApplyStats) {
    #[expect(non_snake_case, reason = "reads as the constant it replaced in every command below")]
    let TABLE = print::table(family);
    let mut out = String::new();
    let mut stats = ApplyStats::default();
    let known = match old {
        Previous::Applied(r) => Some(*r),
        Previous::Installed(_) => None,
    };
    let empty = Ruleset::default();
    let before = known.unwrap_or(&empty);
    let _ = writeln!(out, "add table {TABLE}");
    for (name, chain) in &new.chains {
        if known.is_none() || !before.chains.contains_key(name) {
            let hook = chain.hook.map(|h| format!(" {{ {h} }}")).unwrap_or_default();
            let _ = writeln!(out, "add chain {TABLE} {name}{hook}");
        }
    }
    for name in new.maps.keys() {
        if known.is_none() || !before.maps.contains_key(name) {
            let _ = writeln!(out, "add map {TABLE} {name} {{ {} }}", print::map_type(family, name));
        }
    }
    for name in &new.sets {
        if known.is_none() || !before.sets.contains(name) {
            let _ = writeln!(out, "add set {TABLE} {name} {{ {} }}", print::affinity_set_type(family));
        }
    }
    // Elements out first: they may point at chains deleted below.
    for (map, elements) in &new.maps {
        if known.is_none() {
            let _ = writeln!(out, "flush map {TABLE} {map}");
            continue;
        }
        for (key, value) in before.maps.get(map).into_iter().flatten() {
            if elements.get(key) != Some(value) {
                let _ = writeln!(out, "delete element {TABLE} {map} {{ {key} }}");
                stats.deletes += 1;
            }
        }
    }
    for (name, chain) in &new.chains {
        let previous = before.chains.get(name);
        if known.is_some() && previous == Some(chain) {
            continue;
        }
        let _ = writeln!(out, "flush chain {TABLE} {name}");
        stats.deletes += previous.map_or(0, |c| c.rules.len());
        for rule in &chain.rules {
            let _ = writeln!(out, "add rule {TABLE} {name} {rule}");
        }
        stats.writes += chain.rules.len();
    }
    let (gone_chains, gone_maps, gone_sets): (Vec<&String>, Vec<&str>, Vec<&String>) = match old {
        Previous::Applied(r) => (
            r.chains.keys().filter(|c| !new.chains.contains_key(*c)).collect(),
            r.maps.keys().copied().filter(|m| !new.maps.contains_key(m)).collect(),
            r.sets.iter().filter(|s| !new.sets.contains(*s)).collect(),
        ),
        Previous::Installed(installed) => (
            installed.chains.iter().filter(|c| !new.chains.contains_key(*c)).collect(),
            installed.maps.iter().map(String::as_str).filter(|m| !new.maps.contains_key(m)).collect(),
            installed.sets.iter().filter(|s| !new.sets.contains(*s)).collect(),
        ),
    };
    // Emptied before any is deleted: a chain can only go once nothing jumps to it.
    for name in &gone_chains {
        let _ = writeln!(out, "flush chain {TABLE} {name}");
        stats.deletes += before.chains.get(*name).map_or(0, |c| c.rules.len());
    }
    for (map, elements) in &new.maps {
        let previous = before.maps.get(map);
        for (key, value) in elements {
            if known.is_none() || previous.and_then(|p| p.get(key)) != Some(value) {
                let _ = writeln!(out, "add element {TABLE} {map} {{ {key} {value} }}");
                stats.writes += 1;
            }
        }
    }
    for name in gone_chains {
        let _ = writeln!(out, "delete chain {TABLE} {name}");
    }
    for name in gone_maps {
        let _ = writeln!(out, "delete map {TABLE} {name}");
    }
    for name in gone_sets {
        let _ = writeln!(out, "delete set {TABLE} {name}");
    }
    (out, stats)
}

/// Removes this mode's table and kube-proxy's nftables-mode tables, so two dataplanes never translate the
/// same packets. Missing nft or missing tables are not errors. Returns how many tables went.
pub fn cleanup() -> anyhow::Result<usize> {
    if Command::new("nft").arg("--version").output().is_err() {
        return Ok(0);
    }
    let mut removed = 0;
    for (family, name) in LEFTOVER_TABLES {
        // `list` first: deleting a table that does not exist is an error we would have to tell apart.
        if nft(&["--terse", "list", "table", family, name])?.status.success() {
            let out = nft(&["delete", "table", family, name])?;
            if !out.status.success() {
                bail!("nft delete table {family} {name} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether an nftables Service table (this mode's, or kube-proxy's nftables mode's) is installed.
pub fn installed_here() -> bool {
    Command::new("nft").arg("--version").output().is_ok()
        && LEFTOVER_TABLES
            .iter()
            .any(|(family, name)| nft(&["--terse", "list", "table", family, name]).is_ok_and(|o| o.status.success()))
}

/// Whether an IPv6 nftables Service table (this mode's, or kube-proxy's nftables mode's) is installed.
pub fn ipv6_installed_here() -> bool {
    Command::new("nft").arg("--version").output().is_ok()
        && LEFTOVER_TABLES
            .iter()
            .filter(|(family, _)| *family == "ip6")
            .any(|(family, name)| nft(&["--terse", "list", "table", family, name]).is_ok_and(|o| o.status.success()))
}

/// Whether nftables works here: the `nft` tool runs and the kernel answers it.
pub fn usable() -> Result<(), String> {
    match nft(&["list", "tables"]) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("nft list tables failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(format!("{e:#}")),
    }
}

impl Backend for Nftables {
    type Ruleset = Ruleset;
    /// Names only: listing rules and elements would cost as much as writing the table.
    type Installed = Installed;
    const NAME: &'static str = "nftables";

    fn print(plan: &Plan) -> Ruleset {
        print::print(plan)
    }

    fn usable(family: Family) -> Result<(), String> {
        usable()?;
        // The family's NAT: a kernel booted without IPv6 (or without its NAT) refuses the chain. `--check`
        // has the kernel validate the transaction, then drops it.
        let table = format!("{} proxy-agent-probe", nft_family(family));
        let probe = format!(
            "add table {table}\nadd chain {table} probe {{ type nat hook postrouting priority 100; policy accept; }}\n"
        );
        netfilter::run_with_input("nft", &["--check", "-f", "-"], &probe).map_err(|e| format!("{e:#}"))
    }

    fn installed(family: Family) -> anyhow::Result<Installed> {
        installed(family)
    }

    fn transaction(family: Family, old: &Previous<'_, Self>, new: &Ruleset) -> (String, ApplyStats) {
        transaction(family, old, new)
    }

    fn commit(_: Family, input: &str) -> anyhow::Result<()> {
        // The kernel commits an nft transaction whole or not at all.
        netfilter::run_with_input("nft", &["-f", "-"], input)
    }

    fn occupancy(r: &Ruleset) -> Vec<(&'static str, usize)> {
        vec![("nftables-rules", r.rule_count()), ("nftables-map-elements", r.element_count())]
    }
}

#[cfg(test)]
pub(crate) mod tests;
