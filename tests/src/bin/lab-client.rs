//! One request from whatever namespace and cgroup this process was started in; the lab runs it on a node
//! to test the node's own traffic. Prints `OK <backend> <seen source>` or `ERR <kind> <detail>`.

use std::{net::SocketAddrV4, process::ExitCode, time::Duration};

use proxy_lab::echo::{Outcome, Proto, attempt_here, udp_request_here};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, proto, target, timeout_ms] = args.as_slice() else {
        eprintln!("usage: lab-client tcp|udp ADDR:PORT TIMEOUT_MS");
        return ExitCode::from(2);
    };
    let (Ok(target), Ok(ms)) = (target.parse::<SocketAddrV4>(), timeout_ms.parse::<u64>()) else {
        eprintln!("bad target or timeout");
        return ExitCode::from(2);
    };
    let timeout = Duration::from_millis(ms);
    let outcome = if proto == "udp" {
        // Unconnected: sendto() and recvfrom(), and the reply must come from the address sent to.
        udp_request_here(target, timeout).map_or_else(|e| Outcome::Failed(format!("{e:#}")), Outcome::Answered)
    } else {
        attempt_here(Proto::Tcp, target, timeout)
    };
    match outcome {
        Outcome::Answered(r) => println!("OK {} {}", r.backend, r.seen_source),
        Outcome::Refused => println!("ERR refused"),
        Outcome::TimedOut => println!("ERR timeout"),
        Outcome::Failed(e) => println!("ERR failed {e}"),
    }
    ExitCode::SUCCESS
}
