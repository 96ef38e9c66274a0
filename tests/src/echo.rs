//! The lab's servers and clients: real TCP and UDP sockets inside pod namespaces.
//!
//! A server answers every request with `NAME PEER_IP:PEER_PORT`, so a client learns which backend answered
//! and which source address the backend saw (its own, or a node's after SNAT). Clients check that the answer
//! came from the address they sent to: a reply that still carries the backend's address means reverse NAT
//! failed, and is an error.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
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

/// What one request got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The name of the backend that answered.
    pub backend: String,
    /// The client address the backend saw.
    pub seen_source: SocketAddrV4,
}

impl Reply {
    fn parse(line: &str) -> anyhow::Result<Self> {
        let (name, peer) = line.trim().split_once(' ').with_context(|| format!("malformed reply {line:?}"))?;
        Ok(Self {
            backend: name.to_owned(),
            seen_source: peer.parse().with_context(|| format!("malformed peer in {line:?}"))?,
        })
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

fn wait_readable(listener: &TcpListener, timeout: Duration) {
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
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, SocketAddr::V4(peer))) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{name} {peer}\n").as_bytes(), peer);
        }
    }
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
    if stream.peer_addr()? != SocketAddr::V4(target) {
        bail!("TCP peer is {}, not {target}", stream.peer_addr()?);
    }
    stream.set_read_timeout(Some(timeout))?;
    (&stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).with_context(|| format!("TCP read from {target}"))?;
    Reply::parse(&line)
}

/// One UDP request from inside the current thread's namespace. The reply must come from `target` itself.
pub fn udp_request_here(target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello\n", target)?;
    let mut buf = [0u8; 1500];
    let (n, from) = recv_from_retrying(&socket, &mut buf).with_context(|| format!("UDP reply from {target}"))?;
    if from != SocketAddr::V4(target) {
        bail!("UDP reply came from {from}, not {target}: reverse NAT did not happen");
    }
    Reply::parse(&String::from_utf8_lossy(&buf[..n]))
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
        Proto::Udp => (|| {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect(target)?;
            socket.set_read_timeout(Some(timeout))?;
            socket.send(b"hello\n")?;
            let mut buf = [0u8; 1500];
            let (n, _) = recv_from_retrying(&socket, &mut buf)?;
            // A connected socket only receives from its peer, as the kernel sees it after recvmsg hooks.
            Reply::parse(&String::from_utf8_lossy(&buf[..n]))
        })(),
    })
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

/// A TCP connection held open in a pod namespace; each `ask` is one request on it.
pub struct TcpSession {
    tx: std::sync::mpsc::Sender<std::sync::mpsc::Sender<anyhow::Result<Reply>>>,
}

impl TcpSession {
    pub fn open(ns: &str, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Self> {
        let stream = in_netns(ns, move || TcpStream::connect_timeout(&target.into(), timeout))??;
        stream.set_read_timeout(Some(timeout))?;
        let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<anyhow::Result<Reply>>>();
        thread::spawn(move || {
            let mut reader = BufReader::new(&stream);
            for answer in rx {
                let result = (|| {
                    (&stream).write_all(b"hello\n")?;
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 {
                        bail!("connection closed");
                    }
                    Reply::parse(&line)
                })();
                let _ = answer.send(result);
            }
        });
        Ok(Self { tx })
    }

    pub fn ask(&self) -> anyhow::Result<Reply> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send(tx).map_err(|_| anyhow::anyhow!("session thread gone"))?;
        rx.recv().map_err(|_| anyhow::anyhow!("session thread gone"))?
    }
}

/// A UDP socket with a fixed source port in a pod namespace: every `ask` is the same flow.
pub struct UdpSession {
    socket: UdpSocket,
    target: SocketAddrV4,
}

impl UdpSession {
    pub fn open(ns: &str, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Self> {
        let socket = in_netns(ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
        socket.set_read_timeout(Some(timeout))?;
        Ok(Self { socket, target })
    }

    pub fn ask(&self) -> anyhow::Result<Reply> {
        self.socket.send_to(b"hello\n", self.target)?;
        let mut buf = [0u8; 1500];
        let (n, from) =
            recv_from_retrying(&self.socket, &mut buf).with_context(|| format!("UDP reply from {}", self.target))?;
        if from != SocketAddr::V4(self.target) {
            bail!("UDP reply came from {from}, not {}", self.target);
        }
        Reply::parse(&String::from_utf8_lossy(&buf[..n]))
    }
}

/// `GET /healthz` over HTTP/1.0 from namespace `ns`: the status code and the body.
pub fn http_get(ns: &str, target: SocketAddrV4, timeout: Duration) -> anyhow::Result<(u16, String)> {
    http_get_path(ns, target, "/healthz", timeout)
}

/// `GET path` over HTTP/1.0 from namespace `ns`: the status code and the body.
pub fn http_get_path(ns: &str, target: SocketAddrV4, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n");
    in_netns(ns, move || -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&target.into(), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response)?;
        let status = response.split_whitespace().nth(1).context("no status line")?.parse()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    })?
}
