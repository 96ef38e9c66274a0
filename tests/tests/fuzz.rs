//! The fuzzer in the suite: a bounded share of generated packets through every packet program of the
//! real object, each held to the reference (`proxy_lab::fuzz`). `cargo xtask fuzz --packets N` runs more.
//! `FUZZ_SEED` and `FUZZ_PACKETS` override the seed and the count; a failure prints the seed, and the
//! failing packets as hex with what the reference expected.

use proxy_lab::fuzz::{Prog, fuzz};

const DEFAULT_SEED: u64 = 0x5eed_2026_1201;
/// About 45 s in a debug build: the suite's share.
const DEFAULT_PACKETS: u64 = 2_000_000;

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn every_packet_program_agrees_with_the_reference() {
    let seed = env_u64("FUZZ_SEED", DEFAULT_SEED);
    let packets = env_u64("FUZZ_PACKETS", DEFAULT_PACKETS);
    let report = fuzz(seed, packets).expect("fuzzer");
    eprintln!("seed {seed:#x}: {report}");
    assert_eq!(report.mismatches, 0, "seed {seed:#x}: {report}");
    // It cannot pass for want of trying: every program ran, and every class of packet was generated.
    for prog in Prog::ALL {
        assert!(report.by_prog.get(&prog).copied().unwrap_or(0) > 0, "{} never ran", prog.name());
    }
    for class in [
        "garbage",
        "other flow fragment",
        "ICMP error about another flow",
        "IPv6",
        "ARP",
        "VLAN-tagged",
        "pod to ClusterIP",
        "hairpin SNAT",
        "reply fragment to pod",
        "ICMP error to pod about its request",
        "ICMP error from pod about a reply",
        "first fragment to a frontend",
        "later fragment to a frontend",
        "later fragment before its first",
        "later fragment before its first, to the node",
        "the next datagram's later fragment first",
        "SNATed fragment to backend",
        "SNATed reply fragment un-SNAT",
        "ICMP error from client about a SNATed reply",
        "ICMP error from client about a SNATed reply, to backend",
        "external to frontend",
        "external to frontend at XDP",
        "external to SNATed frontend at XDP",
        "TTL 1 at XDP",
        "outside loadBalancerSourceRanges",
        "SNAT to backend",
        "reply un-SNAT",
        "ICMP error about the SNATed leg",
        "ICMP error about the SNATed leg, to client",
        "ICMP error about the un-SNATed reply",
        "ICMP error to external client",
        "ICMP error about a reply, to backend",
        "rejected",
        "rejected with IP options",
        "truncated before the ports",
        "truncated before the L4 checksum",
        "truncated after the L4 checksum",
        "SCTP that would need SNAT",
        "SNATed reply too big for the route, at XDP",
    ] {
        assert!(report.by_class.get(class).copied().unwrap_or(0) > 0, "no packet of class {class:?}: {report}");
    }
}
