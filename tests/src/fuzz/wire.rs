//! Packets as data, and their bytes on the wire: what the fuzzer sends and what the reference expects back.
//! Every checksum is computed here in full from the packet's content, independently of the data path's
//! incremental updates.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use proxy_common::proto;

use crate::bpf::{crc32c, inet_checksum};

pub const ETH_HLEN: usize = 14;
pub const IPPROTO_ICMP: u8 = 1;
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// An L4 payload and header fields; checksums are computed when serialised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        flags: u8,
        payload: Vec<u8>,
    },
    /// `no_csum`: the sender left the checksum out (zero), as UDP allows.
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        no_csum: bool,
    },
    /// An SCTP common header and one DATA-like chunk; `CRC32c` over the whole packet.
    Sctp {
        sport: u16,
        dport: u16,
        tag: u32,
        chunk: Vec<u8>,
    },
    /// ICMP: type, code, the 4 bytes after the checksum, and the body (an error's quote).
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Anything else, as bytes (no checksum).
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

impl L4 {
    #[must_use]
    pub fn proto(&self) -> u8 {
        match self {
            Self::Tcp { .. } => proto::TCP,
            Self::Udp { .. } => proto::UDP,
            Self::Sctp { .. } => proto::SCTP,
            Self::Icmp { .. } => IPPROTO_ICMP,
            Self::Raw { proto, .. } => *proto,
        }
    }

    #[must_use]
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self {
            Self::Tcp { sport, dport, .. } | Self::Udp { sport, dport, .. } | Self::Sctp { sport, dport, .. } => {
                Some((*sport, *dport))
            }
            _ => None,
        }
    }

    pub fn set_ports(&mut self, src: u16, dst: u16) {
        if let Self::Tcp { sport, dport, .. } | Self::Udp { sport, dport, .. } | Self::Sctp { sport, dport, .. } = self
        {
            (*sport, *dport) = (src, dst);
        }
    }
}

/// An IPv4 datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    pub tos: u8,
    pub dont_fragment: bool,
    /// IP options, a multiple of 4 bytes, at most 40.
    pub options: Vec<u8>,
    pub l4: L4,
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto_number: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto_number]);
    p.extend_from_slice(&u16::try_from(len).expect("small datagram").to_be_bytes());
    p
}

impl Datagram {
    /// The L4 bytes with their checksum.
    #[must_use]
    pub fn l4_bytes(&self) -> Vec<u8> {
        match &self.l4 {
            L4::Tcp { sport, dport, seq, flags, payload } => {
                let mut b = Vec::with_capacity(20 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
                b.extend_from_slice(&[0x50, *flags]);
                b.extend_from_slice(&64_240u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
                b.extend_from_slice(payload);
                let mut sum = pseudo_header(self.src, self.dst, proto::TCP, b.len());
                sum.extend_from_slice(&b);
                b[16..18].copy_from_slice(&inet_checksum(&sum).to_be_bytes());
                b
            }
            L4::Udp { sport, dport, payload, no_csum } => {
                let mut b = Vec::with_capacity(8 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&u16::try_from(8 + payload.len()).expect("small").to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                if !no_csum {
                    let mut sum = pseudo_header(self.src, self.dst, proto::UDP, b.len());
                    sum.extend_from_slice(&b);
                    let c = inet_checksum(&sum);
                    b[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
                }
                b
            }
            L4::Sctp { sport, dport, tag, chunk } => {
                let mut b = Vec::with_capacity(12 + chunk.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&tag.to_be_bytes());
                b.extend_from_slice(&[0; 4]);
                b.extend_from_slice(chunk);
                let crc = crc32c(&b);
                b[8..12].copy_from_slice(&crc.to_le_bytes());
                b
            }
            L4::Icmp { kind, code, rest, body } => {
                let mut b = vec![*kind, *code, 0, 0];
                b.extend_from_slice(rest);
                b.extend_from_slice(body);
                let c = inet_checksum(&b);
                b[2..4].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }

    /// The IPv4 header for a packet of `payload_len` bytes at fragment offset `offset` (in bytes, a multiple
    /// of 8) with "more fragments" `more`.
    #[must_use]
    pub fn header(&self, payload_len: usize, offset: usize, more: bool) -> Vec<u8> {
        let ihl = 20 + self.options.len();
        let mut h = Vec::with_capacity(ihl);
        h.push(0x40 | u8::try_from(ihl / 4).expect("ihl fits"));
        h.push(self.tos);
        h.extend_from_slice(&u16::try_from(ihl + payload_len).expect("small").to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        let mut frag = u16::try_from(offset / 8).expect("offset fits");
        if more {
            frag |= 0x2000;
        }
        if self.dont_fragment {
            frag |= 0x4000;
        }
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.l4.proto(), 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = inet_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// The whole datagram as an IP packet.
    #[must_use]
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut p = self.header(l4.len(), 0, false);
        p.extend(l4);
        p
    }

    /// The datagram in fragments of at most `chunk` payload bytes (a multiple of 8), as IP packets.
    #[must_use]
    pub fn fragments(&self, chunk: usize) -> Vec<Vec<u8>> {
        let l4 = self.l4_bytes();
        l4.chunks(chunk)
            .enumerate()
            .map(|(i, part)| {
                let offset = i * chunk;
                let mut p = self.header(part.len(), offset, offset + part.len() < l4.len());
                p.extend_from_slice(part);
                p
            })
            .collect()
    }
}

/// A UDP datagram from `src:sport` to `dst:dport` carrying `payload`, as IPv6 fragments (each with a
/// Fragment header, identification `id`) of at most `chunk` bytes of the fragmentable part (a multiple of
/// 8): what a sender's kernel makes of a datagram bigger than its path MTU. The UDP checksum, mandatory in
/// IPv6, covers the whole datagram.
#[must_use]
pub fn udp6_fragments(
    (src, sport): (Ipv6Addr, u16),
    (dst, dport): (Ipv6Addr, u16),
    payload: &[u8],
    id: u32,
    chunk: usize,
) -> Vec<Vec<u8>> {
    const FRAGMENT_HEADER: u8 = 44;
    let len = 8 + payload.len();
    let mut udp = Vec::with_capacity(len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(len).expect("a datagram under 64 KiB").to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut sum = Vec::with_capacity(40 + len);
    sum.extend_from_slice(&src.octets());
    sum.extend_from_slice(&dst.octets());
    sum.extend_from_slice(&u32::try_from(len).expect("small").to_be_bytes());
    sum.extend_from_slice(&[0, 0, 0, proto::UDP]);
    sum.extend_from_slice(&udp);
    let c = match inet_checksum(&sum) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    udp.chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let offset = i * chunk;
            let more = offset + part.len() < udp.len();
            let mut p = Vec::with_capacity(48 + part.len());
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&u16::try_from(8 + part.len()).expect("small").to_be_bytes());
            p.extend_from_slice(&[FRAGMENT_HEADER, 64]);
            p.extend_from_slice(&src.octets());
            p.extend_from_slice(&dst.octets());
            let offset_field = u16::try_from(offset).expect("offset fits") | u16::from(more);
            p.extend_from_slice(&[proto::UDP, 0]);
            p.extend_from_slice(&offset_field.to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(part);
            p
        })
        .collect()
}

/// An Ethernet frame around an IPv4 packet.
#[must_use]
pub fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[must_use]
pub fn ipv4_frame(ip: &[u8]) -> Vec<u8> {
    frame(NODE_MAC, CLIENT_MAC, 0x0800, ip)
}

/// Checksum fields of a frame, as (offset, is UDP): two frames that differ only in whether such a field
/// holds 0x0000 or 0xffff (the two one's-complement zeros) carry the same checksum, except UDP's, where
/// zero means "none".
fn checksum_fields(f: &[u8]) -> Vec<(usize, bool)> {
    let mut fields = Vec::new();
    let ip_at = |l3: usize, fields: &mut Vec<(usize, bool)>| -> Option<(usize, u8, bool)> {
        let v = *f.get(l3)?;
        if v >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(v & 0x0f) * 4;
        fields.push((l3 + 10, false));
        let frag = u16::from_be_bytes([*f.get(l3 + 6)?, *f.get(l3 + 7)?]);
        Some((l3 + ihl, *f.get(l3 + 9)?, frag.trailing_zeros() >= 13))
    };
    if f.len() < ETH_HLEN || f[12..14] != [0x08, 0x00] {
        return fields;
    }
    let Some((l4, p, first)) = ip_at(ETH_HLEN, &mut fields) else { return fields };
    let l4_field = |p: u8, l4: usize| match p {
        proto::TCP => Some((l4 + 16, false)),
        proto::UDP => Some((l4 + 6, true)),
        IPPROTO_ICMP => Some((l4 + 2, false)),
        _ => None,
    };
    if !first {
        return fields;
    }
    if let Some(field) = l4_field(p, l4) {
        fields.push(field);
    }
    if p == IPPROTO_ICMP
        && let Some((inner_l4, inner_p, _)) = ip_at(l4 + 8, &mut fields)
        && inner_p != IPPROTO_ICMP
        && let Some(field) = l4_field(inner_p, inner_l4)
    {
        fields.push(field);
    }
    fields
}

/// Whether two frames are the same packet: equal bytes, where checksum fields may differ only between
/// the two representations of zero.
#[must_use]
pub fn same_packet(got: &[u8], want: &[u8]) -> bool {
    if got.len() != want.len() {
        return false;
    }
    let mut fields = checksum_fields(want);
    fields.retain(|(off, _)| off + 2 <= want.len());
    let mut i = 0;
    while i < got.len() {
        if let Some((_, udp)) = fields.iter().find(|(off, _)| *off == i) {
            let (g, w) = ([got[i], got[i + 1]], [want[i], want[i + 1]]);
            let zero = |b: [u8; 2]| b == [0, 0] || b == [0xff, 0xff];
            let ok = g == w || (!udp && zero(g) && zero(w));
            if !ok {
                return false;
            }
            i += 2;
            continue;
        }
        if got[i] != want[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Hex, 32 bytes a line, for a failing packet.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(32)
        .map(|line| {
            line.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
        })
        .collect::<Vec<_>>()
        .join("\n")
}
