//! Rewriting addresses and ports, with incremental L3 and L4 checksum updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use proxy_common::{capacity, proto, revnat::RevNat};

use crate::packet::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_OFF, L4_SRC_OFF};

#[map(name = "REVNAT")]
static REVNAT: HashMap<u32, RevNat> = HashMap::pinned(capacity::REVNAT, 0);

/// The frontend address that replies of a translated flow must carry.
#[inline(always)]
pub fn revnat(id: u32) -> Option<RevNat> {
    // SAFETY: the value is copied out at once.
    unsafe { REVNAT.get(&id).copied() }
}

/// Which end of the flow to rewrite.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites one end of the flow to `addr:port` (network byte order), fixing the IPv4 and L4 checksums.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &Flow, side: Side, addr: u32, port: u16) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = match side {
        Side::Source => (flow.src_addr, flow.src_port, IP_SRC_OFF, L4_SRC_OFF),
        Side::Destination => (flow.dst_addr, flow.dst_port, IP_DST_OFF, L4_DST_OFF),
    };
    // The L4 checksum covers the pseudo-header (addresses) and the ports. SCTP's CRC32c covers neither
    // address, so an address change needs no update there; a port change would need a full recompute.
    let l4_csum = match flow.proto {
        proto::TCP => Some((flow.l4_off + 16, 0)),
        // A zero UDP checksum means "none"; MANGLED_0 keeps it that way and never produces a zero.
        proto::UDP => Some((flow.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    };
    if old_addr != addr {
        if let Some((off, extra)) = l4_csum {
            ctx.l4_csum_replace(off, u64::from(old_addr), u64::from(addr), u64::from(BPF_F_PSEUDO_HDR) | extra | 4)?;
        }
        ctx.l3_csum_replace(flow.l3_off + IP_CSUM_OFF, u64::from(old_addr), u64::from(addr), 4)?;
        ctx.store(flow.l3_off + addr_off, &addr, 0)?;
    }
    if old_port != port {
        if flow.proto == proto::SCTP {
            return Err(-1);
        }
        if let Some((off, extra)) = l4_csum {
            ctx.l4_csum_replace(off, u64::from(old_port), u64::from(port), extra | 2)?;
        }
        ctx.store(flow.l4_off + port_off, &port, 0)?;
    }
    Ok(())
}
