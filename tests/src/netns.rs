//! Entering a network namespace from a thread, so sockets are made inside it.

use std::{fs::File, thread};

use anyhow::Context as _;
use nix::sched::{CloneFlags, setns};

/// Runs `work` on a new thread that has joined network namespace `ns`, and returns its result.
///
/// Only that thread changes namespace; sockets it creates stay in `ns` for their whole life.
pub fn in_netns<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let handle = spawn_in_netns(ns, work)?;
    handle.join().map_err(|_| anyhow::anyhow!("thread in netns panicked"))
}

/// Like [`in_netns`], without waiting.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<thread::JoinHandle<T>> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    Ok(thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the lab namespace");
        work()
    }))
}
