//! The IPv6 half of the lab's echo, for the dual-stack tests: a server on `[::]:PORT` (IPv6 only, beside
//! the IPv4 [`crate::echo::EchoServer`] on the same port) answering every TCP line and UDP datagram with
//! `NAME [PEER]:PORT`, and one-shot clients that return who answered and the source it saw.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::in_netns;

/// How often a server thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What one request got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply6 {
    /// The name of the backend that answered.
    pub backend: String,
    /// The client address the backend saw.
    pub seen_source: SocketAddrV6,
    /// UDP: how many bytes the backend received (the datagram whole, however it was fragmented).
    pub len: Option<usize>,
    /// UDP: the hop limit the datagram arrived with.
    pub hop_limit: Option<u8>,
}

impl crate::echo::Answer for Reply6 {
    fn parse_answer(text: &str) -> anyhow::Result<Self> {
        Self::parse(text)
    }
}

impl Reply6 {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let line = text.lines().next().unwrap_or_default().trim();
        let mut words = line.split_whitespace();
        let (Some(name), Some(peer)) = (words.next(), words.next()) else { bail!("malformed reply {line:?}") };
        // An IPv4 echo's peer (an IPv6 socket's request to an IPv4-mapped address reaches one) reads as
        // the IPv4-mapped address, as the client's own socket would name it.
        let seen_source = match peer.parse::<SocketAddr>() {
            Ok(SocketAddr::V6(v6)) => v6,
            Ok(SocketAddr::V4(v4)) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
            Err(e) => return Err(e).with_context(|| format!("malformed peer in {line:?}")),
        };
        let (mut len, mut hop_limit) = (None, None);
        for (key, value) in words.filter_map(|w| w.split_once('=')) {
            match key {
                "len" => len = value.parse().ok(),
                "hops" => hop_limit = value.parse().ok(),
                _ => {}
            }
        }
        Ok(Self { backend: name.to_owned(), seen_source, len, hop_limit })
    }
}

/// TCP and UDP echo on `[::]:port` in a namespace; stops when dropped.
pub struct Echo6 {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// An IPv6-only socket bound to `[::]:port`, so the IPv4 echo can hold the same port.
fn bound(kind: Type, protocol: Protocol, port: u16) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, kind, Some(protocol))?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(socket)
}

impl Echo6 {
    /// Serves `name` on TCP and UDP `port` inside namespace `ns`.
    pub fn start(ns: &str, name: &str, port: u16) -> anyhow::Result<Self> {
        let listener: TcpListener = in_netns(ns, move || {
            let socket = bound(Type::STREAM, Protocol::TCP, port)?;
            socket.listen(128)?;
            std::io::Result::Ok(socket.into())
        })?
        .with_context(|| format!("binding TCP [::]:{port} in {ns}"))?;
        let udp: UdpSocket = in_netns(ns, move || bound(Type::DGRAM, Protocol::UDP, port).map(Into::into))?
            .with_context(|| format!("binding UDP [::]:{port} in {ns}"))?;
        listener.set_nonblocking(true)?;
        udp.set_read_timeout(Some(POLL))?;
        nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::Ipv6RecvHopLimit, &true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp_stop, tcp_name) = (stop.clone(), name.to_owned());
        let (udp_stop, udp_name) = (stop.clone(), name.to_owned());
        let threads = vec![
            thread::spawn(move || serve_tcp(&listener, &tcp_name, &tcp_stop)),
            thread::spawn(move || serve_udp(&udp, &udp_name, &udp_stop)),
        ];
        Ok(Self { stop, threads })
    }
}

impl Drop for Echo6 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(listener: &TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_owned();
                thread::spawn(move || answer_tcp(&stream, &name, peer));
            }
            // As the IPv4 server: a sleep here would cap the accept rate, which the benchmark measures.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                crate::echo::wait_readable(listener, Duration::from_millis(20));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Answers every line until the client closes (or is idle for 10 s).
fn answer_tcp(stream: &TcpStream, name: &str, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        writer.write_all(format!("{name} {peer}\n").as_bytes())?;
    }
}

/// Answers each datagram with `NAME PEER len=BYTES hops=HOP_LIMIT` (the hop limit it arrived with),
/// padded to N bytes when its first line is `big N`, as the IPv4 echo does.
fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer, hops)) = recv_with_hop_limit(socket, &mut buf) {
            let hops = hops.map(|h| format!(" hops={h}")).unwrap_or_default();
            let _ = socket.send_to(&crate::echo::udp_answer(name, peer, &buf[..n], &hops), peer);
        }
    }
}

/// One datagram, its sender, and the hop limit it arrived with.
fn recv_with_hop_limit(socket: &UdpSocket, buf: &mut [u8]) -> nix::Result<(usize, SocketAddrV6, Option<u8>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg};
    use std::os::fd::AsRawFd as _;
    let mut control = nix::cmsg_space!(libc::c_int);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrIn6>(socket.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::empty())?;
    let hops = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv6HopLimit(h) => u8::try_from(h).ok(),
        _ => None,
    });
    let peer = msg.address.ok_or(nix::errno::Errno::EINVAL)?;
    Ok((msg.bytes, peer.into(), hops))
}

/// One TCP request to `target` from namespace `ns`.
///
/// # Errors
/// No connection, no answer within `timeout`, or an answer that does not parse.
pub fn tcp(ns: &str, target: SocketAddrV6, timeout: Duration) -> anyhow::Result<Reply6> {
    tcp_from(ns, None, target, timeout)
}

/// [`tcp`] from the address `source` of the namespace, or from the one the kernel picks.
///
/// # Errors
/// As [`tcp`]; [`refused`] and [`timed_out`] tell a refusal from silence.
pub fn tcp_from(ns: &str, source: Option<Ipv6Addr>, target: SocketAddrV6, timeout: Duration) -> anyhow::Result<Reply6> {
    in_netns(ns, move || tcp_here(source, target, timeout))?
}

/// [`tcp_from`] in the calling process's own namespace and cgroup (the `lab-client` binary on a node).
///
/// # Errors
/// As [`tcp`].
pub fn tcp_here(source: Option<Ipv6Addr>, target: SocketAddrV6, timeout: Duration) -> anyhow::Result<Reply6> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(source) = source {
        socket.bind(&SocketAddr::from((source, 0)).into())?;
    }
    socket
        .connect_timeout(&SocketAddr::V6(target).into(), timeout)
        .with_context(|| format!("TCP connect to {target}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    (&stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).with_context(|| format!("TCP answer from {target}"))?;
    Reply6::parse(&line)
}

/// A Hop-by-Hop or Destination Options header's content as a socket option gives it (the kernel fills in
/// the next-header byte): eight bytes, of which six are a `PadN` option.
const PADDED_OPTIONS: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];

/// Makes every packet `socket` sends carry a Hop-by-Hop Options and a Destination Options header (sticky
/// options, `IPV6_HOPOPTS` and `IPV6_DSTOPTS`; root only), so its transport header sits 16 bytes later
/// than in a plain packet.
fn add_extension_headers(socket: &impl std::os::fd::AsRawFd) -> anyhow::Result<()> {
    for (name, option) in [("IPV6_HOPOPTS", libc::IPV6_HOPOPTS), ("IPV6_DSTOPTS", libc::IPV6_DSTOPTS)] {
        // SAFETY: a valid socket and a buffer of the length given, which the kernel only reads.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                option,
                PADDED_OPTIONS.as_ptr().cast(),
                libc::socklen_t::try_from(PADDED_OPTIONS.len()).expect("8 bytes"),
            )
        };
        anyhow::ensure!(rc == 0, "setting {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One request over `proto` to `target` from namespace `ns` whose every packet carries a Hop-by-Hop and a
/// Destination Options header (see [`add_extension_headers`]); a UDP answer must come from `target`.
///
/// # Errors
/// As [`tcp`] and [`udp`], and the options refused.
pub fn request_with_extension_headers(
    ns: &str,
    proto: crate::echo::Proto,
    target: SocketAddrV6,
    timeout: Duration,
) -> anyhow::Result<Reply6> {
    in_netns(ns, move || -> anyhow::Result<Reply6> {
        match proto {
            crate::echo::Proto::Tcp => {
                let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
                add_extension_headers(&socket)?;
                socket
                    .connect_timeout(&SocketAddr::V6(target).into(), timeout)
                    .with_context(|| format!("TCP connect to {target}"))?;
                let stream: TcpStream = socket.into();
                stream.set_read_timeout(Some(timeout))?;
                (&stream).write_all(b"hello\n")?;
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).with_context(|| format!("TCP answer from {target}"))?;
                Reply6::parse(&line)
            }
            crate::echo::Proto::Udp => {
                let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
                add_extension_headers(&socket)?;
                socket.set_read_timeout(Some(timeout))?;
                udp_ask(&socket, target)
            }
        }
    })?
}

/// Whether a request's error is a refusal (an `ICMPv6` port unreachable, or a TCP reset), not silence.
#[must_use]
pub fn refused(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused))
}

/// Whether a request's error is silence: no answer within the timeout.
#[must_use]
pub fn timed_out(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    })
}

/// One UDP request to `target` from namespace `ns`.
///
/// # Errors
/// No answer within `timeout` (or an `ICMPv6` error), or an answer that does not parse.
pub fn udp(ns: &str, target: SocketAddrV6, timeout: Duration) -> anyhow::Result<Reply6> {
    udp_sized(ns, target, 6, timeout)
}

/// [`udp`] with a datagram of `size` bytes (at least 6): one bigger than the path MTU leaves the client
/// as IPv6 fragments.
///
/// # Errors
/// As [`udp`].
pub fn udp_sized(ns: &str, target: SocketAddrV6, size: usize, timeout: Duration) -> anyhow::Result<Reply6> {
    in_netns(ns, move || -> anyhow::Result<Reply6> {
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(target)?;
        let mut payload = b"hello\n".to_vec();
        payload.resize(size.max(payload.len()), b'.');
        socket.send(&payload).with_context(|| format!("UDP send to {target}"))?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf).with_context(|| format!("UDP answer from {target}"))?;
        Reply6::parse(&String::from_utf8_lossy(&buf[..n]))
    })?
}

/// One UDP request of any bytes (see [`crate::echo::udp_payload`]) from namespace `ns`, on an unconnected
/// socket: the answer, which must come from `target` itself, and its size.
///
/// # Errors
/// As [`udp`], and an answer from another address.
pub fn udp_exchange(
    ns: &str,
    target: SocketAddrV6,
    request: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<(Reply6, usize)> {
    in_netns(ns, move || -> anyhow::Result<(Reply6, usize)> {
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(&request, target).with_context(|| format!("UDP send to {target}"))?;
        let mut buf = vec![0u8; 65_536];
        let (n, from) =
            crate::echo::recv_from_retrying(&socket, &mut buf).with_context(|| format!("UDP answer from {target}"))?;
        anyhow::ensure!(from == SocketAddr::V6(target), "UDP answer from {from}, not {target}");
        Ok((Reply6::parse(&String::from_utf8_lossy(&buf[..n]))?, n))
    })?
}

/// `count` requests, one after another, over `proto` to `target` from namespace `ns` (TCP: a connection
/// each; UDP: a fresh unconnected socket each), as [`crate::echo::requests`] sends them over IPv4.
///
/// # Errors
/// The client thread could not enter `ns`; each request's own failure is in its entry.
pub fn requests(
    ns: &str,
    proto: crate::echo::Proto,
    target: SocketAddrV6,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<anyhow::Result<Reply6>>> {
    in_netns(ns, move || {
        (0..count)
            .map(|_| match proto {
                crate::echo::Proto::Tcp => tcp_here(None, target, timeout),
                crate::echo::Proto::Udp => udp_here(target, timeout),
            })
            .collect()
    })
}

/// One UDP request from the calling process's own namespace and cgroup (the `lab-client` binary on a
/// node), on an unconnected socket (`sendto`, `recvfrom`), as the IPv4 client does: the answer must come
/// from the address sent to.
///
/// # Errors
/// As [`udp`], and an answer from another address.
pub fn udp_here(target: SocketAddrV6, timeout: Duration) -> anyhow::Result<Reply6> {
    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    udp_ask(&socket, target)
}

/// One request on an unconnected socket (`sendto`, `recvfrom`): the answer must come from `target`.
///
/// # Errors
/// As [`udp_here`].
pub fn udp_ask(socket: &UdpSocket, target: SocketAddrV6) -> anyhow::Result<Reply6> {
    socket.send_to(b"hello\n", target).with_context(|| format!("UDP send to {target}"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).with_context(|| format!("UDP answer from {target}"))?;
    anyhow::ensure!(from == SocketAddr::V6(target), "UDP answer from {from}, not {target}");
    Reply6::parse(&String::from_utf8_lossy(&buf[..n]))
}

/// What one IPv6 attempt got, as [`crate::echo::Outcome`] says it for IPv4.
#[derive(Debug)]
pub enum Outcome6 {
    Answered(Reply6),
    /// ECONNREFUSED: a TCP reset, or an `ICMPv6` port unreachable.
    Refused,
    TimedOut,
    Failed(String),
}

impl Outcome6 {
    /// A request's result, classified.
    #[must_use]
    pub fn of(result: anyhow::Result<Reply6>) -> Self {
        match result {
            Ok(reply) => Self::Answered(reply),
            Err(e) if refused(&e) => Self::Refused,
            Err(e) if timed_out(&e) => Self::TimedOut,
            Err(e) => Self::Failed(format!("{e:#}")),
        }
    }

    /// Parses what `lab-client` printed for an IPv6 target.
    #[must_use]
    pub fn from_client_output(out: &str) -> Self {
        let line = out.trim();
        if let Some(rest) = line.strip_prefix("OK ") {
            return Reply6::parse(rest).map_or_else(|e| Self::Failed(format!("{e:#}")), Self::Answered);
        }
        match line {
            "ERR refused" => Self::Refused,
            "ERR timeout" => Self::TimedOut,
            other => Self::Failed(other.to_owned()),
        }
    }
}

/// One attempt from namespace `ns` (from its address `source`, or the one the kernel picks), classified.
/// UDP uses a connected socket, so an `ICMPv6` error is reported.
#[must_use]
pub fn attempt(
    ns: &str,
    proto: crate::echo::Proto,
    source: Option<Ipv6Addr>,
    target: SocketAddrV6,
    timeout: Duration,
) -> Outcome6 {
    let result = match proto {
        crate::echo::Proto::Tcp => tcp_from(ns, source, target, timeout),
        crate::echo::Proto::Udp => in_netns(ns, move || -> anyhow::Result<Reply6> {
            let socket = UdpSocket::bind((source.unwrap_or(Ipv6Addr::UNSPECIFIED), 0))?;
            socket.set_read_timeout(Some(timeout))?;
            socket.connect(target)?;
            socket.send(b"hello\n").with_context(|| format!("UDP send to {target}"))?;
            let mut buf = [0u8; 2048];
            let n = socket.recv(&mut buf).with_context(|| format!("UDP answer from {target}"))?;
            Reply6::parse(&String::from_utf8_lossy(&buf[..n]))
        })
        .and_then(|r| r),
    };
    Outcome6::of(result)
}
