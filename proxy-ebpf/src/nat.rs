//! Rewriting addresses and ports, with incremental L3 and L4 checksum updates.

use aya_ebpf::{macros::map, maps::HashMap};
use proxy_common::{
    addr::In6,
    capacity, proto,
    revnat::{RevNat, RevNat6},
};

use crate::{
    drop::{Result, SCTP_PORT_CHANGE},
    family::Family,
    packet::{
        Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF, L4_DST_OFF, L4_SRC_OFF, L4Csum, Packet,
    },
};

/// Reverse-NAT id → frontend. The data path no longer reads it (a flow's reply entry holds its frontend,
/// so a reply is translated even after its Service is gone, as netfilter's conntrack does); the agent keeps
/// it as the record of which id names which frontend (affinity and source ranges are keyed by the id).
#[map(name = "REVNAT")]
static REVNAT: HashMap<u32, RevNat> = HashMap::pinned(capacity::REVNAT, capacity::NO_PREALLOC);

/// IPv6 frontends' records, as `REVNAT`.
#[map(name = "REVNAT6")]
static REVNAT6: HashMap<u32, RevNat6> = HashMap::pinned(capacity::REVNAT, capacity::NO_PREALLOC);

/// Which end of the flow to rewrite.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites one end of the flow to `addr:port` (network byte order), fixing the checksums (IPv4's header
/// checksum, and the L4 checksum, whose pseudo-header covers the addresses in both families). `flow` is
/// updated to match the packet. A later fragment has no ports to rewrite: only its address.
#[inline(always)]
pub fn rewrite<A: Family, P: Packet>(pkt: &P, flow: &mut Flow<A>, side: Side, addr: A, port: u16) -> Result<()> {
    let (old_addr, old_port, port_off) = match side {
        Side::Source => (flow.src_addr, flow.src_port, L4_SRC_OFF),
        Side::Destination => (flow.dst_addr, flow.dst_port, L4_DST_OFF),
    };
    let l4_csum = flow.l4_csum();
    if old_addr != addr {
        A::write_addr(pkt, flow, side, old_addr, addr, l4_csum)?;
    }
    if old_port != port && flow.has_l4_header() {
        if flow.proto == proto::SCTP {
            return Err(SCTP_PORT_CHANGE);
        }
        if let Some(csum) = l4_csum {
            pkt.l4_csum_replace(csum, u32::from(old_port), u32::from(port), 2, false)?;
        }
        pkt.store(flow.l4() + port_off, &port)?;
    }
    match side {
        Side::Source => (flow.src_addr, flow.src_port) = (addr, port),
        Side::Destination => (flow.dst_addr, flow.dst_port) = (addr, port),
    }
    Ok(())
}

/// IPv4: the address, the header checksum, and the L4 checksum's pseudo-header.
#[inline(always)]
pub fn write_addr4<P: Packet>(
    pkt: &P,
    flow: &Flow<u32>,
    side: Side,
    from: u32,
    to: u32,
    l4_csum: Option<L4Csum>,
) -> Result<()> {
    let addr_off = match side {
        Side::Source => IP_SRC_OFF,
        Side::Destination => IP_DST_OFF,
    };
    if let Some(csum) = l4_csum {
        pkt.l4_csum_replace(csum, from, to, 4, true)?;
    }
    pkt.l3_csum_replace(flow.l3() + IP_CSUM_OFF, from, to)?;
    pkt.store(flow.l3() + addr_off, &to)
}

/// IPv6: the address and the L4 checksum's pseudo-header, a word at a time (IPv6 has no header checksum).
#[inline(always)]
pub fn write_addr6<P: Packet>(
    pkt: &P,
    flow: &Flow<In6>,
    side: Side,
    from: In6,
    to: In6,
    l4_csum: Option<L4Csum>,
) -> Result<()> {
    let addr_off = match side {
        Side::Source => IP6_SRC_OFF,
        Side::Destination => IP6_DST_OFF,
    };
    if let Some(csum) = l4_csum {
        for i in 0..4 {
            if from.0[i] != to.0[i] {
                pkt.l4_csum_replace(csum, from.0[i], to.0[i], 4, true)?;
            }
        }
    }
    pkt.store(flow.l3() + addr_off, &to)
}
