//! The kernel's SNMP counters of one namespace (`/proc/net/snmp`, and IPv6's `/proc/net/snmp6`): what a test reads to prove that a
//! packet class really occurred — a datagram fragmented and reassembled, an ICMP error sent and received —
//! before it judges what the client got.

use std::collections::BTreeMap;

use anyhow::Context as _;

use crate::cmd::run;

/// Counters keyed `Group:Name`, as `Ip:FragCreates` or `Icmp:InDestUnreachs`; IPv6's by their own names,
/// which carry their group (`Ip6FragCreates`, `Icmp6InDestUnreachs`).
pub type Counters = BTreeMap<String, u64>;

/// Every counter of `/proc/net/snmp` and `/proc/net/snmp6` in namespace `ns`.
pub fn read(ns: &str) -> anyhow::Result<Counters> {
    let mut counters = parse(&run("ip", &["netns", "exec", ns, "cat", "/proc/net/snmp"])?)?;
    counters.extend(parse6(&run("ip", &["netns", "exec", ns, "cat", "/proc/net/snmp6"])?));
    Ok(counters)
}

/// Parses `/proc/net/snmp6`: one `Name value` pair a line.
#[must_use]
pub fn parse6(text: &str) -> Counters {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.parse().ok()?))
        })
        .collect()
}

/// Parses `/proc/net/snmp`: each group is a line of names and a line of values, both led by `Group:`.
/// Values that are not counters (`Tcp: MaxConn` is -1) are left out.
pub fn parse(text: &str) -> anyhow::Result<Counters> {
    let mut counters = Counters::new();
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next().with_context(|| format!("no values after {names:?}"))?;
        let (group, names) = names.split_once(':').with_context(|| format!("no group in {names:?}"))?;
        let (same, values) = values.split_once(':').with_context(|| format!("no group in {values:?}"))?;
        anyhow::ensure!(group == same, "names of {group} followed by values of {same}");
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(value) = value.parse() {
                counters.insert(format!("{group}:{name}"), value);
            }
        }
    }
    Ok(counters)
}

/// The counters of one namespace at one moment, to measure what rose since.
pub struct Snapshot {
    ns: String,
    before: Counters,
}

impl Snapshot {
    pub fn take(ns: &str) -> anyhow::Result<Self> {
        Ok(Self { ns: ns.to_owned(), before: read(ns)? })
    }

    /// How much counter `key` (`Group:Name`) rose since the snapshot.
    pub fn rise(&self, key: &str) -> anyhow::Result<u64> {
        let now = read(&self.ns)?;
        let after = now.get(key).with_context(|| format!("{} has no counter {key}", self.ns))?;
        Ok(after.saturating_sub(self.before.get(key).copied().unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_and_names_pair_with_their_values() {
        let text =
            "Ip: Forwarding DefaultTTL FragCreates\nIp: 1 64 3\nTcp: RtoAlgorithm MaxConn ActiveOpens\nTcp: 1 -1 7\n";
        let counters = super::parse(text).unwrap();
        assert_eq!(counters.get("Ip:FragCreates"), Some(&3));
        assert_eq!(counters.get("Ip:DefaultTTL"), Some(&64));
        assert_eq!(counters.get("Tcp:ActiveOpens"), Some(&7));
        assert_eq!(counters.get("Tcp:MaxConn"), None, "a negative value is not a counter");
    }

    #[test]
    fn this_machines_file_parses() {
        let counters = super::parse(&std::fs::read_to_string("/proc/net/snmp").unwrap()).unwrap();
        for key in ["Ip:FragCreates", "Ip:ReasmOKs", "Icmp:InDestUnreachs", "Icmp:OutDestUnreachs"] {
            assert!(counters.contains_key(key), "{key} missing: {counters:?}");
        }
        let counters6 = super::parse6(&std::fs::read_to_string("/proc/net/snmp6").unwrap());
        for key in ["Ip6FragCreates", "Ip6ReasmOKs", "Icmp6InDestUnreachs"] {
            assert!(counters6.contains_key(key), "{key} missing: {counters6:?}");
        }
    }
}
