//! Helpers shared by tests.

/// Resident memory of this process, MiB: for the measurements run by hand.
#[must_use]
pub fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// A network namespace of the test's own, removed on drop (also on panic).
pub struct Netns(String);

impl Netns {
    /// Creates `pa-ROLE-PID` (a leftover of the same name is removed first). Needs root.
    #[must_use]
    pub fn new(role: &str) -> Self {
        let name = format!("pa-{role}-{}", std::process::id());
        let _ = std::process::Command::new("ip").args(["netns", "del", &name]).output();
        let out = std::process::Command::new("ip").args(["netns", "add", &name]).output().expect("ip");
        assert!(out.status.success(), "this test needs root: {}", String::from_utf8_lossy(&out.stderr));
        Self(name)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs a command inside the namespace; panics if it fails. Returns its standard output.
    #[must_use]
    pub fn exec(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ip").args(["netns", "exec", &self.0]).args(args).output().expect("ip");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Runs `work` on a thread that has joined the namespace (sockets it opens live there).
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("the namespace");
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                work()
            })
            .join()
            .expect("the thread in the namespace")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
