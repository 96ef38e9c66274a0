use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use super::{StaleUdp, delete_stale_udp};
use crate::testing::Netns;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    Ipv4Addr::new(a, b, c, d).into()
}

/// One DNATed entry in `conntrack -R` syntax: `10.200.1.11:client_port` sent to `frontend`, answered by
/// `backend`.
fn entry(protocol: &str, client_port: u16, frontend: (&str, u16), backend: &str) -> String {
    let (vip, port) = frontend;
    let state = if protocol == "tcp" { " --state ESTABLISHED" } else { "" };
    format!(
        "-I -p {protocol} -s 10.200.1.11 -d {vip} --sport {client_port} --dport {port} --reply-src {backend} \
         --reply-dst 10.200.1.11 --reply-port-src 5353 --reply-port-dst {client_port} -t 120{state}\n"
    )
}

/// Loads entries into the namespace's table with one `conntrack -R`.
fn load(ns: &Netns, entries: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), entries).unwrap();
    let _ = ns.exec(&["conntrack", "-R", file.path().to_str().unwrap()]);
}

/// The client ports of the entries left, per protocol.
fn left(ns: &Netns, protocol: &str) -> BTreeSet<u16> {
    let out = ns.exec(&["conntrack", "-L", "-p", protocol]);
    out.lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("sport=")).and_then(|p| p.parse().ok()))
        .collect()
}

/// Against the kernel, in a namespace of the test's own: exactly the UDP entries of a stale (frontend,
/// backend) pair go; the same frontend's entries to a live backend, another port's, and TCP stay.
#[test]
fn only_the_udp_entries_of_stale_pairs_are_deleted() {
    let ns = Netns::new("ct");
    let vip = ("10.32.0.10", 53);
    let mut entries = [
        entry("udp", 40001, vip, "10.200.2.12"),                // stale
        entry("udp", 40002, vip, "10.200.2.12"),                // stale, another client port
        entry("udp", 40003, vip, "10.200.2.13"),                // the same frontend, a backend that stays
        entry("udp", 40004, ("10.32.0.10", 54), "10.200.2.12"), // another frontend port
        entry("udp", 40005, ("10.32.0.11", 53), "10.200.2.12"), // another frontend address
        entry("tcp", 40006, vip, "10.200.2.12"),                // TCP is not this cleanup's business
    ]
    .concat();
    // Enough filler for the dump to span several netlink reads.
    for port in 41000..42000 {
        entries += &entry("udp", port, ("10.32.0.99", 53), "10.200.2.99");
    }
    load(&ns, &entries);

    let stale = BTreeSet::from([
        StaleUdp { frontend: (v4(10, 32, 0, 10), 53), backend: (v4(10, 200, 2, 12), 5353) },
        // Nothing matches these: not an error. (The second is the stale backend's address on another port:
        // its renumbered endpoint, whose entries stay.)
        StaleUdp { frontend: (v4(10, 32, 0, 10), 53), backend: (v4(10, 200, 2, 77), 5353) },
        StaleUdp { frontend: (v4(10, 32, 0, 10), 53), backend: (v4(10, 200, 2, 13), 53) },
    ]);
    let deleted = ns.run(|| delete_stale_udp(&stale)).unwrap();

    assert_eq!(deleted, 2);
    let udp = left(&ns, "udp");
    assert!(!udp.contains(&40001) && !udp.contains(&40002), "{udp:?}");
    assert!(udp.contains(&40003) && udp.contains(&40004) && udp.contains(&40005), "{udp:?}");
    assert_eq!(udp.len(), 3 + 1000, "the filler stays");
    assert_eq!(left(&ns, "tcp"), BTreeSet::from([40006]));
    // Nothing stale: no netlink work at all.
    assert_eq!(ns.run(|| delete_stale_udp(&BTreeSet::new())).unwrap(), 0);
}

/// This kernel filters the dump itself: asked for UDP, it sends no TCP entry (the unfiltered dump is the
/// fallback for kernels before 5.8).
#[test]
fn the_kernel_filters_the_dump_to_udp() {
    let ns = Netns::new("ct-filter");
    let mut entries = String::new();
    for port in 42000..42050 {
        entries += &entry("tcp", port, ("10.32.0.10", 80), "10.200.2.12");
    }
    for port in 43000..43020 {
        entries += &entry("udp", port, ("10.32.0.10", 53), "10.200.2.12");
    }
    load(&ns, &entries);
    let (filtered, unfiltered) = ns.run(|| {
        let socket = super::open().unwrap();
        let v4 = super::NetfilterProtoFamily::IPv4;
        (super::dump(&socket, true, v4).unwrap(), super::dump(&socket, false, v4).unwrap())
    });
    assert_eq!(filtered.len(), 20);
    assert!(filtered.iter().all(|e| e.protocol == super::Protocol::Udp));
    assert_eq!(unfiltered.len(), 70, "without the filter the TCP entries come too");
}

/// The IPv6 table is its own: a stale IPv6 pair's UDP entries go, the IPv4 ones of the same ports stay.
#[test]
fn stale_ipv6_udp_entries_are_deleted_from_the_ipv6_table() {
    let ns = Netns::new("ct6");
    let v6 = |port: u16, backend: &str| {
        format!(
            "-I -p udp -s fd00:200:1::11 -d fd00:32::10 --sport {port} --dport 53 --reply-src {backend} \
             --reply-dst fd00:200:1::11 --reply-port-src 5353 --reply-port-dst {port} -t 120\n"
        )
    };
    let entries = [
        v6(40001, "fd00:200:2::12"),
        v6(40002, "fd00:200:2::13"),
        entry("udp", 40003, ("10.32.0.10", 53), "10.200.2.12"),
    ]
    .concat();
    load(&ns, &entries);
    let stale = BTreeSet::from([StaleUdp {
        frontend: ("fd00:32::10".parse().unwrap(), 53),
        backend: ("fd00:200:2::12".parse().unwrap(), 5353),
    }]);
    assert_eq!(ns.run(|| delete_stale_udp(&stale)).unwrap(), 1);
    let left_of = |family: &str| -> BTreeSet<u16> {
        ns.exec(&["conntrack", "-L", "-f", family, "-p", "udp"])
            .lines()
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("sport=")).and_then(|p| p.parse().ok()))
            .collect()
    };
    assert_eq!(left_of("ipv6"), BTreeSet::from([40002]), "the live backend's entry stays");
    assert_eq!(left_of("ipv4"), BTreeSet::from([40003]), "IPv4 untouched");
}
