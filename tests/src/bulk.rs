//! Bulk TCP transfers, for paths whose MTU is lower than the endpoints think: a server in a pod that counts
//! what a client uploads or sends what it asks to download, and clients that move a fixed number of bytes
//! before a deadline. A transfer whose big segments are dropped without the sender learning the path MTU
//! stalls for good, so the deadline is what tells a working path from a broken one.
//!
//! Protocol: the client's first line is `upload` (then its data, then its half-close; the server answers
//! `NAME PEER len=BYTES_RECEIVED`) or `download N` (the server answers `NAME PEER`, then N bytes, then
//! closes). The server listens on both families.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::in_netns;

/// How long a server thread sleeps between checks of its stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long a server waits on a silent client before giving the connection up.
const IDLE: Duration = Duration::from_secs(10);
/// The most a client may ask to download: transfers stay bounded whatever a test asks.
const MAX_DOWNLOAD: u64 = 64 << 20;
const CHUNK: usize = 64 << 10;

/// A bulk server in one pod; stopped and joined on drop (connections in progress end by their timeouts).
pub struct BulkServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl BulkServer {
    /// Starts serving `name` on TCP `port` inside namespace `ns`, IPv4 and IPv6 (one socket on `[::]`,
    /// which takes IPv4 too unless the namespace sets `bindv6only`).
    pub fn start(ns: &str, name: &str, port: u16) -> anyhow::Result<Self> {
        // A host booted without IPv6 refuses the `[::]` socket: IPv4 alone then.
        let listener = in_netns(ns, move || {
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        })?
        .with_context(|| format!("binding TCP port {port} in {ns}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), name.to_owned());
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let name = name.clone();
                        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                        thread::spawn(move || serve(&stream, &name, peer));
                    }
                    Err(_) => thread::sleep(POLL),
                }
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: &TcpStream, name: &str, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut writer = stream;
    if line.trim() == "upload" {
        // What the reader buffered past the first line is counted too: it reads on from its buffer.
        let received = std::io::copy(&mut reader, &mut std::io::sink())?;
        writer.write_all(format!("{name} {peer} len={received}\n").as_bytes())?;
    } else if let Some(size) = line.trim().strip_prefix("download ").and_then(|n| n.parse::<u64>().ok()) {
        writer.write_all(format!("{name} {peer}\n").as_bytes())?;
        let chunk = vec![0u8; CHUNK];
        let mut left = size.min(MAX_DOWNLOAD);
        while left > 0 {
            let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
            writer.write_all(&chunk[..n])?;
            left -= n as u64;
        }
    }
    stream.shutdown(Shutdown::Write)
}

/// The time left before `deadline`, or an error saying what was still undone.
fn left(deadline: Instant, what: impl FnOnce() -> String) -> anyhow::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("deadline passed: {}", what());
    }
    Ok(left)
}

/// What one transfer moved: the server that answered, and how many bytes arrived (at the server for an
/// upload, by its own account; at the client for a download).
#[derive(Debug)]
pub struct Transfer {
    pub backend: String,
    pub bytes: u64,
}

/// The server's line `NAME PEER [len=N]`: its name, and `len` if given.
fn account(line: &str) -> anyhow::Result<(String, Option<u64>)> {
    let mut words = line.split_whitespace();
    let (Some(name), Some(_peer)) = (words.next(), words.next()) else { bail!("malformed account {line:?}") };
    let len = words.find_map(|w| w.strip_prefix("len=")).map(str::parse).transpose();
    Ok((name.to_owned(), len.with_context(|| format!("malformed len in {line:?}"))?))
}

fn connect(target: SocketAddr, deadline: Instant) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, left(deadline, || "connecting".to_owned())?)
        .with_context(|| format!("TCP connect to {target}"))?;
    if stream.peer_addr()? != target {
        bail!("TCP peer is {}, not {target}", stream.peer_addr()?);
    }
    // Until a step sets its own: no call blocks past the deadline.
    let left = left(deadline, || "connected".to_owned())?;
    stream.set_write_timeout(Some(left))?;
    stream.set_read_timeout(Some(left))?;
    Ok(stream)
}

/// Uploads `bytes` bytes to the bulk server at `target` from namespace `ns`, all within `within`. Returns
/// the server's account of how many bytes reached it.
pub fn upload(ns: &str, target: impl Into<SocketAddr>, bytes: u64, within: Duration) -> anyhow::Result<Transfer> {
    let target = target.into();
    in_netns(ns, move || {
        let deadline = Instant::now() + within;
        let stream = connect(target, deadline)?;
        (&stream).write_all(b"upload\n")?;
        let chunk = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < bytes {
            // One `write` per timeout: a write blocks for at most the time left, so the deadline holds.
            stream.set_write_timeout(Some(left(deadline, || format!("{sent} of {bytes} bytes written"))?))?;
            let n = usize::try_from(bytes - sent).map_or(CHUNK, |l| l.min(CHUNK));
            match (&stream).write(&chunk[..n]) {
                Ok(written) => sent += written as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("upload stalled after {sent} of {bytes} bytes")),
            }
        }
        stream.shutdown(Shutdown::Write)?;
        stream.set_read_timeout(Some(left(deadline, || format!("all {bytes} bytes written, no account yet"))?))?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .with_context(|| format!("the server's account of the upload of {bytes} bytes"))?;
        let (backend, len) = account(&line)?;
        let bytes = len.with_context(|| format!("no len in the server's account {line:?}"))?;
        Ok(Transfer { backend, bytes })
    })?
}

/// Downloads `bytes` bytes from the bulk server at `target` into namespace `ns`, within `within`. Returns
/// who answered and how many bytes arrived before the server closed.
pub fn download(ns: &str, target: impl Into<SocketAddr>, bytes: u64, within: Duration) -> anyhow::Result<Transfer> {
    let target = target.into();
    in_netns(ns, move || {
        let deadline = Instant::now() + within;
        let stream = connect(target, deadline)?;
        (&stream).write_all(format!("download {bytes}\n").as_bytes())?;
        let mut reader = BufReader::new(&stream);
        stream.set_read_timeout(Some(left(deadline, || "no answer yet".to_owned())?))?;
        let mut line = String::new();
        reader.read_line(&mut line).context("the server's first line")?;
        let (backend, _) = account(&line)?;
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        loop {
            stream.set_read_timeout(Some(left(deadline, || format!("{received} of {bytes} bytes read"))?))?;
            match reader.read(&mut buf) {
                Ok(0) => return Ok(Transfer { backend, bytes: received }),
                Ok(n) => received += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("download stalled after {received} of {bytes} bytes"));
                }
            }
        }
    })?
}
