//! Rewriting addresses and ports, with incremental L3 and L4 checksum updates.

use aya_ebpf::{macros::map, maps::HashMap};
use proxy_common::{capacity, proto, revnat::RevNat};

use crate::{
    drop::{Result, SCTP_PORT_CHANGE},
    packet::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_OFF, L4_SRC_OFF, Packet},
};

/// Reverse-NAT id → frontend. The data path no longer reads it (a flow's reply entry holds its frontend,
/// so a reply is translated even after its Service is gone, as netfilter's conntrack does); the agent keeps
/// it as the record of which id names which frontend (affinity and source ranges are keyed by the id).
#[map(name = "REVNAT")]
static REVNAT: HashMap<u32, RevNat> = HashMap::pinned(capacity::REVNAT, capacity::NO_PREALLOC);

/// Which end of the flow to rewrite.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites one end of the flow to `addr:port` (network byte order), fixing the IPv4 and L4 checksums.
/// `flow` is updated to match the packet. A later fragment has no ports to rewrite: only its address.
#[inline(always)]
pub fn rewrite<P: Packet>(pkt: &P, flow: &mut Flow, side: Side, addr: u32, port: u16) -> Result<()> {
    let (old_addr, old_port, addr_off, port_off) = match side {
        Side::Source => (flow.src_addr, flow.src_port, IP_SRC_OFF, L4_SRC_OFF),
        Side::Destination => (flow.dst_addr, flow.dst_port, IP_DST_OFF, L4_DST_OFF),
    };
    let l4_csum = flow.l4_csum();
    if old_addr != addr {
        if let Some(csum) = l4_csum {
            pkt.l4_csum_replace(csum, old_addr, addr, 4, true)?;
        }
        pkt.l3_csum_replace(flow.l3_off + IP_CSUM_OFF, old_addr, addr)?;
        pkt.store(flow.l3_off + addr_off, &addr)?;
    }
    if old_port != port && flow.has_l4_header() {
        if flow.proto == proto::SCTP {
            return Err(SCTP_PORT_CHANGE);
        }
        if let Some(csum) = l4_csum {
            pkt.l4_csum_replace(csum, u32::from(old_port), u32::from(port), 2, false)?;
        }
        pkt.store(flow.l4_off + port_off, &port)?;
    }
    match side {
        Side::Source => (flow.src_addr, flow.src_port) = (addr, port),
        Side::Destination => (flow.dst_addr, flow.dst_port) = (addr, port),
    }
    Ok(())
}
