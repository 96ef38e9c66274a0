//! The reference: scenarios of packets a node's programs meet, each with what the program must do to it.
//!
//! Each scenario picks fresh client addresses and ports, so scenarios never see each other's state, and
//! walks one flow as the node would carry it: the first packet at the hook it enters by, the reply, the
//! SNAT leg, ICMP errors about either leg, fragments, the end. The only thing the reference does not
//! decide is what the data path chooses at random (a backend among several, a SNAT port in the range):
//! it reads the choice from the output, checks it is allowed, and holds the rest of the flow to it.
//!
//! What the reference requires, by packet:
//! - not addressed to a frontend, not a reply or an error about a translated flow: passed, not one bit
//!   changed. Garbage, ARP, IPv6, VLAN-tagged frames, ICMP other than errors, later fragments with no first
//!   fragment seen: the same.
//! - to a frontend: DNAT to one of its backends; `skb->mark`'s SNAT bit set exactly when kube-proxy would
//!   masquerade (external traffic with externalTrafficPolicy Cluster, any flow to a remote backend arriving
//!   from outside, hairpin); a frontend without backends: an ICMP port unreachable from the frontend back
//!   to the client; outside `loadBalancerSourceRanges`: dropped.
//! - marked for SNAT at egress: the node's address and a port from the configured range, the same port for
//!   the flow's later packets.
//! - replies: un-SNAT at ingress, the frontend's address and port at egress.
//! - ICMP errors: the quote and the error's header as netfilter's NAT leaves them.
//! - later fragments: the addresses their first fragment got, the payload untouched.
//! - truncated packets: unchanged when too short to be read as a flow; dropped when too short to be
//!   rewritten; rewritten as far as they go otherwise.
//!
//! Every expected packet is built from the datagram with its fields changed and every checksum computed
//! anew from the content ([`super::wire`]).

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU16, Ordering},
};

use proxy_common::{mark, proto};
use rand::{RngExt as _, rngs::SmallRng};

use super::{
    Fuzzer, Probe, Prog, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_TX,
    wire::{self, Datagram, L4, ipv4_frame, same_packet},
    world::{BackendDef, Frontend, Kind, NODE, SNAT_PORTS},
};

/// A router between the node and the backend's node, or the backend's node itself.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 12);

fn addr_of(frame: &[u8], off: usize) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::new(*frame.get(off)?, *frame.get(off + 1)?, *frame.get(off + 2)?, *frame.get(off + 3)?))
}

fn port_of(frame: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
}

/// Where the L4 header of an (outer) IPv4 frame starts.
fn l4_off(frame: &[u8]) -> usize {
    wire::ETH_HLEN + usize::from(frame[wire::ETH_HLEN] & 0x0f) * 4
}

fn random_options(rng: &mut SmallRng) -> Vec<u8> {
    match rng.random_range(0..10) {
        0..=6 => Vec::new(),
        // NOPs ending in EOL, as padding would be.
        7 => {
            let mut o = vec![1; 4 * rng.random_range(1..=3)];
            *o.last_mut().expect("non-empty") = 0;
            o
        }
        // Record route with room for a few hops.
        8 => {
            let hops = rng.random_range(1..=8usize);
            let mut o = vec![7, u8::try_from(3 + 4 * hops).expect("small"), 4];
            o.resize(3 + 4 * hops, 0);
            o.resize(o.len().div_ceil(4) * 4, 0);
            o
        }
        // Anything at all: the programs only skip options.
        _ => {
            let mut o = vec![0u8; 4 * rng.random_range(1..=10)];
            rng.fill(&mut o[..]);
            o
        }
    }
}

fn payload(rng: &mut SmallRng, max: usize) -> Vec<u8> {
    let mut p = vec![0u8; rng.random_range(0..=max)];
    rng.fill(&mut p[..]);
    p
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;

fn l4(rng: &mut SmallRng, proto_number: u8, sport: u16, dport: u16, tcp_flags: u8, max_payload: usize) -> L4 {
    match proto_number {
        proto::TCP => L4::Tcp { sport, dport, seq: rng.random(), flags: tcp_flags, payload: payload(rng, max_payload) },
        proto::UDP => L4::Udp { sport, dport, payload: payload(rng, max_payload), no_csum: rng.random_bool(0.1) },
        _ => L4::Sctp {
            sport,
            dport,
            tag: rng.random(),
            chunk: vec![0, 3, 0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        },
    }
}

/// IP ids count up, as a sender's do, so two datagrams of one flow never share an id while the first's
/// fragment record may still be alive (random ids would, now and then, and a later fragment would then
/// rightly be translated with the other datagram's ports).
static NEXT_IP_ID: AtomicU16 = AtomicU16::new(0);

pub fn reset_ip_ids() {
    NEXT_IP_ID.store(0, Ordering::Relaxed);
}

fn next_ip_id() -> u16 {
    NEXT_IP_ID.fetch_add(1, Ordering::Relaxed)
}

fn datagram(rng: &mut SmallRng, src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Datagram {
    Datagram {
        src,
        dst,
        ttl: rng.random_range(2..=64),
        id: next_ip_id(),
        tos: 0,
        dont_fragment: rng.random_bool(0.5),
        options: random_options(rng),
        l4,
    }
}

fn with(dg: &Datagram, src: Option<(Ipv4Addr, u16)>, dst: Option<(Ipv4Addr, u16)>) -> Datagram {
    let mut d = dg.clone();
    let (mut sport, mut dport) = d.l4.ports().unwrap_or((0, 0));
    if let Some((a, p)) = src {
        d.src = a;
        sport = p;
    }
    if let Some((a, p)) = dst {
        d.dst = a;
        dport = p;
    }
    d.l4.set_ports(sport, dport);
    d
}

fn pod_client(rng: &mut SmallRng) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, 200, 1, rng.random_range(20..=250)), rng.random_range(1024..=65_535))
}

fn external_client(rng: &mut SmallRng, in_ranges: bool) -> (Ipv4Addr, u16) {
    let a = if in_ranges { [198, 51, 100, rng.random()] } else { [203, 0, 113, rng.random()] };
    (Ipv4Addr::from(a), rng.random_range(1024..=65_535))
}

/// An ICMP error about `quoted`, from `from` to `to`, quoting `quote_len` bytes of it.
fn icmp_error(
    template: &Datagram,
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: (u8, u8, [u8; 4]),
    quoted: &Datagram,
    quote_len: usize,
) -> Datagram {
    let bytes = quoted.ip_bytes();
    let body = bytes[..quote_len.min(bytes.len())].to_vec();
    Datagram { src: from, dst: to, l4: L4::Icmp { kind: kind.0, code: kind.1, rest: kind.2, body }, ..template.clone() }
}

fn random_error_kind(rng: &mut SmallRng) -> (u8, u8, [u8; 4]) {
    match rng.random_range(0..4) {
        // Port unreachable, from the backend.
        0 => (3, 3, [0; 4]),
        // Fragmentation needed, with the next hop's MTU.
        1 => (3, 4, [0, 0, 0x05, 0x78]),
        // Time exceeded in transit.
        2 => (11, 0, [0; 4]),
        // Parameter problem, pointing at a byte.
        _ => (12, 0, [20, 0, 0, 0]),
    }
}

/// How much of a packet an ICMP error quotes: the minimum (header + 8 bytes), the whole TCP header, or as
/// much as fits (Linux quotes up to 576 bytes of error).
fn quote_len(rng: &mut SmallRng, quoted: &Datagram) -> usize {
    let ihl = 20 + quoted.options.len();
    match rng.random_range(0..3) {
        0 => ihl + 8,
        1 => ihl + 20,
        _ => 548,
    }
}

fn error_template(rng: &mut SmallRng) -> Datagram {
    let mut t = datagram(rng, ROUTER, ROUTER, L4::Raw { proto: 0, bytes: Vec::new() });
    t.dont_fragment = false;
    if rng.random_bool(0.8) {
        t.options.clear();
    }
    t
}

impl Fuzzer {
    /// Runs `input` through `prog` and requires verdict `verdict` and exactly `want`; `want_snat_mark`,
    /// if given, whether the SNAT bit of `skb->mark` must be set afterwards.
    fn expect(&mut self, probe: Probe<'_>, verdict: u32, want: &[u8], want_snat_mark: Option<bool>) {
        let Some(got) = self.run(probe.prog, probe.mark, probe.input) else { return };
        let mark_ok = probe.prog.is_xdp() || want_snat_mark.is_none_or(|snat| (got.mark & mark::SNAT != 0) == snat);
        let ok = got.verdict == verdict && same_packet(&got.packet, want) && mark_ok;
        self.check(&probe, &got, ok, || {
            format!("verdict {verdict}, SNAT mark {want_snat_mark:?}, packet:\n{}", wire::hex(want))
        });
    }

    /// Datagram `input` through `prog` (no mark) must pass as exactly datagram `want`.
    fn expect_datagram(&mut self, class: &'static str, prog: Prog, input: &Datagram, want: &Datagram) {
        let input = ipv4_frame(&input.ip_bytes());
        self.expect(Probe::new(class, prog, 0, &input), prog.pass(), &ipv4_frame(&want.ip_bytes()), None);
    }

    fn expect_unchanged(&mut self, class: &'static str, prog: Prog, mark_in: u32, input: &[u8]) {
        self.expect(Probe::new(class, prog, mark_in, input), prog.pass(), input, Some(mark_in & mark::SNAT != 0));
    }

    /// A drop, counted under exactly one named reason.
    fn expect_dropped(&mut self, class: &'static str, prog: Prog, mark_in: u32, input: &[u8]) {
        let before = self.drops_counted();
        let Some(got) = self.run(prog, mark_in, input) else { return };
        let ok = got.verdict == prog.drop() && self.drops_counted() == before + 1;
        self.check(&Probe::new(class, prog, mark_in, input), &got, ok, || {
            format!("verdict {} (dropped), one drop counted in DROPS", prog.drop())
        });
    }

    /// The first packet of a flow to `f`: DNAT to one of its backends, which is returned.
    fn expect_dnat(
        &mut self,
        class: &'static str,
        prog: Prog,
        dg: &Datagram,
        f: &Frontend,
        snat: impl Fn(&BackendDef) -> bool,
    ) -> Option<BackendDef> {
        let input = ipv4_frame(&dg.ip_bytes());
        let got = self.run(prog, 0, &input)?;
        let l4 = l4_off(&input);
        let chosen = f.backends.iter().find(|b| {
            addr_of(&got.packet, wire::ETH_HLEN + 16) == Some(b.addr) && port_of(&got.packet, l4 + 2) == Some(b.port)
        });
        let want = chosen.map(|b| ipv4_frame(&with(dg, None, Some((b.addr, b.port))).ip_bytes()));
        let ok = match (chosen, &want) {
            (Some(b), Some(want)) => {
                got.verdict == prog.pass()
                    && same_packet(&got.packet, want)
                    && (prog.is_xdp() || (got.mark & mark::SNAT != 0) == snat(b))
            }
            _ => false,
        };
        self.check(&Probe::new(class, prog, 0, &input), &got, ok, || {
            format!("verdict {}, DNAT to one of {:?}, SNAT mark as kube-proxy masquerades", prog.pass(), f.backends)
        });
        chosen.copied().filter(|_| ok)
    }

    /// A packet marked for SNAT at egress: the node's address and a port from the range, returned.
    fn expect_snat(&mut self, class: &'static str, prog: Prog, dg: &Datagram, known_port: Option<u16>) -> Option<u16> {
        let input = ipv4_frame(&dg.ip_bytes());
        let got = self.run(prog, mark::SNAT, &input)?;
        let port = port_of(&got.packet, l4_off(&input)).unwrap_or(0);
        let (_, dport) = dg.l4.ports().unwrap_or((0, 0));
        let want = ipv4_frame(&with(dg, Some((NODE, port)), Some((dg.dst, dport))).ip_bytes());
        let in_range = (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port) && known_port.is_none_or(|k| k == port);
        let ok = got.verdict == TC_ACT_OK && in_range && same_packet(&got.packet, &want);
        self.check(&Probe::new(class, prog, mark::SNAT, &input), &got, ok, || {
            format!("source {NODE} and a port in {SNAT_PORTS:?} (the flow's own: {known_port:?})")
        });
        ok.then_some(port)
    }
}

/// One scenario, picked at random.
pub fn one(f: &mut Fuzzer) {
    match f.rng.random_range(0..100) {
        0..=9 => garbage(f),
        10..=24 => not_a_service(f),
        25..=54 => pod_to_cluster_ip(f),
        55..=84 => external_to_frontend(f),
        85..=89 => rejected(f),
        _ => truncated(f),
    }
}

/// Random bytes, or a valid frame with random bytes after its Ethernet header: nothing to translate.
fn garbage(f: &mut Fuzzer) {
    let len = f.rng.random_range(0..=120);
    let mut bytes = vec![0u8; len];
    f.rng.fill(&mut bytes[..]);
    if len >= 14 && f.rng.random_bool(0.5) {
        bytes[12..14].copy_from_slice(&[0x08, 0x00]);
        if len > 14 {
            bytes[14] = 0x40 | (bytes[14] & 0x0f);
        }
    }
    let prog = Prog::ALL[f.rng.random_range(0..Prog::ALL.len())];
    f.expect_unchanged("garbage", prog, 0, &bytes);
}

/// Valid packets that are not a Service's: between other addresses (any protocol, options, fragments,
/// ICMP errors about them), and frames that are not IPv4 (IPv6, ARP, VLAN-tagged, even around a Service
/// packet): passed untouched by every program.
fn not_a_service(f: &mut Fuzzer) {
    let rng = &mut f.rng;
    let src = Ipv4Addr::new(172, 16, rng.random(), rng.random());
    let dst = Ipv4Addr::new(172, 17, rng.random(), rng.random());
    let proto_number = [proto::TCP, proto::UDP, proto::SCTP][rng.random_range(0..3)];
    let inner = {
        let (sport, dport) = (rng.random(), rng.random());
        let l = l4(rng, proto_number, sport, dport, TCP_SYN, 300);
        datagram(rng, src, dst, l)
    };
    let frames: Vec<(&'static str, Vec<u8>)> = match rng.random_range(0..8) {
        0 => vec![("other flow", ipv4_frame(&inner.ip_bytes()))],
        1 => inner
            .fragments(8 * rng.random_range(1..=20))
            .into_iter()
            .map(|p| ("other flow fragment", ipv4_frame(&p)))
            .collect(),
        2 => {
            let t = error_template(rng);
            let len = quote_len(rng, &inner);
            let e = icmp_error(&t, ROUTER, src, random_error_kind(rng), &inner, len);
            vec![("ICMP error about another flow", ipv4_frame(&e.ip_bytes()))]
        }
        3 => {
            let echo = L4::Icmp { kind: 8, code: 0, rest: [0, 1, 0, 1], body: payload(rng, 64) };
            let svc = Ipv4Addr::new(10, 32, 0, 10);
            vec![("ICMP echo to a Service address", ipv4_frame(&datagram(rng, src, svc, echo).ip_bytes()))]
        }
        4 => {
            let gre = L4::Raw { proto: 47, bytes: payload(rng, 64) };
            vec![(
                "other IP protocol to a Service address",
                ipv4_frame(&datagram(rng, src, Ipv4Addr::new(10, 32, 0, 10), gre).ip_bytes()),
            )]
        }
        5 => {
            let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
            v6.extend(payload(rng, 80));
            vec![("IPv6", wire::frame(wire::NODE_MAC, wire::CLIENT_MAC, 0x86dd, &v6))]
        }
        6 => {
            let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
            arp.extend(payload(rng, 20));
            vec![("ARP", wire::frame(wire::NODE_MAC, wire::CLIENT_MAC, 0x0806, &arp))]
        }
        _ => {
            // A VLAN tag around a packet to a ClusterIP: the programs sit where frames arrive untagged.
            let (c, cp) = pod_client(rng);
            let svc = {
                let l = l4(rng, proto::TCP, cp, 80, TCP_SYN, 40);
                datagram(rng, c, Ipv4Addr::new(10, 32, 0, 10), l)
            };
            let mut tagged = vec![0, 100, 0x08, 0x00];
            tagged.extend(svc.ip_bytes());
            vec![("VLAN-tagged", wire::frame(wire::NODE_MAC, wire::CLIENT_MAC, 0x8100, &tagged))]
        }
    };
    for (class, frame) in frames {
        for prog in Prog::ALL {
            f.expect_unchanged(class, prog, 0, &frame);
        }
    }
}

/// A pod of this node to a ClusterIP, the whole flow: DNAT, replies, hairpin SNAT, ICMP errors both ways,
/// fragments in order and out of order, the end.
fn pod_to_cluster_ip(f: &mut Fuzzer) {
    let clusters: Vec<Frontend> =
        f.frontends.iter().filter(|x| x.kind == Kind::ClusterIp && !x.backends.is_empty()).cloned().collect();
    let fe = clusters[f.rng.random_range(0..clusters.len())].clone();
    let (mut client, mut cport) = f.fresh_client(pod_client);
    // Sometimes the client is one of the Service's own local backends: hairpin, masqueraded.
    if f.rng.random_bool(0.15)
        && let Some(local) = fe.backends.iter().find(|b| b.local)
    {
        client = local.addr;
        cport = f.fresh_client(|rng| (local.addr, rng.random_range(1024..=65_535))).1;
    }
    let first = {
        let rng = &mut f.rng;
        let l = l4(rng, fe.proto, cport, fe.port, TCP_SYN, 200);
        datagram(rng, client, fe.addr, l)
    };
    let fragmented = fe.proto == proto::UDP && f.rng.random_bool(0.3);
    let Some(b) = (if fragmented {
        fragmented_to_frontend(f, Prog::PodIngress, &first, &fe, |b| b.addr == client)
    } else {
        f.expect_dnat("pod to ClusterIP", Prog::PodIngress, &first, &fe, |b| b.addr == client)
    }) else {
        return;
    };
    let forward = with(&first, None, Some((b.addr, b.port)));
    let hairpin = b.addr == client;
    let mut reply_to = (client, cport);
    if hairpin {
        let Some(port) = f.expect_snat("hairpin SNAT", Prog::PodEgress, &forward, None) else { return };
        // The backend (the client itself) answers the node's address; un-SNAT at the pod's ingress.
        let rng = &mut f.rng;
        let reply = {
            let l = l4(rng, fe.proto, b.port, port, TCP_SYN | TCP_ACK, 200);
            datagram(rng, b.addr, NODE, l)
        };
        let want = with(&reply, None, Some((client, cport)));
        f.expect_datagram("hairpin reply un-SNAT", Prog::PodIngress, &reply, &want);
        reply_to = (client, cport);
    }
    // The reply, on its way to the client.
    let reply = {
        let rng = &mut f.rng;
        let l = l4(rng, fe.proto, b.port, reply_to.1, TCP_SYN | TCP_ACK, 200);
        datagram(rng, b.addr, reply_to.0, l)
    };
    let want = with(&reply, Some((fe.addr, fe.port)), None);
    if fe.proto == proto::UDP && f.rng.random_bool(0.3) {
        let chunk = 8 * f.rng.random_range(1..=30);
        let (got, wanted) = (reply.fragments(chunk), want.fragments(chunk));
        for (p, w) in got.iter().zip(&wanted) {
            f.expect(
                Probe::new("reply fragment to pod", Prog::PodEgress, 0, &ipv4_frame(p)),
                TC_ACT_OK,
                &ipv4_frame(w),
                None,
            );
        }
    } else {
        f.expect_datagram("reply to pod", Prog::PodEgress, &reply, &want);
    }
    if hairpin {
        return;
    }
    // An error about the client → backend leg, on its way to the client: from the backend or a router.
    let t = error_template(&mut f.rng);
    let from = if f.rng.random_bool(0.5) { b.addr } else { ROUTER };
    let kind = random_error_kind(&mut f.rng);
    let len = quote_len(&mut f.rng, &forward);
    let err = icmp_error(&t, from, client, kind, &forward, len);
    let want = icmp_error(&t, fe.addr, client, kind, &first, len);
    f.expect_datagram("ICMP error to pod about its request", Prog::PodEgress, &err, &want);
    // An error from the client about a reply it got (which showed the ClusterIP), on its way to the backend.
    let translated_reply = with(&reply, Some((fe.addr, fe.port)), None);
    let len = quote_len(&mut f.rng, &translated_reply);
    let err = icmp_error(&t, client, fe.addr, kind, &translated_reply, len);
    let want = icmp_error(&t, client, b.addr, kind, &reply, len);
    f.expect_datagram("ICMP error from pod about a reply", Prog::PodIngress, &err, &want);
    // The end of a TCP flow: translated like the rest.
    if fe.proto == proto::TCP {
        let rng = &mut f.rng;
        let rst = {
            let l = l4(rng, fe.proto, cport, fe.port, TCP_RST | TCP_ACK, 0);
            datagram(rng, client, fe.addr, l)
        };
        let want = with(&rst, None, Some((b.addr, b.port)));
        f.expect(
            Probe::new("pod's RST", Prog::PodIngress, 0, &ipv4_frame(&rst.ip_bytes())),
            TC_ACT_OK,
            &ipv4_frame(&want.ip_bytes()),
            Some(false),
        );
    }
}

/// A fragmented datagram to a frontend: the later fragments (some sent before the first: those pass
/// untouched, no record of their datagram yet) take the first fragment's backend; returns it.
fn fragmented_to_frontend(
    f: &mut Fuzzer,
    prog: Prog,
    dg: &Datagram,
    fe: &Frontend,
    snat: impl Fn(&BackendDef) -> bool,
) -> Option<BackendDef> {
    let mut dg = dg.clone();
    if let L4::Udp { payload, .. } = &mut dg.l4 {
        payload.resize(f.rng.random_range(600..=3000), 0x5a);
    }
    let chunk = 8 * f.rng.random_range(8..=180);
    let parts = dg.fragments(chunk);
    let early = if parts.len() > 1 && f.rng.random_bool(0.2) { f.rng.random_range(1..parts.len()) } else { 0 };
    if early > 0 {
        // Without its first fragment there are no ports to translate it by: one to a Service address is
        // dropped (it must not leave untranslated), one to the node's own (a NodePort) passes untouched.
        let input = ipv4_frame(&parts[early]);
        if fe.kind == Kind::NodePort {
            f.expect_unchanged("later fragment before its first, to the node", prog, 0, &input);
        } else {
            f.expect_dropped("later fragment before its first", prog, 0, &input);
        }
    }
    // The first fragment carries the ports: read the backend from it.
    let got = f.run(prog, 0, &ipv4_frame(&parts[0]))?;
    let l4 = l4_off(&ipv4_frame(&parts[0]));
    let chosen = fe.backends.iter().copied().find(|b| {
        addr_of(&got.packet, wire::ETH_HLEN + 16) == Some(b.addr) && port_of(&got.packet, l4 + 2) == Some(b.port)
    });
    let wanted = chosen.map(|b| with(&dg, None, Some((b.addr, b.port))).fragments(chunk));
    let ok = match (&chosen, &wanted) {
        (Some(b), Some(w)) => {
            got.verdict == prog.pass()
                && same_packet(&got.packet, &ipv4_frame(&w[0]))
                && (prog.is_xdp() || (got.mark & mark::SNAT != 0) == snat(b))
        }
        _ => false,
    };
    let input = ipv4_frame(&parts[0]);
    f.check(&Probe::new("first fragment to a frontend", prog, 0, &input), &got, ok, || {
        format!("DNAT to one of {:?}", fe.backends)
    });
    let (b, wanted) = (chosen?, wanted?);
    for (i, (p, w)) in parts.iter().zip(&wanted).enumerate().skip(1) {
        if i == early {
            continue;
        }
        f.expect(
            Probe::new("later fragment to a frontend", prog, 0, &ipv4_frame(p)),
            prog.pass(),
            &ipv4_frame(w),
            Some(snat(&b)),
        );
    }
    // The flow's next datagram (a new IP id): its later fragment, sent before its first, must not be
    // taken for one of the first datagram's (the record is keyed by IP id, not only by the flow).
    let mut next = dg.clone();
    next.id = next_ip_id();
    let next_parts = next.fragments(chunk);
    if next_parts.len() > 1 {
        let input = ipv4_frame(&next_parts[1]);
        if fe.kind == Kind::NodePort {
            f.expect_unchanged("the next datagram's later fragment first, to the node", prog, 0, &input);
        } else {
            f.expect_dropped("the next datagram's later fragment first", prog, 0, &input);
        }
    }
    Some(b)
}

/// A client outside the cluster to a NodePort, a load-balancer IP or a ClusterIP: XDP first where the node
/// has it, then TC; SNAT and its reversal; replies; ICMP errors about each leg.
#[expect(clippy::too_many_lines, reason = "one flow's walk reads best in one piece")]
fn external_to_frontend(f: &mut Fuzzer) {
    let candidates: Vec<Frontend> = f.frontends.iter().filter(|x| !x.backends.is_empty()).cloned().collect();
    let fe = candidates[f.rng.random_range(0..candidates.len())].clone();
    let in_ranges = !fe.source_ranges.is_empty() && f.rng.random_bool(0.7);
    let sctp = fe.proto == proto::SCTP;
    let (client, cport) = f.fresh_client(|rng| {
        let (client, port) = external_client(rng, in_ranges);
        // SCTP: below the SNAT range, so SNAT always changes the port (a SNAT port equal to the client's
        // would need no change, and the flow would rightly go through).
        (client, if sctp { rng.random_range(1024..SNAT_PORTS.0) } else { port })
    });
    // Now and then a packet too big for the route to a remote backend (see `big_or_small`).
    let size = big_or_small(&mut f.rng);
    let mut first = {
        let rng = &mut f.rng;
        let l = l4(rng, fe.proto, cport, fe.port, TCP_SYN, size);
        datagram(rng, client, fe.addr, l)
    };
    let snat_for = |b: &BackendDef| fe.masquerade_external || !b.local;
    let frame = ipv4_frame(&first.ip_bytes());
    if !fe.source_ranges.is_empty() && !in_ranges {
        f.expect_dropped("outside loadBalancerSourceRanges", Prog::HostIngress, 0, &frame);
        f.expect_dropped("outside loadBalancerSourceRanges", Prog::Xdp, 0, &frame);
        return;
    }
    // XDP first, as on a node: a TTL about to expire is left to the stack; flows that keep their source are
    // DNATed here; SNATed flows to a remote backend are sent back out from here.
    let mut xdp_forwarded = None;
    if f.rng.random_bool(0.5) {
        if f.rng.random_bool(0.1) {
            first.ttl = 1;
            let frame = ipv4_frame(&first.ip_bytes());
            f.expect_unchanged("TTL 1 at XDP", Prog::Xdp, 0, &frame);
        } else if fe.backends.iter().all(|b| !snat_for(b)) {
            f.expect_dnat("external to frontend at XDP", Prog::Xdp, &first, &fe, |_| false);
            return;
        } else if fe.proto == proto::SCTP {
            // SNAT would change SCTP's port (see below): XDP drops it as TC does.
            f.expect_dropped("SCTP that would need SNAT, at XDP", Prog::Xdp, 0, &frame);
            return;
        } else {
            xdp_forwarded = xdp_first_packet(f, &first, &fe);
        }
    }
    let fragmented = fe.proto == proto::UDP && first.ttl > 1 && xdp_forwarded.is_none() && f.rng.random_bool(0.3);
    let known_port = xdp_forwarded.map(|(_, port)| port);
    let Some(b) = (if let Some((b, _)) = xdp_forwarded {
        Some(b)
    } else if fragmented {
        fragmented_to_frontend(f, Prog::HostIngress, &first, &fe, snat_for)
    } else {
        f.expect_dnat("external to frontend", Prog::HostIngress, &first, &fe, snat_for)
    }) else {
        return;
    };
    let forward = with(&first, None, Some((b.addr, b.port)));
    let egress_to_backend = if b.local { Prog::PodEgress } else { Prog::HostEgress };
    let ingress_from_backend = if b.local { Prog::PodIngress } else { Prog::HostIngress };
    let t = error_template(&mut f.rng);
    let kind = random_error_kind(&mut f.rng);
    let size = big_or_small(&mut f.rng);
    let reply = {
        let rng = &mut f.rng;
        let l = l4(rng, fe.proto, b.port, cport, TCP_SYN | TCP_ACK, size);
        datagram(rng, b.addr, client, l)
    };
    if snat_for(&b) && fe.proto == proto::SCTP {
        // SNAT changes the source port, which SCTP's CRC32c (over the whole packet) cannot follow
        // incrementally: the data path drops the flow (counted as sctp_port_change) rather than send it
        // on with a checksum the backend would refuse.
        let input = ipv4_frame(&forward.ip_bytes());
        f.expect_dropped("SCTP that would need SNAT", egress_to_backend, mark::SNAT, &input);
        return;
    }
    let mut snat_port = None;
    if snat_for(&b) {
        let Some(port) = f.expect_snat("SNAT to backend", egress_to_backend, &forward, known_port) else { return };
        snat_port = Some(port);
        let on_wire = with(&forward, Some((NODE, port)), None);
        // The reply to the node's address, un-SNATed at ingress.
        let to_node = with(&reply, None, Some((NODE, port)));
        f.expect_datagram("reply un-SNAT", ingress_from_backend, &to_node, &reply);
        if !b.local && f.rng.random_bool(0.5) {
            // XDP meets such a reply first, and sends it straight back out to the client from the frontend;
            // one too big for the route goes to the stack untouched.
            let input = ipv4_frame(&to_node.ip_bytes());
            if too_big(&to_node) {
                f.expect_unchanged("SNATed reply too big for the route, at XDP", Prog::Xdp, 0, &input);
            } else {
                let want = forwarded_frame(&with(&reply, Some((fe.addr, fe.port)), None));
                f.expect(Probe::new("SNATed reply at XDP", Prog::Xdp, 0, &input), XDP_TX, &want, None);
            }
        }
        // The SNATed leg in fragments: the first fragment gets the port, the later ones the address.
        if fe.proto == proto::UDP && f.rng.random_bool(0.3) {
            let mut big = forward.clone();
            if let L4::Udp { payload, .. } = &mut big.l4 {
                payload.resize(f.rng.random_range(600..=3000), 0xa5);
            }
            big.id = next_ip_id();
            let chunk = 8 * f.rng.random_range(8..=180);
            let wanted = with(&big, Some((NODE, port)), None).fragments(chunk);
            for (p, w) in big.fragments(chunk).iter().zip(&wanted) {
                let input = ipv4_frame(p);
                let probe = Probe::new("SNATed fragment to backend", egress_to_backend, mark::SNAT, &input);
                f.expect(probe, TC_ACT_OK, &ipv4_frame(w), None);
            }
            let mut big_reply = with(&reply, None, Some((NODE, port)));
            if let L4::Udp { payload, .. } = &mut big_reply.l4 {
                payload.resize(f.rng.random_range(600..=3000), 0x3c);
            }
            big_reply.id = next_ip_id();
            let wanted = with(&big_reply, None, Some((client, cport))).fragments(chunk);
            for (p, w) in big_reply.fragments(chunk).iter().zip(&wanted) {
                let input = ipv4_frame(p);
                let probe = Probe::new("SNATed reply fragment un-SNAT", ingress_from_backend, 0, &input);
                f.expect(probe, TC_ACT_OK, &ipv4_frame(w), None);
            }
        }
        // An error from the client about a reply (which showed the frontend): at ingress the quote becomes
        // the backend's reply again, and at egress it shows the node's address and port it went to.
        let shown = with(&reply, Some((fe.addr, fe.port)), None);
        let len = quote_len(&mut f.rng, &shown);
        let err = icmp_error(&t, client, fe.addr, kind, &shown, len);
        let half = icmp_error(&t, client, b.addr, kind, &reply, len);
        f.expect_datagram("ICMP error from client about a SNATed reply", Prog::HostIngress, &err, &half);
        let want = icmp_error(&t, NODE, b.addr, kind, &with(&reply, None, Some((NODE, port))), len);
        f.expect_datagram("ICMP error from client about a SNATed reply, to backend", egress_to_backend, &half, &want);
        // An error about the SNATed leg, to the node: the quote becomes the client's again...
        let from = if f.rng.random_bool(0.5) { b.addr } else { ROUTER };
        let len = quote_len(&mut f.rng, &on_wire);
        let err = icmp_error(&t, from, NODE, kind, &on_wire, len);
        let half = icmp_error(&t, from, client, kind, &forward, len);
        f.expect_datagram("ICMP error about the SNATed leg", ingress_from_backend, &err, &half);
        // ...and on its way out to the client, it shows the frontend.
        let want = icmp_error(&t, fe.addr, client, kind, &first, len);
        f.expect_datagram("ICMP error about the SNATed leg, to client", Prog::HostEgress, &half, &want);
        // An error the node raises about the reply after un-SNAT (e.g. the client's path has a smaller
        // MTU), on its way to the backend: the quote shows the node's address and port again.
        let len = quote_len(&mut f.rng, &reply);
        let err = icmp_error(&t, NODE, b.addr, kind, &reply, len);
        let want = icmp_error(&t, NODE, b.addr, kind, &with(&reply, None, Some((NODE, port))), len);
        f.expect_datagram("ICMP error about the un-SNATed reply", egress_to_backend, &err, &want);
    } else {
        // No SNAT: errors about the forward leg go straight to the client...
        let len = quote_len(&mut f.rng, &forward);
        let err = icmp_error(&t, b.addr, client, kind, &forward, len);
        let want = icmp_error(&t, fe.addr, client, kind, &first, len);
        f.expect_datagram("ICMP error to external client", Prog::HostEgress, &err, &want);
        // ...and an error about a reply (which showed the frontend) from a router, goes to the backend.
        let shown = with(&reply, Some((fe.addr, fe.port)), None);
        let len = quote_len(&mut f.rng, &shown);
        let err = icmp_error(&t, ROUTER, fe.addr, kind, &shown, len);
        let want = icmp_error(&t, ROUTER, b.addr, kind, &reply, len);
        f.expect_datagram("ICMP error about a reply, to backend", Prog::HostIngress, &err, &want);
    }
    // The reply on its way out to the client shows the frontend.
    let want = with(&reply, Some((fe.addr, fe.port)), None);
    f.expect_datagram("reply to external client", Prog::HostEgress, &reply, &want);
    // The end of a TCP flow frees its SNAT port.
    if fe.proto == proto::TCP && snat_for(&b) {
        let rng = &mut f.rng;
        let rst = {
            let l = l4(rng, fe.proto, cport, b.port, TCP_RST | TCP_ACK, 0);
            datagram(rng, client, b.addr, l)
        };
        let _ = f.expect_snat("RST to backend", egress_to_backend, &rst, snat_port);
    }
}

/// A frame as XDP sends it back out towards `ROUTER`: the next hop's MACs, the TTL one lower.
fn forwarded_frame(dg: &Datagram) -> Vec<u8> {
    let mut hop = dg.clone();
    hop.ttl -= 1;
    wire::frame(super::NEXT_HOP_MAC, super::UPLINK_MAC, 0x0800, &hop.ip_bytes())
}

/// Whether a packet is bigger than the MTU of the fuzzer namespace's routes.
fn too_big(dg: &Datagram) -> bool {
    dg.ip_bytes().len() > super::ROUTE_MTU
}

/// The payload size limit of a packet: usually small, one in ten up to a full 1500-byte frame, bigger
/// than the routes' MTU.
fn big_or_small(rng: &mut SmallRng) -> usize {
    if rng.random_bool(0.1) { 1440 } else { 200 }
}

/// XDP on a flow that must be SNATed: to a remote backend it sends the packet straight back out, DNATed
/// and SNATed, its TTL decremented (returns the backend and the SNAT port); to a local one it records the
/// flow and leaves the packet to TC, untouched.
fn xdp_first_packet(f: &mut Fuzzer, first: &Datagram, fe: &Frontend) -> Option<(BackendDef, u16)> {
    let input = ipv4_frame(&first.ip_bytes());
    let got = f.run(Prog::Xdp, 0, &input)?;
    let l4 = l4_off(&input);
    let dst = addr_of(&got.packet, wire::ETH_HLEN + 16);
    let chosen =
        fe.backends.iter().copied().find(|b| dst == Some(b.addr) && port_of(&got.packet, l4 + 2) == Some(b.port));
    let port = port_of(&got.packet, l4).unwrap_or(0);
    let forwarded = match chosen {
        Some(b) if !b.local && got.verdict == XDP_TX && !too_big(first) => {
            let want = forwarded_frame(&with(first, Some((NODE, port)), Some((b.addr, b.port))));
            let ok = (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port) && same_packet(&got.packet, &want);
            ok.then_some((b, port))
        }
        _ => None,
    };
    // Untouched is right only if XDP could have chosen a local backend, or the packet is too big for the
    // route to a remote one.
    let passed =
        got.verdict == XDP_PASS && got.packet == input && (fe.backends.iter().any(|b| b.local) || too_big(first));
    let ok = forwarded.is_some() || passed;
    f.check(&Probe::new("external to SNATed frontend at XDP", Prog::Xdp, 0, &input), &got, ok, || {
        format!("XDP_TX ({XDP_TX}) DNATed to a remote backend of {:?} and SNATed, TTL - 1; or XDP_PASS untouched for a local one", fe.backends)
    });
    forwarded
}

/// A frontend without endpoints that rejects: an ICMP port unreachable from the frontend back to the
/// client, quoting its packet (XDP leaves that to TC). With IP options the reply is not built: dropped.
fn rejected(f: &mut Fuzzer) {
    let fe = f.frontends.iter().find(|x| x.backends.is_empty()).expect("a frontend without endpoints").clone();
    let (prog, (client, cport)) = if f.rng.random_bool(0.5) {
        (Prog::PodIngress, f.fresh_client(pod_client))
    } else {
        (Prog::HostIngress, f.fresh_client(|rng| external_client(rng, false)))
    };
    let dg = {
        let rng = &mut f.rng;
        let l = l4(rng, fe.proto, cport, fe.port, TCP_SYN, 100);
        datagram(rng, client, fe.addr, l)
    };
    let input = ipv4_frame(&dg.ip_bytes());
    f.expect_unchanged("to a frontend without endpoints, at XDP", Prog::Xdp, 0, &input);
    if !dg.options.is_empty() {
        f.expect_dropped("rejected with IP options", prog, 0, &input);
        return;
    }
    let quote = dg.ip_bytes()[..28].to_vec();
    let icmp = Datagram {
        src: fe.addr,
        dst: client,
        ttl: 64,
        id: 0,
        tos: 0,
        dont_fragment: true,
        options: Vec::new(),
        l4: L4::Icmp { kind: 3, code: 3, rest: [0; 4], body: quote },
    };
    let want = wire::frame(wire::CLIENT_MAC, wire::NODE_MAC, 0x0800, &icmp.ip_bytes());
    f.expect(Probe::new("rejected", prog, 0, &input), TC_ACT_REDIRECT, &want, None);
}

/// A packet of a Service flow cut short: passed untouched when too short to be read as a flow, dropped
/// when too short for its checksum to be rewritten, and rewritten as far as it goes otherwise.
fn truncated(f: &mut Fuzzer) {
    let fe = f.frontends.iter().find(|x| x.name == "dns" || x.name == "web").cloned();
    let fe = if f.rng.random_bool(0.5) { fe } else { f.frontends.iter().find(|x| x.name == "dns").cloned() };
    let Some(fe) = fe else { return };
    let (client, cport) = f.fresh_client(pod_client);
    // The reply direction: a single candidate (the reply entry), so the expected packet is known.
    let dg = {
        let rng = &mut f.rng;
        let l = l4(rng, fe.proto, cport, fe.port, TCP_SYN, 100);
        datagram(rng, client, fe.addr, l)
    };
    let Some(b2) = f.expect_dnat("pod to ClusterIP (before truncation)", Prog::PodIngress, &dg, &fe, |_| false) else {
        return;
    };
    let reply = {
        let rng = &mut f.rng;
        let l = l4(rng, fe.proto, b2.port, cport, TCP_ACK, 100);
        datagram(rng, b2.addr, client, l)
    };
    let full = ipv4_frame(&reply.ip_bytes());
    let want_full = ipv4_frame(&with(&reply, Some((fe.addr, fe.port)), None).ip_bytes());
    let len = f.rng.random_range(wire::ETH_HLEN..full.len());
    let cut = &full[..len];
    let l4 = l4_off(&full);
    let csum_end = l4 + if fe.proto == proto::TCP { 18 } else { 8 };
    if len < l4 + 4 {
        f.expect_unchanged("truncated before the ports", Prog::PodEgress, 0, cut);
    } else if len < csum_end {
        f.expect_dropped("truncated before the L4 checksum", Prog::PodEgress, 0, cut);
    } else {
        f.expect(
            Probe::new("truncated after the L4 checksum", Prog::PodEgress, 0, cut),
            TC_ACT_OK,
            &want_full[..len],
            None,
        );
    }
}
