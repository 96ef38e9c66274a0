//! The two address families the TC service path serves, as one trait over their address types: `u32` for
//! IPv4 and [`In6`] for IPv6 (see `proxy_common::addr`). The service path is written once, generic over
//! [`Family`], and each program runs it for the family its packet's ethertype names; each family has maps
//! of its own (the `Maps` traits of `lb`, `conntrack`, `snat` and `frag`), so the IPv4 path keeps its
//! small keys. What differs between the families beyond the maps lives here: the settings an address is
//! checked against, the 5-tuple hash, and how an address is written into a packet.

use aya_ebpf::{bindings::bpf_fib_lookup, programs::TcContext};
use proxy_common::{addr::In6, config::Config};

use crate::{
    conntrack,
    drop::Result,
    frag, icmp, lb,
    nat::{self, Side},
    packet::{self, Flow, L4Csum, Packet, Parsed},
    reject::{self, Back},
    snat,
};

/// An address family, by its address type as the maps hold it.
pub trait Family: lb::Maps + conntrack::Maps + snat::Maps + frag::Maps + icmp::Quoted + Copy + Eq + Default {
    /// Bits in an address (the longest source range).
    const BITS: u8;
    /// `AF_INET` or `AF_INET6`, for the kernel's FIB lookup.
    const AF: u8;

    /// Whether the address is in kube-proxy's `clusterCIDR` of this family (local-traffic detection).
    fn in_cluster_cidr(&self, cfg: &Config) -> bool;
    /// Whether the address is one of the node's SNAT addresses of this family.
    fn is_snat_addr(&self, cfg: &Config) -> bool;
    /// Whether the address is in a service CIDR of this family, and whether any is set.
    fn in_service_cidr(&self, cfg: &Config) -> bool;
    fn has_service_cidrs(cfg: &Config) -> bool;
    /// The address a flow SNATed on its way out of interface `ifindex` leaves with (zero: none).
    fn snat_addr_for(ifindex: u32, cfg: &Config) -> Self;
    /// The flow's 5-tuple hash (`proxy_common::flow_hash`), the same on every node.
    fn hash(flow: &Flow<Self>) -> u32;
    /// Writes `to` over the address at `side` of the packet (which holds `from`), with the checksums that
    /// cover it (`l4_csum`, where the packet has one).
    fn write_addr<P: Packet>(
        pkt: &P,
        flow: &Flow<Self>,
        side: Side,
        from: Self,
        to: Self,
        l4_csum: Option<L4Csum>,
    ) -> Result<()>;
    /// Parses a frame of this family (`packet::parse4`, `packet::parse6`).
    fn parse<P: Packet>(pkt: &P) -> Parsed<Self>;
    /// Sets the source and destination of a FIB lookup.
    fn set_fib_addrs(params: &mut bpf_fib_lookup, src: Self, dst: Self);
    /// Turns the packet into this family's ICMP port unreachable to its sender.
    fn reject(ctx: &TcContext, flow: &Flow<Self>, back: Back) -> Result<i32>;
}

impl Family for u32 {
    const BITS: u8 = 32;
    const AF: u8 = 2;

    #[inline(always)]
    fn in_cluster_cidr(&self, cfg: &Config) -> bool {
        cfg.cluster_mask != 0 && *self & cfg.cluster_mask == cfg.cluster_addr
    }

    #[inline(always)]
    fn is_snat_addr(&self, cfg: &Config) -> bool {
        cfg.is_snat_addr(*self)
    }

    #[inline(always)]
    fn in_service_cidr(&self, cfg: &Config) -> bool {
        cfg.in_service_cidr(*self)
    }

    #[inline(always)]
    fn has_service_cidrs(cfg: &Config) -> bool {
        cfg.has_service_cidrs()
    }

    #[inline(always)]
    fn snat_addr_for(ifindex: u32, cfg: &Config) -> Self {
        snat::addr_for(ifindex, cfg)
    }

    #[inline(always)]
    fn hash(flow: &Flow<Self>) -> u32 {
        proxy_common::flow_hash(flow.src_addr, flow.dst_addr, flow.src_port, flow.dst_port, flow.proto)
    }

    #[inline(always)]
    fn write_addr<P: Packet>(
        pkt: &P,
        flow: &Flow<Self>,
        side: Side,
        from: Self,
        to: Self,
        l4_csum: Option<L4Csum>,
    ) -> Result<()> {
        nat::write_addr4(pkt, flow, side, from, to, l4_csum)
    }

    #[inline(always)]
    fn parse<P: Packet>(pkt: &P) -> Parsed<Self> {
        packet::parse4(pkt)
    }

    #[inline(always)]
    fn set_fib_addrs(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, flow: &Flow<Self>, back: Back) -> Result<i32> {
        reject::reject4(ctx, flow, back)
    }
}

impl Family for In6 {
    const BITS: u8 = 128;
    const AF: u8 = 10;

    #[inline(always)]
    fn in_cluster_cidr(&self, _cfg: &Config) -> bool {
        snat::config6().is_some_and(|c| c.cluster.contains(self))
    }

    #[inline(always)]
    fn is_snat_addr(&self, _cfg: &Config) -> bool {
        snat::config6().is_some_and(|c| c.is_snat_addr(self))
    }

    #[inline(always)]
    fn in_service_cidr(&self, _cfg: &Config) -> bool {
        snat::config6().is_some_and(|c| c.in_service_cidr(self))
    }

    #[inline(always)]
    fn has_service_cidrs(_cfg: &Config) -> bool {
        snat::config6().is_some_and(proxy_common::config::Config6::has_service_cidrs)
    }

    #[inline(always)]
    fn snat_addr_for(ifindex: u32, _cfg: &Config) -> Self {
        snat::addr6_for(ifindex)
    }

    #[inline(always)]
    fn hash(flow: &Flow<Self>) -> u32 {
        proxy_common::flow_hash6(&flow.src_addr, &flow.dst_addr, flow.src_port, flow.dst_port, flow.proto)
    }

    #[inline(always)]
    fn write_addr<P: Packet>(
        pkt: &P,
        flow: &Flow<Self>,
        side: Side,
        from: Self,
        to: Self,
        l4_csum: Option<L4Csum>,
    ) -> Result<()> {
        nat::write_addr6(pkt, flow, side, from, to, l4_csum)
    }

    #[inline(always)]
    fn parse<P: Packet>(pkt: &P) -> Parsed<Self> {
        packet::parse6(pkt)
    }

    #[inline(always)]
    fn set_fib_addrs(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        params.__bindgen_anon_3.ipv6_src = src.0;
        params.__bindgen_anon_4.ipv6_dst = dst.0;
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, flow: &Flow<Self>, back: Back) -> Result<i32> {
        reject::reject6(ctx, flow, back)
    }
}
