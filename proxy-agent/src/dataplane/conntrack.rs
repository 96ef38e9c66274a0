//! Deleting stale UDP conntrack entries over netlink (ctnetlink), for the netfilter modes.
//!
//! UDP flows have no end the kernel can see: conntrack keeps sending a client's packets to an endpoint that
//! is gone (the stale-DNS failure kube-proxy users know), so when a UDP frontend loses an endpoint its
//! entries are deleted. One `conntrack -D` per (frontend, endpoint) pair dumped the whole table each time —
//! 60 ms apiece on a busy node, most of a sync. Here one dump per sync finds every stale entry, and each is
//! then deleted by its tuple.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context as _, bail};
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol, Tuple},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// UDP entries to delete: sent to `frontend`, answered by `backend` (conntrack's reply source address and
/// port: an endpoint whose port was renumbered is a different endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleUdp {
    pub frontend: (IpAddr, u16),
    pub backend: (IpAddr, u16),
}

/// One entry with ports as the dump shows it: its original tuple, and where replies come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    protocol: Protocol,
    source: (IpAddr, u16),
    destination: (IpAddr, u16),
    reply_source: (IpAddr, u16),
    /// TCP's conntrack state (`TCP_CONNTRACK_*`), when the entry says.
    tcp_state: Option<u8>,
}

impl Entry {
    fn is_stale(&self, stale: &BTreeSet<StaleUdp>) -> bool {
        self.protocol == Protocol::Udp
            && stale.contains(&StaleUdp { frontend: self.destination, backend: self.reply_source })
    }
}

/// Deletes the UDP conntrack entries of every stale pair, in this network namespace, IPv4 and IPv6.
/// Returns how many went.
///
/// # Errors
/// When netlink cannot be reached or the dump fails; an entry that vanished before its delete is not one.
pub fn delete_stale_udp(stale: &BTreeSet<StaleUdp>) -> anyhow::Result<usize> {
    let mut deleted = 0;
    for ipv6 in [false, true] {
        if stale.iter().any(|s| s.frontend.0.is_ipv6() == ipv6) {
            deleted += delete_stale_udp_of(stale, family(ipv6))?;
        }
    }
    Ok(deleted)
}

fn family(ipv6: bool) -> NetfilterProtoFamily {
    if ipv6 { NetfilterProtoFamily::IPv6 } else { NetfilterProtoFamily::IPv4 }
}

/// [`delete_stale_udp`] for one family's table (a ctnetlink dump lists one family).
fn delete_stale_udp_of(stale: &BTreeSet<StaleUdp>, family: NetfilterProtoFamily) -> anyhow::Result<usize> {
    // The dump first, deletes after: deleting while the kernel walks the table could skip entries. A kernel
    // without dump filters (before 5.8) refuses the filtered dump and gets the whole table on a fresh
    // socket; the entries are checked here either way.
    let socket = open().context("opening a ctnetlink socket")?;
    let (socket, entries) = if let Ok(entries) = dump(&socket, true, family) {
        (socket, entries)
    } else {
        let socket = open().context("opening a ctnetlink socket")?;
        let entries = dump(&socket, false, family)?;
        (socket, entries)
    };
    let doomed: Vec<Entry> = entries.into_iter().filter(|e| e.is_stale(stale)).collect();
    let mut deleted = 0;
    for entry in &doomed {
        match request(&socket, ConntrackMessage::Delete(vec![orig_tuple(entry)]), NLM_F_REQUEST | NLM_F_ACK, family)? {
            Ack::Ok => deleted += 1,
            // Expired or deleted by someone else since the dump.
            Ack::Error(code) if code == -libc::ENOENT => {}
            Ack::Error(code) => {
                bail!("deleting conntrack entry {entry:?}: {}", std::io::Error::from_raw_os_error(-code))
            }
        }
    }
    Ok(deleted)
}

/// TCP's conntrack states (`linux/netfilter/nf_conntrack_tcp.h`).
const TCP_CONNTRACK_SYN_SENT: u8 = 1;
const TCP_CONNTRACK_SYN_RECV: u8 = 2;
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
const TCP_CONNTRACK_CLOSE: u8 = 8;
const TCP_CONNTRACK_SYN_SENT2: u8 = 9;

/// A flow the kernel's NAT translated (its replies come from another address or port than the client sent
/// to: a DNAT, as kube-proxy's rules do), as the client sends it. Both ends are of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TranslatedFlow {
    /// `libc::IPPROTO_TCP` or `libc::IPPROTO_UDP`.
    pub protocol: u8,
    pub source: (IpAddr, u16),
    pub destination: (IpAddr, u16),
    /// TCP still in its handshake (`SYN_SENT`, `SYN_RECV`, `SYN_SENT2`).
    pub handshake: bool,
}

/// Every TCP and UDP flow of either family the kernel's conntrack holds with a destination NAT, in this
/// network namespace: the flows netfilter rules translated and goes on translating whatever happens to
/// the rules. TCP connections that are over (`TIME_WAIT`, `CLOSE`) are left out.
///
/// # Errors
/// When netlink cannot be reached or a dump fails.
pub fn translated_flows() -> anyhow::Result<Vec<TranslatedFlow>> {
    let socket = open().context("opening a ctnetlink socket")?;
    let mut flows = Vec::new();
    for family in [NetfilterProtoFamily::IPv4, NetfilterProtoFamily::IPv6] {
        flows.extend(
            dump(&socket, false, family)?
                .into_iter()
                .filter(|e| e.reply_source != e.destination)
                .filter(|e| !matches!(e.tcp_state, Some(TCP_CONNTRACK_TIME_WAIT | TCP_CONNTRACK_CLOSE)))
                .filter(|e| e.source.0.is_ipv4() == e.destination.0.is_ipv4())
                .filter_map(|e| {
                    let protocol = match e.protocol {
                        Protocol::Tcp => libc::IPPROTO_TCP,
                        Protocol::Udp => libc::IPPROTO_UDP,
                        _ => return None,
                    };
                    let handshake = matches!(
                        e.tcp_state,
                        Some(TCP_CONNTRACK_SYN_SENT | TCP_CONNTRACK_SYN_RECV | TCP_CONNTRACK_SYN_SENT2)
                    );
                    Some(TranslatedFlow {
                        protocol: u8::try_from(protocol).ok()?,
                        source: e.source,
                        destination: e.destination,
                        handshake,
                    })
                }),
        );
    }
    Ok(flows)
}

fn open() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // The sync thread waits on this socket: a kernel that stopped answering must not hold it forever.
    let timeout = nix::sys::time::TimeVal::new(RECEIVE_TIMEOUT_SECONDS, 0);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    Ok(socket)
}

/// Far longer than a dump of a full table takes (the kernel answers each read at once).
const RECEIVE_TIMEOUT_SECONDS: i64 = 10;

fn message(inner: ConntrackMessage, flags: u16, family: NetfilterProtoFamily) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), inner)),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

enum Ack {
    Ok,
    Error(i32),
}

/// Sends one request and reads its acknowledgment.
fn request(socket: &Socket, inner: ConntrackMessage, flags: u16, family: NetfilterProtoFamily) -> anyhow::Result<Ack> {
    socket.send(&message(inner, flags, family), 0)?;
    let mut buf = vec![0u8; 8192];
    let n = socket.recv(&mut &mut buf[..], 0)?;
    let reply = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[..n]).context("parsing a ctnetlink reply")?;
    match reply.payload {
        NetlinkPayload::Error(e) => Ok(e.code.map_or(Ack::Ok, |c| Ack::Error(c.get()))),
        other => bail!("unexpected ctnetlink reply {other:?}"),
    }
}

/// ctnetlink's dump filter (`CTA_FILTER`, Linux 5.8): a nested attribute whose `CTA_FILTER_ORIG_FLAGS` say
/// which fields of the request's original tuple an entry must match.
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// `CTA_FILTER_F_CTA_PROTO_NUM` (`net/netfilter/nf_internals.h`): match the L4 protocol number.
const FILTER_PROTO_NUM: u32 = 1 << 3;
const NLA_F_NESTED: u16 = 1 << 15;

/// The dump request's attributes that make the kernel send UDP entries only: on a busy node the table is
/// mostly TCP, and copying and parsing it all is what a sync would wait for.
fn udp_filter() -> Vec<ConntrackAttribute> {
    let mut flags = Vec::with_capacity(8);
    flags.extend(8u16.to_ne_bytes()); // nla_len: header and u32
    flags.extend(CTA_FILTER_ORIG_FLAGS.to_ne_bytes());
    flags.extend(FILTER_PROTO_NUM.to_ne_bytes());
    vec![
        ConntrackAttribute::CtaTupleOrig(vec![Tuple::Proto(vec![ProtoTuple::Protocol(Protocol::Udp)])]),
        ConntrackAttribute::Other(DefaultNla::new(CTA_FILTER, flags)),
    ]
}

/// Sets `NLA_F_NESTED` on the request's top-level `CTA_FILTER` attribute: the kernel parses it strictly and
/// wants the flag, which the netlink crate only sets for attribute types it knows to be nested.
fn mark_filter_nested(request: &mut [u8]) {
    // netlink header (16 bytes), then nfgenmsg (4), then the attributes: length and type, u16 each.
    let mut at = 20;
    while at + 4 <= request.len() {
        let length = usize::from(u16::from_ne_bytes([request[at], request[at + 1]]));
        let kind = u16::from_ne_bytes([request[at + 2], request[at + 3]]);
        if kind == CTA_FILTER {
            request[at + 2..at + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        }
        if length < 4 {
            break;
        }
        at += length.next_multiple_of(4);
    }
}

/// The table's entries of `family` with ports, from one dump; `udp_only` asks the kernel for UDP entries
/// only.
fn dump(socket: &Socket, udp_only: bool, family: NetfilterProtoFamily) -> anyhow::Result<Vec<Entry>> {
    let filter = if udp_only { udp_filter() } else { Vec::new() };
    let mut request = message(ConntrackMessage::Get(filter), NLM_F_REQUEST | NLM_F_DUMP, family);
    mark_filter_nested(&mut request);
    socket.send(&request, 0)?;
    let mut entries = Vec::new();
    // Large enough for the kernel's dump batches (it fills up to a page-sized skb, or 32 KiB).
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0).context("reading the conntrack dump")?;
        let mut offset = 0;
        while offset < n {
            let reply = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[offset..n])
                .context("parsing the conntrack dump")?;
            let length = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(entries),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    bail!("conntrack dump failed: {}", std::io::Error::from_raw_os_error(-e.raw_code()))
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                    ..
                }) => entries.extend(entry(&attributes)),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// The entry's tuples, if it has ports.
fn entry(attributes: &[ConntrackAttribute]) -> Option<Entry> {
    let mut orig = None;
    let mut reply = None;
    let mut tcp_state = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(tuple(t)),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(tuple(t)),
            ConntrackAttribute::CtaProtoInfo(info) => {
                tcp_state = info.iter().find_map(|i| match i {
                    ProtoInfo::TCP(tcp) => tcp.iter().find_map(|t| match t {
                        ProtoInfoTCP::State(s) => Some(*s),
                        _ => None,
                    }),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    let (orig, reply) = (orig?, reply?);
    Some(Entry {
        protocol: orig.protocol?,
        source: (orig.source?, orig.source_port?),
        destination: (orig.destination?, orig.destination_port?),
        reply_source: (reply.source?, reply.source_port?),
        tcp_state,
    })
}

#[derive(Default)]
struct Parsed {
    source: Option<IpAddr>,
    destination: Option<IpAddr>,
    protocol: Option<Protocol>,
    source_port: Option<u16>,
    destination_port: Option<u16>,
}

/// Reads one tuple.
fn tuple(parts: &[Tuple]) -> Parsed {
    let mut out = Parsed::default();
    for part in parts {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => out.source = Some(*a),
                        IPTuple::DestinationAddress(a) => out.destination = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for proto in protos {
                    match proto {
                        ProtoTuple::Protocol(p) => out.protocol = Some(*p),
                        ProtoTuple::SourcePort(p) => out.source_port = Some(*p),
                        ProtoTuple::DestinationPort(p) => out.destination_port = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The original tuple that names `entry` in a delete request.
fn orig_tuple(entry: &Entry) -> ConntrackAttribute {
    ConntrackAttribute::CtaTupleOrig(vec![
        Tuple::Ip(vec![IPTuple::SourceAddress(entry.source.0), IPTuple::DestinationAddress(entry.destination.0)]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(entry.protocol),
            ProtoTuple::SourcePort(entry.source.1),
            ProtoTuple::DestinationPort(entry.destination.1),
        ]),
    ])
}

#[cfg(test)]
#[path = "conntrack_tests.rs"]
mod tests;
