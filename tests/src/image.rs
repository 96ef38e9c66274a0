//! The agent from its image, run as the DaemonSet runs it: `deploy/Containerfile` built with podman
//! (`scripts/build-image.sh`, no registry needed), and a container in a lab node's network namespace with
//! exactly the DaemonSet's capabilities, security settings, arguments, environment and mounts, read from
//! `deploy/base/`. The DaemonSet's host paths stand for the node's: `/sys/fs/bpf` is a directory of the
//! lab's bpffs, `/sys/fs/cgroup` the node's cgroup.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec},
};

use crate::Lab;

/// The container engine, if one runs here.
#[must_use]
pub fn engine() -> Option<&'static str> {
    let ok = Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success());
    ok.then_some("podman")
}

/// `podman`, with the runtime that works on this host (crun cannot start containers on a hybrid cgroup
/// hierarchy; runc can).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    if Command::new("runc").arg("--version").output().is_ok_and(|o| o.status.success()) {
        cmd.args(["--runtime", "runc"]);
    }
    cmd
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the image around `binary` (`scripts/build-image.sh`); returns its tag.
pub fn build(binary: &Path) -> anyhow::Result<String> {
    let out = Command::new("bash")
        .arg(repo().join("scripts/build-image.sh"))
        .arg(binary)
        .output()
        .context("running scripts/build-image.sh")?;
    if !out.status.success() {
        bail!("scripts/build-image.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn daemonset_pod() -> anyhow::Result<PodSpec> {
    let text = std::fs::read_to_string(repo().join("deploy/base/daemonset.yaml"))?;
    let ds: DaemonSet = serde_saphyr::from_str(&text).context("deploy/base/daemonset.yaml")?;
    ds.spec.and_then(|s| s.template.spec).context("the DaemonSet has no pod spec")
}

/// The agent's ConfigMap (`deploy/base/configmap.yaml`'s first document).
fn config_map() -> anyhow::Result<ConfigMap> {
    let text = std::fs::read_to_string(repo().join("deploy/base/configmap.yaml"))?;
    let first = text.split("\n---").next().unwrap_or_default();
    serde_saphyr::from_str(first).context("deploy/base/configmap.yaml")
}

/// An agent container; removed on drop.
pub struct AgentContainer {
    name: String,
}

impl AgentContainer {
    /// Starts the DaemonSet's agent container from `image` for node `node` of `lab`, with `extra_args`
    /// after the DaemonSet's own (what the lab has instead of an API server).
    pub fn start(lab: &Lab, node: usize, image: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        let pod = daemonset_pod()?;
        let container: Container =
            pod.containers.into_iter().find(|c| c.name == "proxy-agent").context("no proxy-agent container")?;
        let name = format!("{}-agent{node}", lab.work_dir().file_name().and_then(|n| n.to_str()).unwrap_or("kpl"));
        let mut cmd = podman();
        cmd.args(["run", "--detach", "--name", &name]);
        // A container of a lab that died with its test run (same name, reused pid) goes first.
        let _ = podman().args(["rm", "--force", &name]).output();
        cmd.arg(format!("--network=ns:/run/netns/{}", lab.node_ns(node)));
        // Kubernetes sets no rlimits (the runtime's defaults apply); podman's defaults are higher than this
        // host's root may set (it lacks CAP_SYS_RESOURCE, and conmon runs with at most 32768 processes).
        for (flag, limit) in [
            ("nofile", nix::sys::resource::Resource::RLIMIT_NOFILE),
            ("nproc", nix::sys::resource::Resource::RLIMIT_NPROC),
        ] {
            let value = nix::sys::resource::getrlimit(limit)?.0.min(16_384);
            cmd.arg(format!("--ulimit={flag}={value}:{value}"));
        }
        // The DaemonSet sets no seccomp profile: the kubelet's default is Unconfined.
        cmd.arg("--security-opt=seccomp=unconfined");
        let security = container.security_context.clone().unwrap_or_default();
        if security.privileged == Some(true) {
            bail!("the agent container must not be privileged");
        }
        if security.allow_privilege_escalation == Some(false) {
            cmd.arg("--security-opt=no-new-privileges");
        }
        let caps = security.capabilities.unwrap_or_default();
        for cap in caps.drop.unwrap_or_default() {
            cmd.arg(format!("--cap-drop={cap}"));
        }
        for cap in caps.add.unwrap_or_default() {
            cmd.arg(format!("--cap-add={cap}"));
        }
        for env in container.env.unwrap_or_default() {
            let field = env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
            match (env.value, field) {
                (Some(value), _) => cmd.arg(format!("--env={}={value}", env.name)),
                (None, Some("spec.nodeName")) => cmd.arg(format!("--env={}={}", env.name, crate::lab::node_name(node))),
                // The API server's address: the lab's agents read manifests instead.
                _ => continue,
            };
        }
        let volumes = pod.volumes.unwrap_or_default();
        let config_dir = lab.work_dir().join(format!("container-config-{node}"));
        for mount in container.volume_mounts.unwrap_or_default() {
            let volume = volumes.iter().find(|v| v.name == mount.name).context("a mount without its volume")?;
            let source = if let Some(cm) = &volume.config_map {
                anyhow::ensure!(cm.name == "proxy-agent", "unknown ConfigMap {}", cm.name);
                std::fs::create_dir_all(&config_dir)?;
                for (file, text) in config_map()?.data.unwrap_or_default() {
                    std::fs::write(config_dir.join(file), text)?;
                }
                config_dir.clone()
            } else if let Some(host) = &volume.host_path {
                match host.path.as_str() {
                    "/sys/fs/bpf" => {
                        let dir = lab.pin_dir(node);
                        std::fs::create_dir_all(&dir)?;
                        dir
                    }
                    "/sys/fs/cgroup" => lab.node_cgroup(node),
                    // A node without loadable modules has no /lib/modules: an empty one stands for it.
                    other if host.type_.is_none() && !Path::new(other).exists() => {
                        let dir = lab.work_dir().join(format!("container-{}-{node}", volume.name));
                        std::fs::create_dir_all(&dir)?;
                        dir
                    }
                    other => PathBuf::from(other),
                }
            } else {
                bail!("volume {} is neither a ConfigMap nor a host path", volume.name);
            };
            if volume.host_path.as_ref().and_then(|h| h.type_.as_deref()) == Some("FileOrCreate") && !source.exists() {
                std::fs::File::create(&source)?;
            }
            let ro = if mount.read_only == Some(true) { ":ro" } else { "" };
            cmd.arg(format!("--volume={}:{}{ro}", source.display(), mount.mount_path));
        }
        cmd.arg(format!("--volume={}:/lab-manifests:ro", lab.manifest_dir().display()));
        cmd.arg(image);
        cmd.args(container.args.unwrap_or_default());
        cmd.args(extra_args);
        // From here on the container exists, started or not: dropping `this` removes it.
        let this = Self { name };
        let out = cmd.output().context("running podman")?;
        if !out.status.success() {
            bail!("podman run failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(this)
    }

    /// What the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }

    /// Waits until the log shows `needle`, or fails with the log.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the agent container did not log {needle:?} within {timeout:?}:\n{}", self.log())
    }
}

impl Drop for AgentContainer {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "--force", "--time", "5", &self.name]).output();
    }
}
