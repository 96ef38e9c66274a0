//! Noticing packets that leave a node by its default route.
//!
//! Every node's default route points at the external client's namespace, the lab's "outside". A packet a
//! dataplane should have translated, rejected or dropped but let through is routed there, where the kernel
//! quietly discards it (the namespace does not forward) — so a missing DROP would look like a pass. An
//! nftables set per family in that namespace records the destination and protocol of every IPv4 and IPv6
//! packet arriving there for an address that is not its own; the lab fails a test that leaves an entry it
//! did not expect.

use std::net::IpAddr;

use anyhow::Context as _;

use crate::cmd::run;

const TABLE: &str = "lab_leaks";

/// One leaked destination: an address and IP protocol number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leak {
    pub dst: IpAddr,
    pub proto: u8,
}

/// Starts recording in namespace `ns` (the lab's external client).
pub fn watch(ns: &str) -> anyhow::Result<()> {
    // `fib daddr type`: not one of this namespace's addresses, nor broadcast or multicast (ARP is not IPv4;
    // neighbour discovery goes to multicast or to this namespace's own addresses).
    let script = format!(
        "table ip {TABLE} {{
  set leaked {{ type ipv4_addr . inet_proto; flags dynamic; size 4096; }}
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    fib daddr type != {{ local, broadcast, multicast }} update @leaked {{ ip daddr . meta l4proto }}
  }}
}}
table ip6 {TABLE} {{
  set leaked {{ type ipv6_addr . inet_proto; flags dynamic; size 4096; }}
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    fib daddr type != {{ local, multicast }} update @leaked {{ ip6 daddr . meta l4proto }}
  }}
}}
"
    );
    let path = std::env::temp_dir().join(format!("lab-leaks-{}-{ns}.nft", std::process::id()));
    std::fs::write(&path, script)?;
    let result = run("ip", &["netns", "exec", ns, "nft", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    result.context("installing the leak recorder (nftables) in the external namespace")?;
    Ok(())
}

/// What namespace `ns` has recorded so far, both families.
pub fn read(ns: &str) -> anyhow::Result<Vec<Leak>> {
    let mut leaks = Vec::new();
    for family in ["ip", "ip6"] {
        let out = run("ip", &["netns", "exec", ns, "nft", "-j", "list", "set", family, TABLE, "leaked"])?;
        leaks.extend(parse(&out)?);
    }
    Ok(leaks)
}

/// Forgets what namespace `ns` has recorded (a test that changes mode mid-way starts a new record).
pub fn forget(ns: &str) -> anyhow::Result<()> {
    for family in ["ip", "ip6"] {
        run("ip", &["netns", "exec", ns, "nft", "flush", "set", family, TABLE, "leaked"])?;
    }
    Ok(())
}

/// The elements of the set in `nft -j list set` output: `{"elem": [{"concat": ["10.32.0.9", 17]}]}` (the
/// protocol as a number or, for the ones nft knows, a name).
fn parse(json: &str) -> anyhow::Result<Vec<Leak>> {
    let value: serde_json::Value = serde_json::from_str(json).context("nft -j output")?;
    let mut out = Vec::new();
    for item in value["nftables"].as_array().into_iter().flatten() {
        for elem in item["set"]["elem"].as_array().into_iter().flatten() {
            // Elements carrying timeouts or counters nest the key under "elem"/"val".
            let key = if elem.get("elem").is_some() { &elem["elem"]["val"] } else { elem };
            let parts = key["concat"].as_array().context("a concatenated set element")?;
            let dst = parts.first().and_then(|a| a.as_str()).context("an address")?.parse()?;
            let proto = match parts.get(1) {
                Some(serde_json::Value::Number(n)) => u8::try_from(n.as_u64().unwrap_or(0))?,
                Some(serde_json::Value::String(name)) => protocol_number(name),
                _ => 0,
            };
            out.push(Leak { dst, proto });
        }
    }
    Ok(out)
}

fn protocol_number(name: &str) -> u8 {
    match name {
        "icmp" => 1,
        "ipv6-icmp" | "icmpv6" => 58,
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nft_json_elements_with_names_and_numbers() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"set": {"family": "ip", "name": "leaked", "table": "lab_leaks",
            "type": ["ipv4_addr", "inet_proto"], "elem": [{"concat": ["10.32.0.9", "udp"]}, {"concat": ["10.250.0.11", 6]}]}}]}"#;
        assert_eq!(
            parse(json).unwrap(),
            vec![
                Leak { dst: std::net::Ipv4Addr::new(10, 32, 0, 9).into(), proto: 17 },
                Leak { dst: std::net::Ipv4Addr::new(10, 250, 0, 11).into(), proto: 6 }
            ]
        );
        let empty =
            r#"{"nftables": [{"metainfo": {}}, {"set": {"family": "ip", "name": "leaked", "table": "lab_leaks"}}]}"#;
        assert!(parse(empty).unwrap().is_empty());
    }
}
