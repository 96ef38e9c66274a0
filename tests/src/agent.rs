//! Running the real `proxy-agent` binary inside a node namespace.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The agent binary: `PROXY_AGENT_BIN` if set, otherwise built now.
pub fn binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    crate::build::artifact(
        &BIN,
        "PROXY_AGENT_BIN",
        &["build", "--quiet", "--package", "proxy-agent"],
        "debug/proxy-agent",
    )
}

/// What an agent is started with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub netns: String,
    pub manifests: PathBuf,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    /// `--pod-interfaces`; `None`: the agent's defaults, which must match the lab's pod network.
    pub pod_interfaces: Option<String>,
    /// Only these capabilities (`setpriv` names), when set.
    pub capabilities: Option<Vec<String>>,
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Watch this API server (a kubeconfig) instead of reading `manifests`.
    pub kubeconfig: Option<PathBuf>,
    /// Another agent binary than [`binary`]'s (an older build, for upgrade tests).
    pub binary: Option<PathBuf>,
}

/// A running agent; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    config: AgentConfig,
}

impl Agent {
    pub fn spawn(config: AgentConfig) -> anyhow::Result<Self> {
        let bin = match &config.binary {
            Some(b) => b.clone(),
            None => binary()?,
        };
        let log = File::create(&config.log).with_context(|| format!("creating {}", config.log.display()))?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &config.netns]);
        if let Some(caps) = &config.capabilities {
            // Root keeps its uid but its bounding set shrinks to `caps`, so the agent gets exactly those.
            let set: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
            command.args(["setpriv", &format!("--bounding-set=-all,{}", set.join(",")), "--inh-caps=-all", "--"]);
        }
        command.arg(&bin);
        if let Some(kubeconfig) = &config.kubeconfig {
            command.arg("--kubeconfig").arg(kubeconfig);
        } else {
            command.arg("--manifests").arg(&config.manifests).args(["--manifest-poll-interval", "100ms"]);
        }
        let child = command
            .args(["--min-sync-period", "50ms", "--sync-period", "30s"])
            .args(["--hostname-override", &config.node_name])
            .arg("--bpffs")
            .arg(&config.pin_dir)
            .args(config.pod_interfaces.iter().flat_map(|p| ["--pod-interfaces", p.as_str()]))
            .args(&config.extra_args)
            .env("RUST_LOG", "info")
            .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} in {}", bin.display(), config.netns))?;
        Ok(Self { child: Some(child), config })
    }

    /// The agent's process id (`ip netns exec` and `setpriv` exec into it, so it is the child's).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.config.log).unwrap_or_default()
    }

    /// How many times `needle` occurs in the log so far.
    #[must_use]
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until `needle` has occurred more than `seen` times, or fails with the log if the agent exits or
    /// `timeout` passes.
    pub fn wait_for_log(&mut self, needle: &str, seen: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count_in_log(needle) > seen {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "agent on {} exited ({status}) before logging {needle:?}:\n{}",
                    self.config.node_name,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!("agent on {} did not log {needle:?} within {timeout:?}:\n{}", self.config.node_name, self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[must_use]
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Kills the agent at once (SIGKILL), as an OOM kill or a node problem would; nothing is cleaned up.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the agent: SIGTERM, and SIGKILL if it has not exited within two seconds.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
