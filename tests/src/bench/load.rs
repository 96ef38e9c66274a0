//! The load generators: one client thread inside a namespace, for a fixed time, against the lab's echo
//! servers (one line in, one line out), over either family. Each stops by itself after its duration.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::netns::in_netns;

/// How long one request may take before the run counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// New TCP connections per second: connect, one request and its answer, close; back to back.
///
/// # Errors
/// When a request fails: a benchmark of a broken path is not a measurement.
pub fn connections_per_second(ns: &str, target: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    in_netns(ns, move || {
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < duration {
            match target {
                SocketAddr::V4(v4) => crate::echo::tcp_request_here(v4, REQUEST_TIMEOUT).map(drop),
                SocketAddr::V6(v6) => crate::echo6::tcp_here(None, v6, REQUEST_TIMEOUT).map(drop),
            }
            .with_context(|| format!("connection {done} to {target}"))?;
            done += 1;
        }
        Ok(rate(done, started.elapsed()))
    })?
}

/// Requests per second over one held-open TCP connection (request/response, no pipelining).
///
/// # Errors
/// When the connection or a request fails.
pub fn requests_per_second(ns: &str, target: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    in_netns(ns, move || {
        let stream =
            TcpStream::connect_timeout(&target, REQUEST_TIMEOUT).with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < duration {
            (&stream).write_all(b"x\n")?;
            line.clear();
            if reader.read_line(&mut line).with_context(|| format!("request {done} to {target}"))? == 0 {
                anyhow::bail!("{target} closed the connection after {done} requests");
            }
            done += 1;
        }
        Ok(rate(done, started.elapsed()))
    })?
}

/// UDP request/response pairs per second from one socket (each datagram answered before the next).
///
/// # Errors
/// When no answer comes within the timeout.
pub fn udp_exchanges_per_second(ns: &str, target: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(unspecified(target, 0))?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        let mut buf = [0u8; 256];
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < duration {
            socket.send(b"x")?;
            crate::echo::recv_from_retrying(&socket, &mut buf)
                .with_context(|| format!("UDP exchange {done} with {target}"))?;
            done += 1;
        }
        Ok(rate(done, started.elapsed()))
    })?
}

/// What a UDP flood achieved: datagrams per second sent by the client and delivered to the backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flood {
    pub sent: f64,
    pub delivered: f64,
}

/// One client blasts small datagrams at `target` for `duration` as fast as it can, while a sink bound to
/// `sink_port` in `sink_ns` (the backend) counts what arrives: the path's packet rate, not its latency.
/// Both ends stop by themselves: the sender after `duration`, the sink once nothing arrives for a moment.
///
/// # Errors
/// When nothing arrives at all: the path is broken, and a rate of zero would be a false measurement.
pub fn udp_flood(
    ns: &str,
    target: SocketAddr,
    (sink_ns, sink_port): (&str, u16),
    duration: Duration,
) -> anyhow::Result<Flood> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sink = crate::netns::spawn_in_netns(sink_ns, move || -> anyhow::Result<u64> {
        let socket = UdpSocket::bind(unspecified(target, sink_port))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        ready_tx.send(()).ok();
        let mut buf = [0u8; 64];
        let mut count = 0u64;
        // Stops after the flood (bounded by the sender's duration) plus one quiet read timeout.
        let deadline = Instant::now() + duration + REQUEST_TIMEOUT;
        while Instant::now() < deadline {
            match socket.recv(&mut buf) {
                Ok(_) => count += 1,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if count > 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(count)
    })?;
    ready_rx.recv_timeout(REQUEST_TIMEOUT).context("the UDP sink did not start")?;
    let (sent, elapsed) = in_netns(ns, move || -> anyhow::Result<(u64, Duration)> {
        let socket = UdpSocket::bind(unspecified(target, 0))?;
        socket.connect(target)?;
        let payload = [0u8; 16];
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < duration {
            // A full queue or an ICMP error bounced back is part of what is measured: keep sending.
            for _ in 0..64 {
                if socket.send(&payload).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok((sent, started.elapsed()))
    })??;
    let delivered = sink.join().map_err(|_| anyhow::anyhow!("the UDP sink panicked"))??;
    if delivered == 0 {
        anyhow::bail!("none of {sent} datagrams to {target} reached the backend");
    }
    Ok(Flood { sent: rate(sent, elapsed), delivered: rate(delivered, elapsed) })
}

/// The unspecified address of `target`'s family, with `port`.
fn unspecified(target: SocketAddr, port: u16) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
    }
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}
