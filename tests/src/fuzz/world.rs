//! The node the fuzzer programs: a handful of frontends of every kind, written into the real maps exactly as
//! the agent's writer lays them out (slot 0 last), and read by the reference as plain data.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};
use proxy_common::{
    backend::{Backend, FLAG_LOCAL},
    config::Config,
    proto,
    revnat::RevNat,
    service::{SCOPE_EXTERNAL, ServiceKey, ServiceValue, flags},
    source_range::{SourceRangeKey, prefix_len},
};

/// The node's own address: NodePorts live on it, SNATed flows leave with it.
pub const NODE: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 11);
pub const SNAT_PORTS: (u16, u16) = (40_000, 49_999);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendDef {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub local: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: &'static str,
    pub kind: Kind,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub rev_nat_id: u32,
    pub backends: Vec<BackendDef>,
    /// externalTrafficPolicy Cluster: external traffic is SNATed.
    pub masquerade_external: bool,
    /// With no backend: refuse (ICMP) rather than drop.
    pub reject_when_empty: bool,
    /// loadBalancerSourceRanges, if any.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

const fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn backend(id: u32, a: [u8; 4], port: u16, local: bool) -> BackendDef {
    BackendDef { id, addr: Ipv4Addr::from(a), port, local }
}

/// The frontends: ClusterIPs (TCP with two backends, UDP, SCTP, one without endpoints that rejects),
/// NodePorts with externalTrafficPolicy Cluster (remote backend: SNAT) and Local (local backend), and a
/// load-balancer IP with source ranges.
#[must_use]
pub fn frontends() -> Vec<Frontend> {
    let web = vec![backend(1, [10, 200, 2, 12], 8080, false), backend(2, [10, 200, 1, 12], 8080, true)];
    let dns = vec![backend(3, [10, 200, 2, 13], 5353, false)];
    let cluster = |name, last, port, proto, backends: Vec<BackendDef>, id| Frontend {
        name,
        kind: Kind::ClusterIp,
        addr: Ipv4Addr::new(10, 32, 0, last),
        port,
        proto,
        rev_nat_id: id,
        backends,
        masquerade_external: true,
        reject_when_empty: true,
        source_ranges: Vec::new(),
    };
    vec![
        cluster("web", 10, 80, proto::TCP, web.clone(), 1),
        cluster("dns", 53, 53, proto::UDP, dns.clone(), 2),
        cluster("sctp", 30, 2905, proto::SCTP, vec![backend(4, [10, 200, 2, 14], 2905, false)], 3),
        cluster("empty", 99, 80, proto::TCP, Vec::new(), 4),
        Frontend {
            name: "web-nodeport",
            kind: Kind::NodePort,
            addr: NODE,
            port: 30_080,
            proto: proto::TCP,
            rev_nat_id: 5,
            backends: vec![web[0]],
            masquerade_external: true,
            reject_when_empty: true,
            source_ranges: Vec::new(),
        },
        Frontend {
            name: "dns-nodeport",
            kind: Kind::NodePort,
            addr: NODE,
            port: 30_053,
            proto: proto::UDP,
            rev_nat_id: 6,
            backends: dns,
            masquerade_external: true,
            reject_when_empty: true,
            source_ranges: Vec::new(),
        },
        Frontend {
            name: "local-nodeport",
            kind: Kind::NodePort,
            addr: NODE,
            port: 30_081,
            proto: proto::UDP,
            rev_nat_id: 7,
            backends: vec![backend(5, [10, 200, 1, 15], 9000, true)],
            masquerade_external: false,
            reject_when_empty: true,
            source_ranges: Vec::new(),
        },
        Frontend {
            name: "lb",
            kind: Kind::LoadBalancer,
            addr: Ipv4Addr::new(192, 0, 2, 10),
            port: 443,
            proto: proto::TCP,
            rev_nat_id: 8,
            backends: vec![backend(6, [10, 200, 1, 16], 8443, true)],
            masquerade_external: false,
            reject_when_empty: true,
            source_ranges: vec![(Ipv4Addr::new(198, 51, 100, 0), 24)],
        },
    ]
}

/// Writes the frontends and the node's settings into the object's maps.
pub fn program(ebpf: &mut Ebpf, frontends: &[Frontend]) -> anyhow::Result<()> {
    {
        let mut backends: HashMap<_, u32, Backend> = HashMap::try_from(ebpf.map_mut("BACKENDS").expect("BACKENDS"))?;
        for b in frontends.iter().flat_map(|f| f.backends.iter().map(move |b| (f, b))) {
            let (f, b) = b;
            let value = Backend {
                addr: be(b.addr),
                port: b.port.to_be(),
                proto: f.proto,
                flags: if b.local { FLAG_LOCAL } else { 0 },
            };
            backends.insert(&b.id, &value, 0)?;
        }
    }
    {
        let mut revnat: HashMap<_, u32, RevNat> = HashMap::try_from(ebpf.map_mut("REVNAT").expect("REVNAT"))?;
        for f in frontends {
            revnat.insert(&f.rev_nat_id, &RevNat { addr: be(f.addr), port: f.port.to_be(), pad: 0 }, 0)?;
        }
    }
    {
        let mut ranges: LpmTrie<_, SourceRangeKey, u32> =
            LpmTrie::try_from(ebpf.map_mut("SOURCE_RANGES").expect("SOURCE_RANGES"))?;
        for f in frontends {
            for (addr, len) in &f.source_ranges {
                let key =
                    Key::new(prefix_len(*len), SourceRangeKey { rev_nat_id: f.rev_nat_id.to_be(), addr: be(*addr) });
                ranges.insert(&key, &1, 0)?;
            }
        }
    }
    {
        let mut services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(ebpf.map_mut("SERVICES").expect("SERVICES"))?;
        for f in frontends {
            let key = |slot| ServiceKey::new(be(f.addr), f.port.to_be(), f.proto, SCOPE_EXTERNAL, slot);
            for (slot, b) in (1u16..).zip(&f.backends) {
                let value = ServiceValue {
                    backend_id: b.id,
                    rev_nat_id: f.rev_nat_id,
                    count: 0,
                    flags: 0,
                    affinity_timeout: 0,
                };
                services.insert(&key(slot), &value, 0)?;
            }
            let mut f_flags = 0;
            if f.masquerade_external {
                f_flags |= flags::MASQUERADE_EXTERNAL;
            }
            if f.kind == Kind::ClusterIp {
                f_flags |= flags::CLUSTER_IP;
            }
            if f.reject_when_empty {
                f_flags |= flags::REJECT_WHEN_EMPTY;
            }
            if !f.source_ranges.is_empty() {
                f_flags |= flags::SOURCE_RANGES;
            }
            let count = u16::try_from(f.backends.len())?;
            let slot0 =
                ServiceValue { backend_id: 0, rev_nat_id: f.rev_nat_id, count, flags: f_flags, affinity_timeout: 0 };
            services.insert(&key(0), &slot0, 0)?;
        }
    }
    {
        // Every address a frontend other than a NodePort lives on, as the agent keeps it.
        let mut addrs: HashMap<_, u32, u32> =
            HashMap::try_from(ebpf.map_mut("FRONTEND_ADDRS").expect("FRONTEND_ADDRS"))?;
        for f in frontends.iter().filter(|f| f.kind != Kind::NodePort) {
            addrs.insert(&be(f.addr), &1, 0)?;
        }
        // As if an external IP lived on the node's own address: a fragment to it is delivered locally, never
        // forwarded, so it must pass (the data path asks the FIB).
        addrs.insert(&be(NODE), &1, 0)?;
    }
    let mut config: Array<_, Config> = Array::try_from(ebpf.map_mut("CONFIG").expect("CONFIG"))?;
    let cfg =
        Config { snat_addr: be(NODE), snat_port_min: SNAT_PORTS.0, snat_port_max: SNAT_PORTS.1, ..Config::default() };
    config.set(0, &cfg, 0)?;
    Ok(())
}
