//! The lab's servers and clients: real TCP and UDP sockets inside pod namespaces.
//!
//! A server answers every request with `NAME PEER_IP:PEER_PORT`, so a client learns which backend answered
//! and which source address the backend saw (its own, or a node's after SNAT). Clients check that the answer
//! came from the address they sent to: a reply that still carries the backend's address means reverse NAT
//! failed, and is an error.
//!
//! A UDP server says more of the datagram it got: `NAME PEER len=BYTES ttl=TTL` (its size, and the TTL it
//! arrived with), and a request whose first line is `big N` gets that answer padded to N bytes, so a test
//! can send and receive datagrams larger than the path's MTU.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::netns::{in_netns, spawn_in_netns};

/// How long a server thread sleeps between checks of its stop flag.
const POLL: Duration = Duration::from_millis(20);
/// The largest UDP payload IPv4 carries: 65535 less the IP and UDP headers.
pub const MAX_DATAGRAM: usize = 65_507;

/// What one request got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The name of the backend that answered.
    pub backend: String,
    /// The client address the backend saw.
    pub seen_source: SocketAddrV4,
    /// How many bytes the backend received: the datagram (UDP), or the whole upload (a bulk sink).
    pub len: Option<usize>,
    /// The TTL the request arrived with (UDP).
    pub ttl: Option<u8>,
}

impl Reply {
    /// Parses the first line of an answer: `NAME PEER`, then optional `key=value` fields (unknown keys are
    /// ignored, so an older or newer server's answer still parses).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let line = text.lines().next().unwrap_or_default().trim();
        let mut words = line.split_whitespace();
        let (Some(name), Some(peer)) = (words.next(), words.next()) else { bail!("malformed reply {line:?}") };
        let mut reply = Self {
            backend: name.to_owned(),
            seen_source: peer.parse().with_context(|| format!("malformed peer in {line:?}"))?,
            len: None,
            ttl: None,
        };
        for (key, value) in words.filter_map(|w| w.split_once('=')) {
            let bad = || format!("malformed {key} in {line:?}");
            match key {
                "len" => reply.len = Some(value.parse().with_context(bad)?),
                "ttl" => reply.ttl = Some(value.parse().with_context(bad)?),
                _ => {}
            }
        }
        Ok(reply)
    }
}

/// Echo servers running in one pod; stopped and joined on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Starts serving `name` on the given TCP and UDP ports inside namespace `ns`.
    pub fn start(ns: &str, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in tcp_ports {
            let listener = in_netns(ns, move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
                .with_context(|| format!("binding TCP port {port} in {ns}"))?;
            listener.set_nonblocking(true)?;
            let (stop, name) = (stop.clone(), name.to_owned());
            threads.push(thread::spawn(move || serve_tcp(&listener, &name, &stop)));
        }
        for &port in udp_ports {
            let socket = in_netns(ns, move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))?
                .with_context(|| format!("binding UDP port {port} in {ns}"))?;
            socket.set_read_timeout(Some(POLL))?;
            // Each datagram's TTL comes with it, as a control message.
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvTtl, &true)?;
            let (stop, name) = (stop.clone(), name.to_owned());
            threads.push(thread::spawn(move || serve_udp(&socket, &name, &stop)));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits until `listener` has a connection to accept, or `timeout` passes.
pub(crate) fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsFd as _;
    let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
}

fn serve_tcp(listener: &TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, SocketAddr::V4(peer))) => {
                let name = name.to_owned();
                // One thread per connection, so a held-open connection does not block new ones.
                thread::spawn(move || answer_tcp(&stream, &name, peer));
            }
            Ok(_) => {}
            // Wait for the next connection, but wake at least every POLL to see `stop`: a sleep here would
            // cap the accept rate at 1/POLL, which the benchmark's connection rate would then measure.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(listener, POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Answers every line of a connection until the client closes it (or is idle for 10 s), so a test can
/// hold a connection open across a change and use it again.
fn answer_tcp(stream: &TcpStream, name: &str, peer: SocketAddrV4) -> std::io::Result<()> {
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

fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer, ttl)) = recv_with_ttl(socket, &mut buf) {
            let ttl = ttl.map(|t| format!(" ttl={t}")).unwrap_or_default();
            let _ = socket.send_to(&udp_answer(name, peer, &buf[..n], &ttl), peer);
        }
    }
}

/// One datagram, its sender, and the TTL it arrived with (when the socket asked for it).
fn recv_with_ttl(socket: &UdpSocket, buf: &mut [u8]) -> nix::Result<(usize, SocketAddrV4, Option<u8>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg};
    use std::os::fd::AsRawFd as _;
    let mut control = nix::cmsg_space!(libc::c_int);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrIn>(socket.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::empty())?;
    let ttl = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4Ttl(ttl) => u8::try_from(ttl).ok(),
        _ => None,
    });
    let peer = msg.address.ok_or(nix::errno::Errno::EINVAL)?;
    Ok((msg.bytes, peer.into(), ttl))
}

/// The answer to datagram `request`: `NAME PEER len=N` and `extra` (the TTL or hop limit it arrived with),
/// padded with dots to the size a first line of `big SIZE` asks for. Both families' echo servers answer so.
pub(crate) fn udp_answer(name: &str, peer: impl std::fmt::Display, request: &[u8], extra: &str) -> Vec<u8> {
    let mut answer = format!("{name} {peer} len={}{extra}\n", request.len()).into_bytes();
    let first_line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let size = std::str::from_utf8(first_line).ok().and_then(|l| l.trim().strip_prefix("big ")?.parse::<usize>().ok());
    if let Some(size) = size {
        answer.resize(size.clamp(answer.len(), MAX_DATAGRAM), b'.');
    }
    answer
}

/// A UDP request of `size` bytes (at least its first line): `hello`, or `big N` to ask for an answer of N
/// bytes; the rest is dots.
#[must_use]
pub fn udp_payload(size: usize, answer_size: Option<usize>) -> Vec<u8> {
    let mut payload = answer_size.map_or_else(|| "hello\n".to_owned(), |n| format!("big {n}\n")).into_bytes();
    payload.resize(size.max(payload.len()), b'.');
    payload
}

/// `recv_from` that carries on when a signal interrupts it (EINTR), as std's buffered reads do: a signal
/// to the test process is not an answer from the dataplane. The socket's read timeout still bounds it.
pub fn recv_from_retrying(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match socket.recv_from(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// One TCP request from inside the current thread's namespace.
pub fn tcp_request_here(target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    let stream =
        TcpStream::connect_timeout(&target.into(), timeout).with_context(|| format!("TCP connect to {target}"))?;
    tcp_exchange(&stream, target, timeout)
}

/// [`attempt`] from a chosen source address of namespace `ns` (a second address of the external client, a
/// load-balancer VIP the client holds), classified.
pub fn attempt_from(
    ns: &str,
    source: Ipv4Addr,
    proto: Proto,
    target: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    in_netns(ns, move || {
        classify((|| {
            let kind = if proto == Proto::Tcp { socket2::Type::STREAM } else { socket2::Type::DGRAM };
            let socket = socket2::Socket::new(socket2::Domain::IPV4, kind, None)?;
            socket.bind(&SocketAddrV4::new(source, 0).into())?;
            if proto == Proto::Tcp {
                socket.connect_timeout(&target.into(), timeout).with_context(|| format!("TCP connect to {target}"))?;
                tcp_exchange(&socket.into(), target, timeout)
            } else {
                connected_udp_ask(&socket.into(), target, timeout)
            }
        })())
    })
}

/// The socket option nix lacks, made with nix's own macro (which names its helper macros unqualified).
mod ip_options {
    use nix::{setsockopt_impl, sockopt_impl};
    sockopt_impl!(
        /// `IP_OPTIONS`: the IPv4 options every packet of a socket carries; 40 bytes, all an IPv4 header
        /// holds.
        IpOptions,
        SetOnly,
        libc::IPPROTO_IP,
        libc::IP_OPTIONS,
        [u8; 40]
    );
}
pub use ip_options::IpOptions;

/// A Record Route option (RFC 791) with room for nine addresses: type 7, length 39, pointer 4, then an
/// end-of-options byte. The sender and every router on the way fill in their address.
pub const RECORD_ROUTE: [u8; 40] = {
    let mut option = [0u8; 40];
    (option[0], option[1], option[2]) = (7, 39, 4);
    option
};

/// One TCP request from namespace `ns` on a socket whose every packet carries the IPv4 `options`.
pub fn tcp_request_with_ip_options(
    ns: &str,
    target: SocketAddrV4,
    options: [u8; 40],
    timeout: Duration,
) -> anyhow::Result<Reply> {
    use socket2::{Domain, Socket, Type};
    in_netns(ns, move || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        nix::sys::socket::setsockopt(&socket, IpOptions, &options).context("setting IP_OPTIONS")?;
        socket.connect_timeout(&target.into(), timeout).with_context(|| format!("TCP connect to {target}"))?;
        tcp_exchange(&socket.into(), target, timeout)
    })?
}

/// One `hello` line on a connected stream, and the answer, which must come from `target`.
fn tcp_exchange(stream: &TcpStream, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    if stream.peer_addr()? != SocketAddr::V4(target) {
        bail!("TCP peer is {}, not {target}", stream.peer_addr()?);
    }
    stream.set_read_timeout(Some(timeout))?;
    (&*stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).with_context(|| format!("TCP read from {target}"))?;
    Reply::parse(&line)
}

/// One UDP request from inside the current thread's namespace. The reply must come from `target` itself.
pub fn udp_request_here(target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(udp_ask(&socket, target, b"hello\n")?.0)
}

/// Sends `request` to `target` on an unconnected `socket` (`sendto`) and waits, up to the socket's read
/// timeout, for the answer, which must come from `target` itself. Returns the answer and its size.
pub fn udp_ask(socket: &UdpSocket, target: SocketAddrV4, request: &[u8]) -> anyhow::Result<(Reply, usize)> {
    socket.send_to(request, target).with_context(|| format!("UDP send to {target}"))?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let (n, from) = recv_from_retrying(socket, &mut buf).with_context(|| format!("UDP reply from {target}"))?;
    if from != SocketAddr::V4(target) {
        bail!("UDP reply came from {from}, not {target}: reverse NAT did not happen");
    }
    Ok((Reply::parse(&String::from_utf8_lossy(&buf[..n]))?, n))
}

/// Asks `target` (either family) once over UDP from each of `ports` (fixed client ports, one socket each)
/// in namespace `ns`: the backend that answered each, or why none did.
#[must_use]
pub fn udp_ask_from_ports(ns: &str, target: impl Into<SocketAddr>, ports: Vec<u16>) -> Vec<Result<String, String>> {
    let target = target.into();
    in_netns(ns, move || {
        ports
            .into_iter()
            .map(|port| {
                let any = match target {
                    SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                };
                let socket = UdpSocket::bind((any, port)).map_err(|e| e.to_string())?;
                socket.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
                let backend = match target {
                    SocketAddr::V4(t) => udp_ask(&socket, t, b"hello\n").map(|(r, _)| r.backend),
                    SocketAddr::V6(t) => crate::echo6::udp_ask(&socket, t).map(|r| r.backend),
                };
                backend.map_err(|e| format!("{e:#}"))
            })
            .collect()
    })
    .unwrap_or_else(|e| vec![Err(format!("{e:#}"))])
}

/// One UDP request of any size (see [`udp_payload`]) from namespace `ns`: the answer and its size.
pub fn udp_exchange(
    ns: &str,
    target: SocketAddrV4,
    request: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<(Reply, usize)> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(timeout))?;
        udp_ask(&socket, target, &request)
    })?
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// `count` sequential requests from namespace `ns`, each on a new connection (TCP) or socket (UDP).
pub fn requests(
    ns: &str,
    proto: Proto,
    target: SocketAddrV4,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<anyhow::Result<Reply>>> {
    spawn_in_netns(ns, move || {
        (0..count)
            .map(|_| match proto {
                Proto::Tcp => tcp_request_here(target, timeout),
                Proto::Udp => udp_request_here(target, timeout),
            })
            .collect()
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))
}

/// One request from namespace `ns`.
pub fn request(ns: &str, proto: Proto, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    requests(ns, proto, target, 1, timeout)?.pop().expect("one request")
}

/// How a single attempt ended, for tests that expect a refusal or a timeout rather than an answer.
#[derive(Debug)]
pub enum Outcome {
    Answered(Reply),
    /// ECONNREFUSED: a TCP RST, or an ICMP port unreachable.
    Refused,
    TimedOut,
    Failed(String),
}

fn classify(result: anyhow::Result<Reply>) -> Outcome {
    match result {
        Ok(reply) => Outcome::Answered(reply),
        Err(e) => {
            let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()).map(std::io::Error::kind);
            match io {
                Some(std::io::ErrorKind::ConnectionRefused) => Outcome::Refused,
                Some(std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => Outcome::TimedOut,
                _ => Outcome::Failed(format!("{e:#}")),
            }
        }
    }
}

/// One attempt from namespace `ns`, classified. UDP uses a connected socket, so an ICMP error is reported.
pub fn attempt(ns: &str, proto: Proto, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Outcome> {
    in_netns(ns, move || attempt_here(proto, target, timeout))
}

/// [`attempt`] from the current namespace.
#[must_use]
pub fn attempt_here(proto: Proto, target: SocketAddrV4, timeout: Duration) -> Outcome {
    classify(match proto {
        Proto::Tcp => tcp_request_here(target, timeout),
        Proto::Udp => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .map_err(anyhow::Error::from)
            .and_then(|socket| connected_udp_ask(&socket, target, timeout)),
    })
}

/// One request on `socket` connected to `target`, so an ICMP error about it is reported (ECONNREFUSED). A
/// connected socket only receives from its peer, as the kernel sees it after the recvmsg hooks.
fn connected_udp_ask(socket: &UdpSocket, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"hello\n")?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let (n, _) = recv_from_retrying(socket, &mut buf)?;
    Reply::parse(&String::from_utf8_lossy(&buf[..n]))
}

impl Outcome {
    /// Parses what `lab-client` printed.
    #[must_use]
    pub fn from_client_output(out: &str) -> Self {
        let line = out.trim();
        if let Some(rest) = line.strip_prefix("OK ") {
            return Reply::parse(rest).map_or_else(|e| Self::Failed(format!("{e:#}")), Self::Answered);
        }
        match line {
            "ERR refused" => Self::Refused,
            "ERR timeout" => Self::TimedOut,
            other => Self::Failed(other.to_owned()),
        }
    }
}

/// An echo server's answer, in either family's form ([`Reply`], [`crate::echo6::Reply6`]).
pub trait Answer: Sized + Send + 'static {
    /// Parses the answer's first line.
    ///
    /// # Errors
    /// A malformed line.
    fn parse_answer(text: &str) -> anyhow::Result<Self>;
}

impl Answer for Reply {
    fn parse_answer(text: &str) -> anyhow::Result<Self> {
        Self::parse(text)
    }
}

/// A TCP connection held open in a pod namespace; each `ask` is one request on it. IPv4 by
/// [`TcpSession::open`], IPv6 by [`TcpSession::open6`].
pub struct TcpSession<R = Reply> {
    tx: std::sync::mpsc::Sender<std::sync::mpsc::Sender<anyhow::Result<R>>>,
}

impl TcpSession {
    pub fn open(ns: &str, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Self> {
        Self::start(ns, target.into(), timeout)
    }
}

impl TcpSession<crate::echo6::Reply6> {
    pub fn open6(ns: &str, target: std::net::SocketAddrV6, timeout: Duration) -> anyhow::Result<Self> {
        Self::start(ns, target.into(), timeout)
    }
}

impl<R: Answer> TcpSession<R> {
    fn start(ns: &str, target: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let stream = in_netns(ns, move || TcpStream::connect_timeout(&target, timeout))??;
        stream.set_read_timeout(Some(timeout))?;
        let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<anyhow::Result<R>>>();
        thread::spawn(move || {
            let mut reader = BufReader::new(&stream);
            for answer in rx {
                let result = (|| {
                    (&stream).write_all(b"hello\n")?;
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 {
                        bail!("connection closed");
                    }
                    R::parse_answer(&line)
                })();
                let _ = answer.send(result);
            }
        });
        Ok(Self { tx })
    }

    pub fn ask(&self) -> anyhow::Result<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send(tx).map_err(|_| anyhow::anyhow!("session thread gone"))?;
        rx.recv().map_err(|_| anyhow::anyhow!("session thread gone"))?
    }
}

/// A UDP socket with a fixed source port in a pod namespace: every `ask` is the same flow. IPv4 by
/// [`UdpSession::open`], IPv6 by [`UdpSession::open6`].
pub struct UdpSession<R = Reply> {
    socket: UdpSocket,
    target: SocketAddr,
    answer: std::marker::PhantomData<R>,
}

impl UdpSession {
    pub fn open(ns: &str, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Self> {
        Self::start(ns, target.into(), timeout)
    }
}

impl UdpSession<crate::echo6::Reply6> {
    pub fn open6(ns: &str, target: std::net::SocketAddrV6, timeout: Duration) -> anyhow::Result<Self> {
        Self::start(ns, target.into(), timeout)
    }
}

impl<R: Answer> UdpSession<R> {
    fn start(ns: &str, target: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let any: SocketAddr = match target {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = in_netns(ns, move || UdpSocket::bind(any))??;
        socket.set_read_timeout(Some(timeout))?;
        Ok(Self { socket, target, answer: std::marker::PhantomData })
    }

    /// One datagram from the session's port; the answer must come from the target itself.
    pub fn ask(&self) -> anyhow::Result<R> {
        let target = self.target;
        self.socket.send_to(b"hello\n", target).with_context(|| format!("UDP send to {target}"))?;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (n, from) =
            recv_from_retrying(&self.socket, &mut buf).with_context(|| format!("UDP reply from {target}"))?;
        if from != target {
            bail!("UDP reply came from {from}, not {target}: reverse NAT did not happen");
        }
        R::parse_answer(&String::from_utf8_lossy(&buf[..n]))
    }
}

/// `GET /healthz` over HTTP/1.0 from namespace `ns`: the status code and the body.
pub fn http_get(ns: &str, target: impl Into<SocketAddr>, timeout: Duration) -> anyhow::Result<(u16, String)> {
    http_get_path(ns, target, "/healthz", timeout)
}

/// `GET path` over HTTP/1.0 from namespace `ns`: the status code and the body.
pub fn http_get_path(
    ns: &str,
    target: impl Into<SocketAddr>,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let target = target.into();
    let request = format!("GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n");
    in_netns(ns, move || -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response)?;
        let status = response.split_whitespace().nth(1).context("no status line")?.parse()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_with_and_without_the_udp_fields() {
        let plain = Reply::parse("pod-1-2 10.200.1.11:40000\n").unwrap();
        assert_eq!((plain.backend.as_str(), plain.len, plain.ttl), ("pod-1-2", None, None));
        let full = Reply::parse("pod-2-2 10.240.0.11:41000 len=4000 ttl=62 later=1\n....").unwrap();
        assert_eq!(full.seen_source, "10.240.0.11:41000".parse().unwrap());
        assert_eq!((full.len, full.ttl), (Some(4000), Some(62)));
        assert!(Reply::parse("pod-2-2").is_err());
        assert!(Reply::parse("pod-2-2 10.240.0.11:41000 ttl=x").is_err());
    }

    #[test]
    fn a_big_request_gets_an_answer_of_the_size_asked_for() {
        let peer: SocketAddrV4 = "10.200.1.11:40000".parse().unwrap();
        let request = udp_payload(4000, Some(3000));
        assert_eq!(request.len(), 4000);
        let answer = udp_answer("pod-2-2", peer, &request, " ttl=62");
        assert_eq!(answer.len(), 3000);
        let reply = Reply::parse(&String::from_utf8_lossy(&answer)).unwrap();
        assert_eq!((reply.backend.as_str(), reply.len, reply.ttl), ("pod-2-2", Some(4000), Some(62)));
        let small = udp_answer("pod-2-2", peer, b"hello\n", "");
        assert_eq!(small, b"pod-2-2 10.200.1.11:40000 len=6\n");
    }
}
