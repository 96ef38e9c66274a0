//! Real servers (dnsmasq, nginx) run inside a lab pod's namespace, and the real clients (dig, dnsperf, curl,
//! wrk) that test through them. A [`Daemon`] is killed when dropped, so a failing test leaves none behind.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// A server process in a network namespace (`ip netns exec` execs it, so the child is the server itself).
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program args…` in namespace `ns`, its output going to `log`.
    pub fn start(ns: &str, name: &str, program: &str, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program} for {name}"))?;
        Ok(Self { name: name.to_owned(), child, log: log.to_owned() })
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the server has printed so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the server has exited (a bad configuration ends it at once), quoting its output.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited ({status}): {}", self.name, self.log());
        }
        Ok(())
    }

    /// Kills the server and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// dnsmasq listening on each of `addrs` at `port` and answering `who.lab` with those same addresses (`A`
/// with the IPv4 one, `AAAA` with the IPv6 one: the answer tells a client which pod answered), nothing
/// else: no upstream, no hosts file, no cache of anything it was not told.
#[must_use]
pub fn dnsmasq_args(addrs: &[IpAddr], port: u16) -> Vec<String> {
    let listen = addrs.iter().map(|a| format!("--listen-address={a}"));
    let answers: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file",
        "--dns-forward-max=1000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(listen)
    .chain([format!("--port={port}"), format!("--host-record=who.lab,{}", answers.join(","))])
    .collect()
}

/// An nginx configuration serving `body` on each of `addrs` at `port` to every request, as a foreground single process
/// whose files all live under `dir`. The body goes through the SSI filter, which drops `Content-Length`:
/// an HTTP/1.0 response then ends when the server closes, so the server always closes first and a client
/// reusing its port is never held up by its own `TIME_WAIT`.
#[must_use]
pub fn nginx_conf(dir: &Path, addrs: &[IpAddr], port: u16, body: &str) -> String {
    let d = dir.display();
    let mut conf = String::new();
    let _ = writeln!(conf, "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;");
    let _ = writeln!(conf, "error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}");
    let _ =
        writeln!(conf, "http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;");
    let _ = writeln!(conf, "  keepalive_requests 100000;");
    let _ = writeln!(conf, "  server {{");
    for addr in addrs {
        let _ = writeln!(conf, "    listen {} reuseport backlog=4096;", SocketAddr::new(*addr, port));
    }
    let _ = writeln!(conf, "    location / {{ ssi on; ssi_types *; return 200 \"{body}\\n\"; }}\n  }}\n}}");
    conf
}

/// Polls `ready` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{what}: not ready within {timeout:?}")
}

/// What `dig` got for `who.lab` in the server's family (`A` from an IPv4 server, `AAAA` from an IPv6 one):
/// the answer's address, or the reason there was none.
pub fn dig_who(ns: &str, server: IpAddr, port: u16, source: Option<(IpAddr, u16)>) -> Result<IpAddr, String> {
    let mut args = vec![
        "netns".to_owned(),
        "exec".to_owned(),
        ns.to_owned(),
        "dig".to_owned(),
        format!("@{server}"),
        "-p".to_owned(),
        port.to_string(),
        "+tries=1".to_owned(),
        "+time=2".to_owned(),
        "+short".to_owned(),
    ];
    if let Some((addr, sport)) = source {
        args.push("-b".to_owned());
        args.push(format!("{addr}#{sport}"));
    }
    args.push("who.lab".to_owned());
    args.push(if server.is_ipv6() { "AAAA" } else { "A" }.to_owned());
    let out = Command::new("ip").args(&args).output().map_err(|e| format!("running dig: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.trim().parse().ok()).ok_or_else(|| {
        format!("no answer (exit {}): {} {}", out.status, text.trim(), String::from_utf8_lossy(&out.stderr))
    })
}

/// A `dnsperf` run's totals, parsed from its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsperfReport {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
}

impl DnsperfReport {
    /// Parses the "Queries sent/completed/lost:" lines of dnsperf's report.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(name))
                .with_context(|| format!("dnsperf printed no {name:?} line:\n{text}"))?;
            let value = line.trim_start()[name.len()..].split_whitespace().next().unwrap_or_default();
            value.parse().with_context(|| format!("dnsperf's {name:?} line: {line}"))
        };
        Ok(Self {
            sent: field("Queries sent:")?,
            completed: field("Queries completed:")?,
            lost: field("Queries lost:")?,
        })
    }
}

/// `wrk`'s totals, parsed from its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WrkReport {
    pub requests: u64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    pub non_2xx: u64,
}

impl WrkReport {
    /// Parses "N requests in …", "Socket errors: connect A, read B, write C, timeout D" (printed only when
    /// there were some) and "Non-2xx or 3xx responses: N".
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let requests = text
            .lines()
            .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.parse().ok()))
            .with_context(|| format!("wrk printed no request count:\n{text}"))?;
        let socket_errors = text.lines().find_map(|l| l.trim().strip_prefix("Socket errors:")).map_or(0, |rest| {
            rest.split(',').filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok()).sum()
        });
        let non_2xx = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        Ok(Self { requests, socket_errors, non_2xx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsperf_report_is_read() {
        let text = "Statistics:\n\n  Queries sent:         20000\n  Queries completed:    19990 (99.95%)\n  Queries lost:         10 (0.05%)\n";
        assert_eq!(DnsperfReport::parse(text).unwrap(), DnsperfReport { sent: 20000, completed: 19990, lost: 10 });
        assert!(DnsperfReport::parse("garbage").is_err());
    }

    #[test]
    fn wrk_report_is_read() {
        let clean = "  1234 requests in 3.00s, 200.00KB read\nRequests/sec:    411.33\n";
        assert_eq!(WrkReport::parse(clean).unwrap(), WrkReport { requests: 1234, socket_errors: 0, non_2xx: 0 });
        let bad = "  99 requests in 3.00s, 2KB read\n  Socket errors: connect 1, read 2, write 0, timeout 4\n  Non-2xx or 3xx responses: 3\n";
        assert_eq!(WrkReport::parse(bad).unwrap(), WrkReport { requests: 99, socket_errors: 7, non_2xx: 3 });
    }
}
