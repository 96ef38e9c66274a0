//! Requests from whatever namespace and cgroup this process was started in; the lab runs it on a node to
//! test the node's own traffic. Prints `OK <backend> <seen source>` or `ERR <kind> <detail>`, one line per
//! request.
//!
//! - `tcp|udp ADDR:PORT TIMEOUT_MS`: one request (UDP: on a fresh unconnected socket); an IPv6 target is
//!   written `[ADDR]:PORT`.
//! - `udp-flow ADDR:PORT TIMEOUT_MS COUNT`: COUNT requests on ONE unconnected UDP socket (`sendto` each
//!   time), so all of them are one flow; stops at the first failure. Either family.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use proxy_lab::{
    echo::{Outcome, Proto, attempt_here, udp_ask, udp_request_here},
    echo6,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (mode, target, timeout_ms, count) = match args.as_slice() {
        [_, mode, target, timeout_ms] => (mode, target, timeout_ms, "1"),
        [_, mode, target, timeout_ms, count] if mode == "udp-flow" => (mode, target, timeout_ms, count.as_str()),
        _ => {
            eprintln!(
                "usage: lab-client tcp|udp ADDR:PORT TIMEOUT_MS | lab-client udp-flow ADDR:PORT TIMEOUT_MS COUNT"
            );
            return ExitCode::from(2);
        }
    };
    if let (Ok(target), Ok(ms), Ok(count)) =
        (target.parse::<SocketAddrV6>(), timeout_ms.parse::<u64>(), count.parse::<usize>())
    {
        let timeout = Duration::from_millis(ms);
        match mode.as_str() {
            "udp" => drop(print6(echo6::udp_here(target, timeout))),
            "udp-flow" => udp_flow6(target, timeout, count),
            _ => drop(print6(echo6::tcp_here(None, target, timeout))),
        }
        return ExitCode::SUCCESS;
    }
    let (Ok(target), Ok(ms), Ok(count)) = (target.parse::<SocketAddrV4>(), timeout_ms.parse::<u64>(), count.parse())
    else {
        eprintln!("bad target, timeout or count");
        return ExitCode::from(2);
    };
    let timeout = Duration::from_millis(ms);
    match mode.as_str() {
        // Unconnected: sendto() and recvfrom(), and the reply must come from the address sent to.
        "udp" => print(
            &udp_request_here(target, timeout).map_or_else(|e| Outcome::Failed(format!("{e:#}")), Outcome::Answered),
        ),
        "udp-flow" => udp_flow(target, timeout, count),
        _ => print(&attempt_here(Proto::Tcp, target, timeout)),
    }
    ExitCode::SUCCESS
}

/// `count` requests from one unconnected socket; stops at the first that gets no answer.
fn udp_flow(target: SocketAddrV4, timeout: Duration, count: usize) {
    let socket =
        match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| s.set_read_timeout(Some(timeout)).map(|()| s)) {
            Ok(socket) => socket,
            Err(e) => return print(&Outcome::Failed(format!("socket: {e}"))),
        };
    for _ in 0..count {
        let outcome = udp_ask(&socket, target, b"hello\n")
            .map_or_else(|e| Outcome::Failed(format!("{e:#}")), |(r, _)| Outcome::Answered(r));
        let failed = !matches!(outcome, Outcome::Answered(_));
        print(&outcome);
        if failed {
            return;
        }
    }
}

/// [`udp_flow`] over IPv6.
fn udp_flow6(target: SocketAddrV6, timeout: Duration, count: usize) {
    let socket =
        match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).and_then(|s| s.set_read_timeout(Some(timeout)).map(|()| s)) {
            Ok(socket) => socket,
            Err(e) => return println!("ERR failed socket: {e}"),
        };
    for _ in 0..count {
        if !print6(echo6::udp_ask(&socket, target)) {
            return;
        }
    }
}

/// Prints an IPv6 request's outcome as [`print`] does; whether it was answered.
fn print6(reply: anyhow::Result<echo6::Reply6>) -> bool {
    match reply {
        Ok(r) => {
            println!("OK {} {}", r.backend, r.seen_source);
            return true;
        }
        Err(e) if echo6::refused(&e) => println!("ERR refused"),
        Err(e) if echo6::timed_out(&e) => println!("ERR timeout"),
        Err(e) => println!("ERR failed {e:#}"),
    }
    false
}

fn print(outcome: &Outcome) {
    match outcome {
        Outcome::Answered(r) => println!("OK {} {}", r.backend, r.seen_source),
        Outcome::Refused => println!("ERR refused"),
        Outcome::TimedOut => println!("ERR timeout"),
        Outcome::Failed(e) => println!("ERR failed {e}"),
    }
}
