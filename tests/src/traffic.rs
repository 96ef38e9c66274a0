//! Sustained traffic for tests that restart or upgrade agents under load: new TCP connections back to
//! back, one thread per client, each bounded in time and count, counting what was answered and what failed.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{echo::tcp_request_here, netns::spawn_in_netns};

/// How long, how many and how fast each client's loop goes.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// The loop stops by itself after this long…
    pub at_most: Duration,
    /// …or this many requests.
    pub requests: usize,
    /// Between requests (zero: back to back).
    pub pause: Duration,
    /// Per request.
    pub timeout: Duration,
}

/// Loops of new connections running in the background; [`RequestLoops::finish`] stops them.
pub struct RequestLoops {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl RequestLoops {
    /// One loop per (namespace, target). A failed request is printed with when it started.
    pub fn start(clients: &[(String, SocketAddrV4)], bounds: Bounds) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut threads = Vec::new();
        for (ns, target) in clients {
            let (stop, ok, failed, target) = (stop.clone(), ok.clone(), failed.clone(), *target);
            threads.push(spawn_in_netns(ns, move || {
                let deadline = Instant::now() + bounds.at_most;
                for _ in 0..bounds.requests {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let started = std::time::SystemTime::now();
                    match tcp_request_here(target, bounds.timeout) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("request to {target} started at {started:?} failed: {e:#}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(bounds.pause);
                }
            })?);
        }
        Ok(Self { stop, ok, failed, threads })
    }

    /// Requests answered so far.
    #[must_use]
    pub fn answered(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops every loop and waits for it: (answered, failed).
    #[must_use]
    pub fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}
