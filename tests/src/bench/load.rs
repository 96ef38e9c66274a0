//! The load generators: one client thread inside a namespace, for a fixed time, against the lab's echo
//! servers (one line in, one line out). Each stops by itself after its duration.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddrV4, TcpStream, UdpSocket},
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
pub fn connections_per_second(ns: &str, target: SocketAddrV4, duration: Duration) -> anyhow::Result<f64> {
    in_netns(ns, move || {
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < duration {
            crate::echo::tcp_request_here(target, REQUEST_TIMEOUT)
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
pub fn requests_per_second(ns: &str, target: SocketAddrV4, duration: Duration) -> anyhow::Result<f64> {
    in_netns(ns, move || {
        let stream = TcpStream::connect_timeout(&target.into(), REQUEST_TIMEOUT)
            .with_context(|| format!("connecting to {target}"))?;
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
pub fn udp_exchanges_per_second(ns: &str, target: SocketAddrV4, duration: Duration) -> anyhow::Result<f64> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
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

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}
