//! Keys and values of the eBPF maps, shared by `proxy-ebpf` (kernel) and `proxy-agent` (userspace).
//!
//! Every type is `#[repr(C)]`, `Copy`, and has no implicit padding: aya requires a `Pod` type to have none,
//! and the kernel compares keys byte by byte, so a padding byte with garbage in it would make a lookup miss.
//! Addresses and ports are stored in network byte order, exactly as they sit in the packet, so the data path
//! never swaps bytes. The layout tests at the bottom pin sizes and offsets.
#![no_std]

/// IP protocol numbers, as in the IPv4 header's protocol field.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// How the maps hold addresses. IPv4: a `u32` holding the address's four bytes as they sit in the packet
/// (`u32::from_ne_bytes(octets)`). IPv6: [`addr::In6`], four such words. Each family has maps of its own
/// (`SERVICES` and `SERVICES6`, ...), whose keys and values are the same generic types (`ServiceKey<u32>`,
/// `ServiceKey<In6>`): the IPv4 path keeps its small keys, and neither family's lookups pay for the other.
pub mod addr {
    /// An IPv6 address as four words in packet order (`u32::from_ne_bytes` of each 4 octets).
    ///
    /// A type of its own rather than `[u32; 4]`: an array's `==` compiles to a `memcmp` call, which BPF
    /// programs cannot make (the BPF backend of LLVM crashes on it). This one compares word by word.
    #[repr(transparent)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct In6(pub [u32; 4]);

    impl PartialEq for In6 {
        #[inline]
        fn eq(&self, other: &Self) -> bool {
            let (a, b) = (&self.0, &other.0);
            (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
        }
    }

    impl Eq for In6 {}

    // Equal addresses have equal words, so hashing the words agrees with `eq`.
    impl core::hash::Hash for In6 {
        fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
            self.0.hash(state);
        }
    }

    impl PartialOrd for In6 {
        fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    impl Ord for In6 {
        fn cmp(&self, other: &Self) -> core::cmp::Ordering {
            let mut i = 0;
            while i < 4 {
                let (a, b) = (u32::from_be(self.0[i]), u32::from_be(other.0[i]));
                if a != b {
                    return if a < b { core::cmp::Ordering::Less } else { core::cmp::Ordering::Greater };
                }
                i += 1;
            }
            core::cmp::Ordering::Equal
        }
    }

    impl In6 {
        pub const UNSPECIFIED: Self = Self([0; 4]);

        /// The address from its 16 octets.
        #[must_use]
        pub const fn from_octets(o: [u8; 16]) -> Self {
            Self([
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ])
        }

        /// Its 16 octets.
        #[must_use]
        pub const fn octets(&self) -> [u8; 16] {
            let [a, b, c, d] = self.0;
            let (a, b, c, d) = (a.to_ne_bytes(), b.to_ne_bytes(), c.to_ne_bytes(), d.to_ne_bytes());
            [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
        }

        /// Whether every word is zero (the unspecified address `::`, "none" in the maps).
        #[inline]
        #[must_use]
        pub const fn is_zero(&self) -> bool {
            self.0[0] | self.0[1] | self.0[2] | self.0[3] == 0
        }

        /// `self & mask == net`, word by word.
        #[inline]
        #[must_use]
        pub const fn masked_eq(&self, mask: &Self, net: &Self) -> bool {
            let (a, m, n) = (&self.0, &mask.0, &net.0);
            ((a[0] & m[0]) ^ n[0]) | ((a[1] & m[1]) ^ n[1]) | ((a[2] & m[2]) ^ n[2]) | ((a[3] & m[3]) ^ n[3]) == 0
        }
    }
}

/// Names of the maps, as the agent finds them in the object and pins them.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const REVNAT: &str = "REVNAT";
    pub const SNAT: &str = "SNAT";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const CONFIG: &str = "CONFIG";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const STATS: &str = "STATS";
    pub const IDS: &str = "IDS";
    pub const FRAGS: &str = "FRAGS";
    pub const DROPS: &str = "DROPS";
    pub const SOCK_FLOWS: &str = "SOCK_FLOWS";
    pub const FRONTEND_ADDRS: &str = "FRONTEND_ADDRS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const EGRESS_SNAT: &str = "EGRESS_SNAT";
    pub const EGRESS_SNAT6: &str = "EGRESS_SNAT6";
    /// IPv6's maps: the same roles, keyed and valued by the IPv6 forms of the same types. Backend ids,
    /// reverse-NAT ids and Maglev tables are numbered across both families (`IDS`, `MAGLEV` are shared).
    pub const SERVICES6: &str = "SERVICES6";
    pub const BACKENDS6: &str = "BACKENDS6";
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const REVNAT6: &str = "REVNAT6";
    pub const SNAT6: &str = "SNAT6";
    pub const AFFINITY6: &str = "AFFINITY6";
    pub const SOURCE_RANGES6: &str = "SOURCE_RANGES6";
    pub const CONFIG6: &str = "CONFIG6";
    pub const FRAGS6: &str = "FRAGS6";
    pub const FRONTEND_ADDRS6: &str = "FRONTEND_ADDRS6";
    pub const SOCK_REVNAT6: &str = "SOCK_REVNAT6";
    pub const SOCK_FLOWS6: &str = "SOCK_FLOWS6";
    /// During an upgrade, the previous agent's maps, which the new programs read on a miss (not pinned).
    pub const PREV_CONNTRACK: &str = "PREV_CONNTRACK";
    pub const PREV_SNAT: &str = "PREV_SNAT";
    pub const PREV_CONNTRACK6: &str = "PREV_CONNTRACK6";
    pub const PREV_SNAT6: &str = "PREV_SNAT6";

    /// Every map, with the version of its layout (key, value, type, flags), which its pin name carries
    /// (`NAME_vN`). A build that changes a map's layout bumps its version: the upgraded agent then builds the
    /// new map beside the pinned one, fills it, swaps its programs in, and only then lets the old one go.
    pub const LAYOUTS: [(&str, u32); 30] = [
        (SERVICES, 1),
        (BACKENDS, 1),
        (CONNTRACK, 1),
        (REVNAT, 1),
        (SNAT, 1),
        (AFFINITY, 1),
        (SOURCE_RANGES, 1),
        (CONFIG, 3),
        (SOCK_REVNAT, 1),
        (STATS, 1),
        (IDS, 1),
        (FRAGS, 1),
        (DROPS, 2),
        (SOCK_FLOWS, 1),
        (FRONTEND_ADDRS, 1),
        (MAGLEV, 1),
        (EGRESS_SNAT, 1),
        (SERVICES6, 1),
        (BACKENDS6, 1),
        (CONNTRACK6, 1),
        (REVNAT6, 1),
        (SNAT6, 1),
        (AFFINITY6, 1),
        (SOURCE_RANGES6, 1),
        (CONFIG6, 2),
        (EGRESS_SNAT6, 1),
        (FRAGS6, 1),
        (FRONTEND_ADDRS6, 1),
        (SOCK_REVNAT6, 1),
        (SOCK_FLOWS6, 1),
    ];

    /// Maps that hold the service table: written by the agent from the cluster's state. An upgrade copies
    /// them into their new versions at start (where the layout allows), so the first sync writes only what
    /// changed.
    pub const SERVICE_STATE: [&str; 12] = [
        SERVICES,
        BACKENDS,
        REVNAT,
        SOURCE_RANGES,
        IDS,
        MAGLEV,
        FRONTEND_ADDRS,
        SERVICES6,
        BACKENDS6,
        REVNAT6,
        SOURCE_RANGES6,
        FRONTEND_ADDRS6,
    ];
    /// Maps the data path writes (flows, counters): an upgrade copies them last, just before the swap.
    pub const FLOW_STATE: [&str; 14] = [
        CONNTRACK,
        SNAT,
        AFFINITY,
        SOCK_REVNAT,
        SOCK_FLOWS,
        FRAGS,
        STATS,
        DROPS,
        CONNTRACK6,
        SNAT6,
        AFFINITY6,
        FRAGS6,
        SOCK_REVNAT6,
        SOCK_FLOWS6,
    ];
}

/// The agent's id counters, kept in the single entry of the `IDS` array so a restarted agent never hands
/// out an id a live conntrack entry may still name (the data path does not read it).
pub mod ids {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct NextIds {
        pub backend: u32,
        pub rev_nat: u32,
    }
}

/// Per-CPU counters of the data path (the `STATS` array), by index.
pub mod stats {
    /// XDP translated a new or known flow and sent it back out (DNAT + SNAT to another node).
    pub const XDP_TX_FORWARD: u32 = 0;
    /// XDP translated a reply of such a flow and sent it back out to the client.
    pub const XDP_TX_REPLY: u32 = 1;
    /// XDP did the DNAT and handed the packet to the stack (source kept).
    pub const XDP_DNAT_PASS: u32 = 2;
    /// XDP left a Service packet to the TC path.
    pub const XDP_FALLBACK: u32 = 3;
    /// A later IPv4 fragment arrived with no record of its datagram (not a Service's, or reordered before
    /// its first fragment, or that lost), not bound through here for a Service address: passed untouched.
    pub const FRAG_UNTRACKED: u32 = 4;
    /// An ICMP error quoting a translated flow was translated back.
    pub const ICMP_TRANSLATED: u32 = 5;
    /// XDP handed a packet with TTL ≤ 1 to the stack (which sends time-exceeded if it would forward it).
    pub const XDP_TTL_EXPIRED: u32 = 6;
    /// XDP handed a packet too big for its route's MTU to the stack (which sends fragmentation-needed);
    /// also counted as `XDP_FALLBACK`.
    pub const XDP_FRAG_NEEDED: u32 = 7;
    /// A flow was recorded in conntrack (a new one, or one given a new backend).
    pub const CT_CREATED: u32 = 8;
    /// A flow's entries were removed by the data path: expired, reopened by a SYN, or moved to another
    /// backend. With the agent's sweep this tells evictions apart (`proxy_agent_conntrack_evictions_total`).
    pub const CT_ENDED: u32 = 9;
    pub const COUNT: u32 = 10;
}

/// Why a program dropped, refused or gave up on a packet or a socket call: the index of a per-CPU counter
/// in the `DROPS` array, exported by the agent as `proxy_agent_packet_drops_total{reason}`. Every place a
/// program drops says which of these it is; [`drop::NAMES`] gives each its metric label.
pub mod drop {
    /// The source is not in the frontend's `loadBalancerSourceRanges`.
    pub const SOURCE_RANGE: u32 = 0;
    /// The frontend has no usable endpoint and drops (kube-proxy: no REJECT for this case).
    pub const NO_ENDPOINTS: u32 = 1;
    /// The client was refused with ICMP port unreachable: the frontend has no usable endpoint, or the
    /// packet was for a ClusterIP on a port or protocol no Service defines.
    pub const REJECTED: u32 = 2;
    /// A packet was shorter than the headers the path had already read promised.
    pub const PACKET_TOO_SHORT: u32 = 3;
    /// Writing the packet (an address, a port or a checksum) failed.
    pub const REWRITE_FAILED: u32 = 4;
    /// An SCTP flow would need its port changed, which its `CRC32c` cannot follow incrementally.
    pub const SCTP_PORT_CHANGE: u32 = 5;
    /// The conntrack map could not take the new flow's entries.
    pub const CONNTRACK_FULL: u32 = 6;
    /// A flow must be SNATed but the node has no SNAT address configured.
    pub const SNAT_NO_ADDRESS: u32 = 7;
    /// No free SNAT port to the backend after every try.
    pub const SNAT_PORTS_EXHAUSTED: u32 = 8;
    /// The SNAT map could not take the flow's entry.
    pub const SNAT_FULL: u32 = 9;
    /// Building the ICMP refusal failed (an IP header with options, or the packet could not be resized).
    pub const REJECT_FAILED: u32 = 10;
    /// A node process's `connect()`/`sendmsg()` to a frontend without endpoints was refused.
    pub const SOCK_REFUSED: u32 = 11;
    /// A node process's socket could not be recorded for reverse translation; the call was refused.
    pub const SOCK_MAP_FULL: u32 = 12;
    /// A later IPv4 fragment to a Service address arrived before its datagram's first fragment: without
    /// the ports there is no translating it, and it must not leave untranslated.
    pub const FRAG_WITHOUT_FIRST: u32 = 13;
    /// A packet to an address in a service CIDR that no Service holds (kube-proxy's nftables mode drops
    /// these too): it must not leave by the default route.
    pub const UNALLOCATED_SERVICE_IP: u32 = 14;
    pub const COUNT: u32 = 15;

    /// Metric labels, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "source_range",
        "no_endpoints",
        "rejected",
        "packet_too_short",
        "rewrite_failed",
        "sctp_port_change",
        "conntrack_full",
        "snat_no_address",
        "snat_ports_exhausted",
        "snat_full",
        "reject_failed",
        "sock_refused",
        "sock_map_full",
        "frag_without_first",
        "unallocated_service_ip",
    ];
}

/// IPv4 fragment tracking: later fragments carry no ports, so the first fragment of a datagram records them
/// here, keyed as the packet carries its addresses at the hook that saw it, and the later fragments of the
/// same datagram (same source, destination, IP id and protocol) are translated with them.
pub mod frag {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct FragKey {
        /// Network byte order.
        pub src_addr: u32,
        pub dst_addr: u32,
        /// The IP identification field, network byte order.
        pub id: u16,
        pub proto: u8,
        pub pad: u8,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct FragValue {
        /// The datagram's ports, network byte order.
        pub src_port: u16,
        pub dst_port: u16,
        /// When the first fragment was seen, in seconds of the kernel's monotonic clock.
        pub seen: u32,
    }

    /// An IPv6 datagram's fragments (`FRAGS6`): the Fragment header's identification is 32 bits.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct FragKey6 {
        pub src_addr: crate::addr::In6,
        pub dst_addr: crate::addr::In6,
        /// The Fragment header's identification, network byte order.
        pub id: u32,
        pub proto: u8,
        pub pad: [u8; 3],
    }

    /// How long later fragments are matched to a first fragment: the kernel's `ipfrag_time` default.
    pub const LIFETIME_SECS: u32 = 30;
}

/// Sizes of the maps. The agent refuses a desired table that would not fit, rather than half-write it.
///
/// The service-side maps (services, backends, reverse NAT) are hash maps allocated as entries are written
/// (`BPF_F_NO_PREALLOC`), so their size is a ceiling, not a cost: 100k Services with 10 endpoints each need
/// 1.1M service entries and 1M backends. Conntrack, SNAT and affinity are LRU maps, which the kernel always
/// preallocates.
pub mod capacity {
    pub const SERVICES: u32 = 1 << 21;
    pub const BACKENDS: u32 = 1 << 20;
    pub const CONNTRACK: u32 = 1 << 18;
    pub const REVNAT: u32 = 1 << 18;
    pub const SNAT: u32 = 1 << 18;
    pub const AFFINITY: u32 = 1 << 16;
    pub const SOURCE_RANGES: u32 = 1 << 14;
    pub const SOCK_REVNAT: u32 = 1 << 16;
    /// Datagrams in flight as fragments, node-wide (Cilium's default is the same).
    pub const FRAGS: u32 = 1 << 13;
    pub const SOCK_FLOWS: u32 = 1 << 16;
    /// Addresses that ClusterIPs, external IPs and load-balancer IPs live on (allocated on write).
    pub const FRONTEND_ADDRS: u32 = 1 << 18;
    /// Interfaces with a SNAT address of their own (`EGRESS_SNAT`).
    pub const EGRESS_SNAT: u32 = 256;
    /// Maglev table entries, all tables together (allocated on write): 256 tables of 16381, or fewer larger.
    pub const MAGLEV: u32 = 1 << 22;
    /// Entries of an LRU map that must hold `per_flow` × `flows` entries on a node with `cpus` possible
    /// CPUs. The kernel's LRU keeps free entries in per-CPU lists (up to 128 each) and evicts on a CPU whose
    /// list is empty even while another CPU's list holds free ones: without this headroom a table "sized
    /// for" its flows evicts some of them, and a full table then cascades (measured: a flow re-created after
    /// its eviction evicts the next oldest).
    #[must_use]
    pub const fn lru_entries(flows: u32, per_flow: u32, cpus: u32) -> u32 {
        flows.saturating_mul(per_flow).saturating_add(cpus.saturating_mul(2 * 128))
    }

    /// `BPF_F_NO_PREALLOC`: the kernel allocates entries on update instead of all at map creation.
    pub const NO_PREALLOC: u32 = 1;
}

/// Bits of `skb->mark` the programs use to hand a decision from ingress to egress. kube-proxy uses 0x4000
/// and 0x8000; this bit is clear of both.
pub mod mark {
    /// Set at ingress on a packet whose flow must leave with the node's address as its source.
    pub const SNAT: u32 = 0x0010_0000;
}

/// Node-wide settings, in the single entry of the `CONFIG` array.
pub mod config {
    use crate::addr::In6;

    /// Traffic from pods to a Service is always SNATed (kube-proxy's `masqueradeAll`).
    pub const FLAG_MASQUERADE_ALL: u32 = 1;
    /// An upgrade is under way: a flow not found in `CONNTRACK` or `SNAT` is looked up in the previous
    /// agent's maps (`PREV_CONNTRACK`, `PREV_SNAT`) and carried over, so no flow loses its state between the
    /// programs' swap and the end of the copy.
    pub const FLAG_MIGRATING: u32 = 2;
    /// Taking over from the kernel's NAT (kube-proxy's rules, still in place): a packet to a frontend whose
    /// flow has no entry is left to those rules and its flow recorded as the kernel's
    /// (`conntrack::FLAG_KERNEL_NAT`), so it stays with them once this flag is cleared. See
    /// `proxy-agent/src/dataplane/handover.rs`.
    pub const FLAG_HANDOVER: u32 = 4;
    /// Handing over to the kernel's NAT (a netfilter mode's rules are in place): flows with an entry keep
    /// their translation until they end; every other packet, and every new socket, is left to the rules.
    pub const FLAG_DRAIN: u32 = 8;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        /// The network namespace the agent serves (`SO_NETNS_COOKIE`). The socket programs attach to a
        /// cgroup, which can hold processes of other namespaces; they leave those alone.
        pub netns_cookie: u64,
        /// The address SNATed flows leave with (the node's primary IPv4), network byte order. Zero: none.
        pub snat_addr: u32,
        /// SNAT source ports are taken from `snat_port_min..=snat_port_max` (host byte order). The
        /// default range sits above the kernel's ephemeral ports, so it never collides with the node's sockets.
        pub snat_port_min: u16,
        pub snat_port_max: u16,
        pub flags: u32,
        /// kube-proxy's `clusterCIDR` for local-traffic detection (network byte order); mask zero: unset.
        /// Traffic arriving from another node with a source in it counts as pod traffic.
        pub cluster_addr: u32,
        pub cluster_mask: u32,
        /// Entries in every Maglev table (a prime), for the index a flow's hash picks.
        pub maglev_table_size: u32,
        /// Conntrack lifetimes by flow state.
        pub timeouts: super::conntrack::Timeouts,
        /// The service CIDRs (`--service-cluster-ip-range`): an address in one that no Service holds is
        /// dropped, as kube-proxy's nftables mode drops it, so it never leaves by the default route. Unused
        /// entries have mask zero and match nothing (see [`Config::in_service_cidr`]).
        pub service_cidrs: [Ipv4Net; MAX_SERVICE_CIDRS],
        /// The node's other SNAT addresses (network byte order; zero: unused): those of interfaces that
        /// masquerade with their own address (`EGRESS_SNAT`), as netfilter's MASQUERADE takes the address of
        /// the interface a packet leaves by: a pod bridge's, an overlay device's.
        pub snat_addrs: [u32; MAX_SNAT_ADDRS],
    }

    /// IPv6's node-wide settings, in the single entry of the `CONFIG6` array: the address-bearing fields of
    /// [`Config`] for IPv6 (flags, ports, timeouts and the rest hold for both families and stay there). A
    /// map of its own keeps the IPv4 path's `Config` small enough to copy onto the stack.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config6 {
        /// The node's primary IPv6, which SNATed IPv6 flows leave with unless their interface has its
        /// own (`EGRESS_SNAT6`). Zero: none.
        pub snat_addr: In6,
        /// `clusterCIDR`'s IPv6 CIDR for local-traffic detection; mask zero: unset.
        pub cluster: Ipv6Net,
        pub service_cidrs: [Ipv6Net; MAX_SERVICE_CIDRS],
        /// The node's other IPv6 SNAT addresses (zero: unused), as [`Config::snat_addrs`]: a pod bridge's,
        /// an overlay device's.
        pub snat_addrs: [In6; MAX_SNAT_ADDRS],
    }

    /// An IPv6 network, address and mask in network byte order. A zero mask is "unset".
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Ipv6Net {
        pub addr: In6,
        pub mask: In6,
    }

    impl Ipv6Net {
        #[inline]
        #[must_use]
        pub const fn is_set(&self) -> bool {
            !self.mask.is_zero()
        }

        #[inline]
        #[must_use]
        pub const fn contains(&self, addr: &In6) -> bool {
            self.is_set() && addr.masked_eq(&self.mask, &self.addr)
        }
    }

    impl Config6 {
        /// Whether `addr` is in one of the IPv6 service CIDRs.
        #[inline]
        #[must_use]
        pub fn in_service_cidr(&self, addr: &In6) -> bool {
            let mut i = 0;
            while i < MAX_SERVICE_CIDRS {
                if self.service_cidrs[i].contains(addr) {
                    return true;
                }
                i += 1;
            }
            false
        }

        #[inline]
        #[must_use]
        pub fn has_service_cidrs(&self) -> bool {
            self.service_cidrs[0].is_set()
        }

        /// Whether `addr` is one of the node's IPv6 SNAT addresses.
        #[inline]
        #[must_use]
        pub fn is_snat_addr(&self, addr: &In6) -> bool {
            if addr.is_zero() {
                return false;
            }
            if *addr == self.snat_addr {
                return true;
            }
            let mut i = 0;
            while i < MAX_SNAT_ADDRS {
                if self.snat_addrs[i] == *addr {
                    return true;
                }
                i += 1;
            }
            false
        }
    }

    /// How many SNAT addresses besides `snat_addr` the data path knows (a bridge, an overlay, a second
    /// uplink); an interface beyond them masquerades with `snat_addr`.
    pub const MAX_SNAT_ADDRS: usize = 4;

    /// How many service CIDRs the data path checks: kube-proxy's clusters have one per family, a few
    /// while a range is being migrated (`ServiceCIDR` objects).
    pub const MAX_SERVICE_CIDRS: usize = 4;

    /// An IPv4 network, address and mask in network byte order. A zero mask is "unset", not 0.0.0.0/0.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Ipv4Net {
        pub addr: u32,
        pub mask: u32,
    }

    impl Config {
        /// Whether `addr` (network byte order) is in one of the service CIDRs.
        #[inline]
        #[must_use]
        pub fn in_service_cidr(&self, addr: u32) -> bool {
            let mut i = 0;
            while i < MAX_SERVICE_CIDRS {
                let net = self.service_cidrs[i];
                if net.mask != 0 && addr & net.mask == net.addr {
                    return true;
                }
                i += 1;
            }
            false
        }

        /// Whether `addr` (network byte order) is one of the node's SNAT addresses.
        #[inline]
        #[must_use]
        pub fn is_snat_addr(&self, addr: u32) -> bool {
            if addr == 0 {
                return false;
            }
            if addr == self.snat_addr {
                return true;
            }
            let mut i = 0;
            while i < MAX_SNAT_ADDRS {
                if self.snat_addrs[i] == addr {
                    return true;
                }
                i += 1;
            }
            false
        }

        /// Whether any service CIDR is set.
        #[inline]
        #[must_use]
        pub fn has_service_cidrs(&self) -> bool {
            self.service_cidrs[0].mask != 0
        }
    }
}

/// The `FRONTEND_ADDRS` map's values: what lives on a Service address that is not the node's own.
pub mod frontend_addr {
    /// Some ClusterIP, external IP or load-balancer frontend.
    pub const SERVICE: u32 = 1;
    /// Some ClusterIP frontend: a packet to another port or protocol here is refused, as kube-proxy's
    /// nftables mode refuses it.
    pub const CLUSTER_IP: u32 = 2;
}

/// The node's own sockets: `connect()` and `sendmsg()` to a frontend are pointed at a backend, and this map
/// lets `recvmsg()` and `getpeername()` show the frontend again.
pub mod sock {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SockKey {
        /// `bpf_get_socket_cookie`
        pub cookie: u64,
        /// The backend, network byte order.
        pub addr: u32,
        pub port: u16,
        pub pad: u16,
    }

    /// The frontend, network byte order.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SockFrontend {
        pub addr: u32,
        pub port: u16,
        pub pad: u16,
    }

    /// An unconnected socket's datagrams to one frontend (`sendmsg()` with an address): they keep the
    /// backend the first was given while the socket keeps talking, as a conntrack entry keeps a flow's.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SockFlowKey {
        pub cookie: u64,
        /// The frontend, network byte order.
        pub addr: u32,
        pub port: u16,
        pub proto: u8,
        pub pad: u8,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SockFlow {
        pub backend_id: u32,
        pub pad: u32,
        /// `bpf_ktime_get_ns` of the last datagram.
        pub last_seen_ns: u64,
    }

    /// IPv6 sockets' entries (`SOCK_REVNAT6`, `SOCK_FLOWS6`): the same fields with an IPv6 address, padded
    /// out explicitly to the 8-byte alignment the cookie gives them.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SockKey6 {
        pub cookie: u64,
        pub addr: crate::addr::In6,
        pub port: u16,
        pub pad: [u16; 3],
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SockFrontend6 {
        pub addr: crate::addr::In6,
        pub port: u16,
        pub pad: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SockFlowKey6 {
        pub cookie: u64,
        pub addr: crate::addr::In6,
        pub port: u16,
        pub proto: u8,
        pub pad: [u8; 5],
    }

    /// An idle socket picks afresh after this long: netfilter's UDP timeout (`nf_conntrack_udp_timeout`).
    pub const FLOW_IDLE_SECS: u64 = 30;
}

/// The service map: a frontend (service address, port, protocol) and a slot.
///
/// Slot 0 is the service itself and holds the number of backends; slots `1..=count` each hold one backend
/// id. The agent writes backends and slots before slot 0, and slot 0 last, so the data path never sees a
/// count that points past the written slots (the layout follows Cilium's `lb4_key`/`lb4_service`).
pub mod service {
    /// Traffic arriving on a host interface (from outside the node's pods).
    pub const SCOPE_EXTERNAL: u8 = 0;
    /// Traffic from this node's pods, when a Local policy makes its backends differ from external traffic's.
    pub const SCOPE_INTERNAL: u8 = 1;

    /// Slot-0 flags.
    pub mod flags {
        /// Internal traffic uses the `SCOPE_INTERNAL` entries of this frontend.
        pub const HAS_INTERNAL_SCOPE: u16 = 1 << 0;
        /// External traffic is SNATed to the node (externalTrafficPolicy Cluster, ClusterIPs).
        pub const MASQUERADE_EXTERNAL: u16 = 1 << 1;
        /// With no backend, refuse the client (ICMP port unreachable) instead of dropping.
        pub const REJECT_WHEN_EMPTY: u16 = 1 << 2;
        /// sessionAffinity ClientIP; `affinity_timeout` holds the seconds.
        pub const AFFINITY: u16 = 1 << 3;
        /// Only sources in the `SOURCE_RANGES` entries of this frontend's reverse-NAT id may use it.
        pub const SOURCE_RANGES: u16 = 1 << 4;
        /// The frontend is a ClusterIP (kube-proxy masquerades only off-cluster traffic to those).
        pub const CLUSTER_IP: u16 = 1 << 5;
        /// New flows pick their backend from a Maglev table (`maglev`), whose id slot 0's `backend_id`
        /// holds.
        pub const MAGLEV: u16 = 1 << 6;
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct ServiceKey<A = u32> {
        /// The address ([`crate::addr`]), network byte order.
        pub addr: A,
        /// Port, network byte order.
        pub port: u16,
        pub proto: u8,
        /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
        pub scope: u8,
        pub slot: u16,
        pub pad: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ServiceValue {
        /// In slots `1..=count`: the backend this slot points at. Zero in slot 0.
        pub backend_id: u32,
        /// Index into the reverse-NAT map, so replies get this frontend's address back.
        pub rev_nat_id: u32,
        /// In slot 0: how many backend slots follow. Zero means "no usable backend".
        pub count: u16,
        /// `flags::*` bits, in slot 0.
        pub flags: u16,
        /// sessionAffinity timeout in seconds, in slot 0.
        pub affinity_timeout: u32,
    }

    /// The key of an IPv6 frontend's entries (`SERVICES6`).
    pub type ServiceKey6 = ServiceKey<crate::addr::In6>;

    impl<A: Copy> ServiceKey<A> {
        #[must_use]
        pub const fn new(addr: A, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
            Self { addr, port, proto, scope, slot, pad: 0 }
        }

        /// The same key with its address converted (the agent's family-neutral form to a map's).
        #[must_use]
        pub fn with_addr<B>(self, addr: B) -> ServiceKey<B> {
            ServiceKey { addr, port: self.port, proto: self.proto, scope: self.scope, slot: self.slot, pad: 0 }
        }
    }
}

/// The backend map: backend id → the endpoint's address and port.
pub mod backend {
    /// The backend runs on this node.
    pub const FLAG_LOCAL: u8 = 1;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Backend<A = u32> {
        /// The address ([`crate::addr`]), network byte order.
        pub addr: A,
        /// Port, network byte order.
        pub port: u16,
        pub proto: u8,
        pub flags: u8,
    }

    /// An IPv6 backend (`BACKENDS6`).
    pub type Backend6 = Backend<crate::addr::In6>;

    impl<A> Backend<A> {
        /// The same backend with its address converted.
        #[must_use]
        pub fn with_addr<B>(self, addr: B) -> Backend<B> {
            Backend { addr, port: self.port, proto: self.proto, flags: self.flags }
        }
    }
}

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016): a frontend's table of `maglev_table_size`
/// entries, each a backend id, built by the agent from the backends' addresses alone, so every node builds
/// the same table for the same backend set and picks the same backend for the same 5-tuple. Changing the
/// set moves about 1/N of the entries.
pub mod maglev {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct MaglevKey {
        /// The table's id (slot 0's `backend_id` of the frontend scope using it).
        pub table: u32,
        pub index: u32,
    }

    /// The default table size: a prime, as the algorithm needs; Cilium's and the paper's small default.
    pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
}

/// A 5-tuple's hash, the same on every node and every build (no seed): Maglev and a flow without state use
/// it, so packets of one flow pick one backend wherever they arrive. Addresses and ports as the packet
/// carries them (network byte order). The mixing is murmur3's finaliser over the words of the tuple.
#[must_use]
#[inline]
pub const fn flow_hash(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let mut h = HASH_SEED;
    h = hash_mix(h, src_addr);
    h = hash_mix(h, dst_addr);
    hash_finish(h, src_port, dst_port, proto)
}

/// [`flow_hash`] of an IPv6 5-tuple: every word of both addresses is mixed in.
#[must_use]
#[inline]
pub const fn flow_hash6(src_addr: &addr::In6, dst_addr: &addr::In6, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let mut h = HASH_SEED;
    let mut i = 0;
    while i < 4 {
        h = hash_mix(h, src_addr.0[i]);
        i += 1;
    }
    while i < 8 {
        h = hash_mix(h, dst_addr.0[i - 4]);
        i += 1;
    }
    hash_finish(h, src_port, dst_port, proto)
}

const HASH_SEED: u32 = 0x9747_b28c;

const fn hash_mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

const fn hash_finish(mut h: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    h = hash_mix(h, ((src_port as u32) << 16) | dst_port as u32);
    h = hash_mix(h, proto as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The reverse-NAT map: id → the frontend address a reply must appear to come from.
pub mod revnat {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RevNat<A = u32> {
        /// The address ([`crate::addr`]), network byte order.
        pub addr: A,
        /// Port, network byte order.
        pub port: u16,
        pub pad: u16,
    }

    /// An IPv6 frontend's record (`REVNAT6`).
    pub type RevNat6 = RevNat<crate::addr::In6>;
}

/// The connection-tracking map (LRU): each translated flow is two entries that name each other.
///
/// - The forward entry is keyed by the tuple the client sent (client → frontend, `DIR_FORWARD`) and holds the
///   translated tuple: the backend, and the client port the backend sees (the client's own unless it had to
///   be remapped, below). It carries the flow's state and lifetime.
/// - The reply entry is keyed by the tuple the backend answers with (backend → client, `DIR_REPLY`) and
///   holds the original tuple: the frontend, and the client's own port.
///
/// A reply entry is used only if the forward entry it names exists, is alive, and names it back; anything
/// else is a leftover of an older flow and is removed. So a backend's tuple can be reused by another flow,
/// or by a connection straight to the backend, without inheriting an old translation. Two live flows
/// whose reply tuples would be the same (one client port to two Services of one pod) cannot both have
/// it: the second gets another client port, as netfilter's NAT gives a clashing flow a unique tuple.
pub mod conntrack {
    pub const DIR_FORWARD: u8 = 0;
    pub const DIR_REPLY: u8 = 1;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CtKey<A = u32> {
        pub src_addr: A,
        pub dst_addr: A,
        pub src_port: u16,
        pub dst_port: u16,
        pub proto: u8,
        pub dir: u8,
        pub pad: u16,
    }

    /// The flow leaves with the node's address as its source.
    pub const FLAG_SNAT: u16 = 1;
    /// The backend runs on this node.
    pub const FLAG_LOCAL_BACKEND: u16 = 2;
    /// The kernel's NAT translated this flow (netfilter, before the eBPF dataplane took over) and goes on
    /// translating it from its own conntrack: the flow's packets pass untouched. A forward entry only; the
    /// data path sees only the client's side of such a flow.
    pub const FLAG_KERNEL_NAT: u16 = 4;

    /// What has been seen of a flow (forward entries; both directions' packets update it).
    pub mod state {
        /// The backend answered (any protocol).
        pub const REPLIED: u16 = 1 << 0;
        /// TCP: the client's SYN.
        pub const SYN: u16 = 1 << 1;
        /// TCP: the backend's SYN-ACK.
        pub const SYN_ACK: u16 = 1 << 2;
        /// TCP: a packet from the client after the SYN-ACK: the handshake completed.
        pub const ESTABLISHED: u16 = 1 << 3;
        /// TCP: a FIN from the client.
        pub const FIN_FORWARD: u16 = 1 << 4;
        /// TCP: a FIN from the backend.
        pub const FIN_REPLY: u16 = 1 << 5;
        /// TCP: a RST from either side.
        pub const RST: u16 = 1 << 6;
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CtValue<A = u32> {
        /// Forward entry: the backend's address and port. Reply entry: the frontend's. Network byte order.
        pub nat_addr: A,
        pub nat_port: u16,
        /// Forward entry: the client port the backend sees. Reply entry: the client's own port.
        pub client_port: u16,
        pub backend_id: u32,
        pub rev_nat_id: u32,
        /// `FLAG_*` bits.
        pub flags: u16,
        /// `state::*` bits (forward entries).
        pub state: u16,
        /// When the flow was created and when it last carried a packet either way, in seconds of the
        /// kernel's monotonic clock (`CLOCK_MONOTONIC`, as `bpf_ktime_get_coarse_ns`).
        pub created: u32,
        pub last_seen: u32,
    }

    /// How long a flow lives without packets, by state, in seconds: netfilter's conntrack timeouts, with
    /// kube-proxy's defaults where it sets them (`conntrack.tcpEstablishedTimeout` 24 h,
    /// `tcpCloseWaitTimeout` 1 h). Kept in the `CONFIG` map, so the agent sets them at start.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Timeouts {
        /// SYN seen, no answer (`nf_conntrack_tcp_timeout_syn_sent`).
        pub tcp_syn_sent: u32,
        /// SYN-ACK seen, handshake not yet complete (`…_syn_recv`).
        pub tcp_syn_recv: u32,
        pub tcp_established: u32,
        /// One side sent a FIN (`…_close_wait`; kube-proxy's `tcpCloseWaitTimeout`).
        pub tcp_close_wait: u32,
        /// Both sides sent a FIN (`…_time_wait`).
        pub tcp_time_wait: u32,
        /// After a RST (`…_close`).
        pub tcp_close: u32,
        /// UDP and other protocols: no answer yet, or answered within the first 2 s (`udp_timeout`).
        pub udp: u32,
        /// Answered and still going after 2 s (`udp_timeout_stream`).
        pub udp_stream: u32,
    }

    impl Timeouts {
        /// The kernel's defaults, with kube-proxy's for established and close-wait TCP.
        pub const DEFAULT: Self = Self {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 86_400,
            tcp_close_wait: 3_600,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp: 30,
            udp_stream: 120,
        };
    }

    impl Default for Timeouts {
        fn default() -> Self {
            Self::DEFAULT
        }
    }

    /// A flow answered and alive this long counts as a stream (netfilter's 2 s).
    pub const STREAM_AFTER_SECS: u32 = 2;

    /// How long a flow in `state` lives without packets: the data path and the agent's sweep both ask this.
    #[inline]
    #[must_use]
    pub fn lifetime<A>(t: &Timeouts, proto: u8, value: &CtValue<A>) -> u32 {
        let s = value.state;
        if proto == super::proto::TCP {
            if s & state::RST != 0 {
                t.tcp_close
            } else if s & (state::FIN_FORWARD | state::FIN_REPLY) == state::FIN_FORWARD | state::FIN_REPLY {
                t.tcp_time_wait
            } else if s & (state::FIN_FORWARD | state::FIN_REPLY) != 0 {
                t.tcp_close_wait
            } else if s & state::ESTABLISHED != 0 {
                t.tcp_established
            } else if s & state::SYN_ACK != 0 {
                t.tcp_syn_recv
            } else {
                t.tcp_syn_sent
            }
        } else if value.flags & FLAG_KERNEL_NAT == 0
            && s & state::REPLIED != 0
            && value.last_seen.wrapping_sub(value.created) >= STREAM_AFTER_SECS
        {
            // A flow left to the kernel's NAT shows no replies here: it gets the shortest UDP lifetime, so it
            // never outlives the kernel's entry (its packets would then pass untranslated).
            t.udp_stream
        } else {
            t.udp
        }
    }

    /// Whether a forward entry's flow has ended: idle past its lifetime at `now` (seconds, same clock).
    #[inline]
    #[must_use]
    pub fn expired<A>(t: &Timeouts, proto: u8, value: &CtValue<A>, now: u32) -> bool {
        now.saturating_sub(value.last_seen) > lifetime(t, proto, value)
    }

    /// Whether a TCP flow is over (both FINs, or a RST): a new SYN on its tuple is a new connection.
    #[inline]
    #[must_use]
    pub fn closed<A>(value: &CtValue<A>) -> bool {
        value.state & state::RST != 0
            || value.state & (state::FIN_FORWARD | state::FIN_REPLY) == state::FIN_FORWARD | state::FIN_REPLY
    }

    /// Whether the flow behind a SNAT port (its `DIR_SNAT_IN` entry) has ended, for the agent's sweep: idle
    /// past the lifetime its TCP state or protocol gives, as for conntrack. (The data path reuses a port on
    /// its own terms, sooner: see `proxy-ebpf/src/snat.rs`.)
    #[inline]
    #[must_use]
    pub fn snat_expired<A>(t: &Timeouts, proto: u8, held: &SnatValue<A>, now: u32) -> bool {
        let closed =
            held.flags & SNAT_RST != 0 || held.flags & (SNAT_FIN_OUT | SNAT_FIN_IN) == SNAT_FIN_OUT | SNAT_FIN_IN;
        let lifetime = if proto != super::proto::TCP {
            t.udp_stream
        } else if closed {
            t.tcp_time_wait
        } else if held.flags & SNAT_CLOSING != 0 {
            t.tcp_close_wait
        } else {
            t.tcp_established
        };
        now.saturating_sub(held.last_seen) > lifetime
    }

    /// SNAT entries (a map of their own, keyed like conntrack): `DIR_SNAT_OUT` maps client → backend to the
    /// node address and port the flow leaves with; `DIR_SNAT_IN` maps backend → node address and port back
    /// to the client.
    pub const DIR_SNAT_OUT: u8 = 2;
    pub const DIR_SNAT_IN: u8 = 3;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SnatValue<A = u32> {
        /// Network byte order.
        pub addr: A,
        /// Network byte order.
        pub port: u16,
        /// `SNAT_*` bits: how far the flow has closed (kept up to date on `DIR_SNAT_IN` entries).
        pub flags: u16,
        /// When the flow last carried a packet, in seconds of the kernel's monotonic clock (`DIR_SNAT_IN`).
        pub last_seen: u32,
        /// The same, in milliseconds, wrapping (`DIR_SNAT_IN`): when a closed flow's port may be reused
        /// is decided in milliseconds. Zero in entries written before this field existed, which reads as
        /// long ago.
        pub last_seen_ms: u32,
    }

    /// IPv6 flows' entries (`CONNTRACK6`, `SNAT6`): the same layout with 16-byte addresses.
    pub type CtKey6 = CtKey<crate::addr::In6>;
    pub type CtValue6 = CtValue<crate::addr::In6>;
    pub type SnatValue6 = SnatValue<crate::addr::In6>;

    /// The SNATed TCP flow has seen a FIN or RST.
    pub const SNAT_CLOSING: u16 = 1;
    /// The client sent a FIN.
    pub const SNAT_FIN_OUT: u16 = 2;
    /// The backend sent a FIN.
    pub const SNAT_FIN_IN: u16 = 4;
    /// Either side sent a RST.
    pub const SNAT_RST: u16 = 8;
}

/// sessionAffinity ClientIP: which backend a client was last given for a frontend, and when.
pub mod affinity {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct AffinityKey<A = u32> {
        pub client_addr: A,
        pub rev_nat_id: u32,
    }

    pub type AffinityKey6 = AffinityKey<crate::addr::In6>;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct AffinityValue {
        pub backend_id: u32,
        pub pad: u32,
        /// `bpf_ktime_get_ns` of the last packet.
        pub last_seen_ns: u64,
    }
}

/// loadBalancerSourceRanges: an LPM trie keyed by reverse-NAT id (matched in full) then source address.
pub mod source_range {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SourceRangeKey<A = u32> {
        /// Network byte order, so the trie matches its bits first and in full.
        pub rev_nat_id: u32,
        /// Network byte order.
        pub addr: A,
    }

    pub type SourceRangeKey6 = SourceRangeKey<crate::addr::In6>;

    /// The prefix length of an entry for a CIDR of `len` bits: the whole id, then the address bits.
    #[must_use]
    pub const fn prefix_len(cidr_len: u8) -> u32 {
        32 + cidr_len as u32
    }
}

#[cfg(feature = "user")]
pub mod pod {
    use super::{affinity, backend::Backend, config::Config, conntrack, revnat::RevNat, service, source_range};

    // SAFETY: each type is repr(C), Copy, made of integers only, and has no padding (see the layout tests),
    // so every bit pattern is valid and no uninitialised byte is ever read.
    /// The address types the maps hold (`u32`, `In6`): with either, every generic key and value below has
    /// no padding (the layout tests check both).
    pub trait MapAddress: aya::Pod {}
    impl MapAddress for u32 {}
    impl MapAddress for super::addr::In6 {}

    unsafe impl<A: MapAddress> aya::Pod for service::ServiceKey<A> {}
    unsafe impl aya::Pod for service::ServiceValue {}
    unsafe impl<A: MapAddress> aya::Pod for Backend<A> {}
    unsafe impl<A: MapAddress> aya::Pod for RevNat<A> {}
    unsafe impl<A: MapAddress> aya::Pod for conntrack::CtKey<A> {}
    unsafe impl<A: MapAddress> aya::Pod for conntrack::CtValue<A> {}
    unsafe impl<A: MapAddress> aya::Pod for conntrack::SnatValue<A> {}
    unsafe impl<A: MapAddress> aya::Pod for affinity::AffinityKey<A> {}
    unsafe impl aya::Pod for affinity::AffinityValue {}
    unsafe impl<A: MapAddress> aya::Pod for source_range::SourceRangeKey<A> {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for super::config::Config6 {}
    unsafe impl aya::Pod for super::addr::In6 {}
    unsafe impl aya::Pod for super::frag::FragKey6 {}
    unsafe impl aya::Pod for super::sock::SockKey6 {}
    unsafe impl aya::Pod for super::sock::SockFrontend6 {}
    unsafe impl aya::Pod for super::sock::SockFlowKey6 {}
    unsafe impl aya::Pod for super::ids::NextIds {}
    unsafe impl aya::Pod for super::sock::SockKey {}
    unsafe impl aya::Pod for super::sock::SockFrontend {}
    unsafe impl aya::Pod for super::sock::SockFlowKey {}
    unsafe impl aya::Pod for super::sock::SockFlow {}
    unsafe impl aya::Pod for super::frag::FragKey {}
    unsafe impl aya::Pod for super::frag::FragValue {}
    unsafe impl aya::Pod for super::maglev::MaglevKey {}
}

#[cfg(test)]
mod layout_tests {
    use super::{
        affinity::*, backend::Backend, config::Config, conntrack::*, revnat::RevNat, service::*, source_range::*,
    };
    use core::mem::{offset_of, size_of};

    #[test]
    fn service_key_has_no_padding() {
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, proto), 6);
        assert_eq!(offset_of!(ServiceKey, scope), 7);
        assert_eq!(offset_of!(ServiceKey, slot), 8);
        assert_eq!(offset_of!(ServiceKey, pad), 10);
    }

    #[test]
    fn service_value_has_no_padding() {
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(offset_of!(ServiceValue, backend_id), 0);
        assert_eq!(offset_of!(ServiceValue, rev_nat_id), 4);
        assert_eq!(offset_of!(ServiceValue, count), 8);
        assert_eq!(offset_of!(ServiceValue, flags), 10);
        assert_eq!(offset_of!(ServiceValue, affinity_timeout), 12);
    }

    #[test]
    fn backend_has_no_padding() {
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(offset_of!(Backend, addr), 0);
        assert_eq!(offset_of!(Backend, port), 4);
        assert_eq!(offset_of!(Backend, proto), 6);
        assert_eq!(offset_of!(Backend, flags), 7);
    }

    #[test]
    fn revnat_has_no_padding() {
        assert_eq!(size_of::<RevNat>(), 8);
        assert_eq!(offset_of!(RevNat, port), 4);
        assert_eq!(offset_of!(RevNat, pad), 6);
    }

    #[test]
    fn conntrack_has_no_padding() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(offset_of!(CtKey, dst_addr), 4);
        assert_eq!(offset_of!(CtKey, src_port), 8);
        assert_eq!(offset_of!(CtKey, dst_port), 10);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(offset_of!(CtKey, dir), 13);
        assert_eq!(offset_of!(CtKey, pad), 14);
        assert_eq!(size_of::<CtValue>(), 28);
        assert_eq!(offset_of!(CtValue, nat_port), 4);
        assert_eq!(offset_of!(CtValue, client_port), 6);
        assert_eq!(offset_of!(CtValue, backend_id), 8);
        assert_eq!(offset_of!(CtValue, rev_nat_id), 12);
        assert_eq!(offset_of!(CtValue, flags), 16);
        assert_eq!(offset_of!(CtValue, state), 18);
        assert_eq!(offset_of!(CtValue, created), 20);
        assert_eq!(offset_of!(CtValue, last_seen), 24);
        assert_eq!(size_of::<Timeouts>(), 32);
        assert_eq!(size_of::<SnatValue>(), 16);
        assert_eq!(offset_of!(SnatValue, port), 4);
        assert_eq!(offset_of!(SnatValue, flags), 6);
        assert_eq!(offset_of!(SnatValue, last_seen), 8);
        assert_eq!(offset_of!(SnatValue, last_seen_ms), 12);
    }

    #[test]
    fn ipv6_layouts_have_no_padding() {
        use super::{backend::Backend6, frag::FragKey6, revnat::RevNat6};
        assert_eq!(size_of::<ServiceKey6>(), 24);
        assert_eq!(offset_of!(ServiceKey6, port), 16);
        assert_eq!(offset_of!(ServiceKey6, slot), 20);
        assert_eq!(offset_of!(ServiceKey6, pad), 22);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(offset_of!(Backend6, flags), 19);
        assert_eq!(size_of::<RevNat6>(), 20);
        assert_eq!(size_of::<CtKey6>(), 40);
        assert_eq!(offset_of!(CtKey6, src_port), 32);
        assert_eq!(offset_of!(CtKey6, pad), 38);
        assert_eq!(size_of::<CtValue6>(), 40);
        assert_eq!(offset_of!(CtValue6, last_seen), 36);
        assert_eq!(size_of::<SnatValue6>(), 28);
        assert_eq!(offset_of!(SnatValue6, last_seen_ms), 24);
        assert_eq!(size_of::<AffinityKey6>(), 20);
        assert_eq!(size_of::<SourceRangeKey6>(), 20);
        assert_eq!(offset_of!(SourceRangeKey6, addr), 4);
        assert_eq!(size_of::<FragKey6>(), 40);
        assert_eq!(offset_of!(FragKey6, pad), 37);
        assert_eq!(size_of::<super::config::Config6>(), 16 + 32 + 4 * 32 + 4 * 16);
        assert_eq!(size_of::<super::sock::SockKey6>(), 32);
        assert_eq!(offset_of!(super::sock::SockKey6, port), 24);
        assert_eq!(offset_of!(super::sock::SockKey6, pad), 26);
        assert_eq!(size_of::<super::sock::SockFrontend6>(), 20);
        assert_eq!(size_of::<super::sock::SockFlowKey6>(), 32);
        assert_eq!(offset_of!(super::sock::SockFlowKey6, proto), 26);
        assert_eq!(offset_of!(super::sock::SockFlowKey6, pad), 27);
    }

    #[test]
    fn flow_hash_of_ipv4_is_unchanged_and_ipv6_mixes_every_word() {
        // Pinned (murmur3's finaliser computed independently): every node and every build, and an upgraded
        // agent's programs, pick the same backend for the same tuple.
        assert_eq!(super::flow_hash(1, 2, 3, 4, 6), 0xcc3d_ddd1);
        let a = super::addr::In6([1, 2, 3, 4]);
        let mut b = a;
        b.0[3] = 5;
        assert_ne!(super::flow_hash6(&a, &a, 1, 2, 6), super::flow_hash6(&a, &b, 1, 2, 6));
        assert_ne!(super::flow_hash6(&a, &b, 1, 2, 6), super::flow_hash6(&b, &a, 1, 2, 6));
    }

    #[test]
    fn ipv6_networks_match_by_mask() {
        use super::{
            addr::In6,
            config::{Config6, Ipv6Net},
        };
        let net = Ipv6Net { addr: In6([0xfd, 0, 0, 0]), mask: In6([0xffff_ffff, 0, 0, 0]) };
        assert!(net.contains(&In6([0xfd, 7, 8, 9])));
        assert!(!net.contains(&In6([0xfe, 0, 0, 0])));
        assert!(!Ipv6Net::default().contains(&In6::UNSPECIFIED), "an unset network matches nothing");
        let mut cfg = Config6::default();
        assert!(!cfg.is_snat_addr(&In6::UNSPECIFIED));
        cfg.snat_addr = In6([1, 2, 3, 4]);
        assert!(cfg.is_snat_addr(&In6([1, 2, 3, 4])));
        assert!(!cfg.is_snat_addr(&In6([1, 2, 3, 5])));
        cfg.snat_addrs[1] = In6([1, 2, 3, 5]);
        assert!(cfg.is_snat_addr(&In6([1, 2, 3, 5])), "a bridge's or an overlay's address");
        assert!(!cfg.is_snat_addr(&In6::UNSPECIFIED), "unused slots match nothing");
        cfg.service_cidrs[0] = net;
        assert!(cfg.has_service_cidrs() && cfg.in_service_cidr(&In6([0xfd, 1, 1, 1])));
        let addr: core::net::Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        assert_eq!(In6::from_octets(addr.octets()).octets(), addr.octets());
        assert!(In6::from_octets([0; 16]) < In6::from_octets(addr.octets()));
    }

    #[test]
    fn affinity_source_range_and_config_have_no_padding() {
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(offset_of!(AffinityValue, pad), 4);
        assert_eq!(offset_of!(AffinityValue, last_seen_ns), 8);
        assert_eq!(size_of::<SourceRangeKey>(), 8);
        assert_eq!(offset_of!(SourceRangeKey, addr), 4);
        assert_eq!(prefix_len(24), 56);
        assert_eq!(size_of::<Config>(), 112);
        assert_eq!(offset_of!(Config, timeouts), 32);
        assert_eq!(offset_of!(Config, service_cidrs), 64);
        assert_eq!(size_of::<super::config::Ipv4Net>(), 8);
        assert_eq!(offset_of!(Config, snat_addr), 8);
        assert_eq!(offset_of!(Config, snat_port_min), 12);
        assert_eq!(offset_of!(Config, snat_port_max), 14);
        assert_eq!(offset_of!(Config, flags), 16);
        assert_eq!(offset_of!(Config, cluster_addr), 20);
        assert_eq!(offset_of!(Config, cluster_mask), 24);
        assert_eq!(offset_of!(Config, maglev_table_size), 28);
        assert_eq!(size_of::<super::maglev::MaglevKey>(), 8);
        assert_eq!(size_of::<super::sock::SockKey>(), 16);
        assert_eq!(offset_of!(super::sock::SockKey, addr), 8);
        assert_eq!(offset_of!(super::sock::SockKey, port), 12);
        assert_eq!(size_of::<super::sock::SockFrontend>(), 8);
        assert_eq!(size_of::<super::ids::NextIds>(), 8);
        assert_eq!(size_of::<super::sock::SockFlowKey>(), 16);
        assert_eq!(offset_of!(super::sock::SockFlowKey, addr), 8);
        assert_eq!(offset_of!(super::sock::SockFlowKey, port), 12);
        assert_eq!(offset_of!(super::sock::SockFlowKey, proto), 14);
        assert_eq!(size_of::<super::sock::SockFlow>(), 16);
        assert_eq!(offset_of!(super::sock::SockFlow, last_seen_ns), 8);
        assert_eq!(size_of::<super::frag::FragKey>(), 12);
        assert_eq!(offset_of!(super::frag::FragKey, id), 8);
        assert_eq!(offset_of!(super::frag::FragKey, proto), 10);
        assert_eq!(size_of::<super::frag::FragValue>(), 8);
        assert_eq!(offset_of!(super::frag::FragValue, seen), 4);
        assert_eq!(offset_of!(super::ids::NextIds, rev_nat), 4);
    }
}
