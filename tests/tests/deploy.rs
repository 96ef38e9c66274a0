//! Offline checks of what users deploy (deploy/) and of the end-to-end test that installs it (tests/e2e/):
//! every manifest parses into the Kubernetes API's own types, every kustomize overlay renders and says
//! what it claims, the image recipe builds with the project's pinned versions, and the scripts pass
//! shellcheck and the recipe hadolint. The e2e test itself needs a container engine and kind, which this
//! machine lacks; these checks are what can be run everywhere.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Pod, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// One parsed Kubernetes object.
#[derive(Debug)]
enum Object {
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    ConfigMap(ConfigMap),
    Pod(Box<Pod>),
    Service(Box<Service>),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
}

/// Every document of a YAML stream as its typed object; an unknown kind or a field the type does not
/// accept fails with the document's place.
fn parse_all(text: &str, origin: &str) -> Vec<Object> {
    let mut out = Vec::new();
    let values: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"));
    for (i, value) in values.into_iter().enumerate() {
        let kind = value["kind"].as_str().unwrap_or_else(|| panic!("{origin} document {i} has no kind")).to_owned();
        let place = format!("{origin} document {i} ({kind})");
        let object = match kind.as_str() {
            "DaemonSet" => Object::DaemonSet(Box::new(typed(value, &place))),
            "Deployment" => Object::Deployment(Box::new(typed(value, &place))),
            "ConfigMap" => Object::ConfigMap(typed(value, &place)),
            "Pod" => Object::Pod(Box::new(typed(value, &place))),
            "Service" => Object::Service(Box::new(typed(value, &place))),
            "ServiceAccount" => Object::ServiceAccount(typed(value, &place)),
            "ClusterRole" => Object::ClusterRole(typed(value, &place)),
            "ClusterRoleBinding" => Object::ClusterRoleBinding(typed(value, &place)),
            other => panic!("{origin} document {i}: kind {other} is not one this check knows"),
        };
        out.push(object);
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value, place: &str) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("{place}: {e}"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Not Kubernetes API objects: kustomize's and kind's own configuration (checked by rendering and by kind).
fn is_tool_config(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "kustomization.yaml" || n == "kind-config.yaml")
}

#[test]
fn every_manifest_parses_into_the_kubernetes_types() {
    let mut count = 0;
    for dir in [root().join("deploy"), root().join("tests/e2e")] {
        for file in yaml_files(&dir).into_iter().filter(|f| !is_tool_config(f)) {
            let objects = parse_all(&std::fs::read_to_string(&file).unwrap(), &file.display().to_string());
            assert!(!objects.is_empty(), "{} holds no object", file.display());
            count += objects.len();
        }
    }
    // base: ServiceAccount, ClusterRole, ClusterRoleBinding, two ConfigMaps, DaemonSet; e2e: Deployment,
    // three Services, a Pod.
    assert_eq!(count, 11, "a manifest was added or lost");
}

/// The e2e workloads hang together: every Service selects the echo pods, on the port they serve, and the
/// NodePorts are the ones tests/e2e/run.sh sends to.
#[test]
fn the_e2e_services_select_the_echo_pods() {
    let objects = parse_all(&std::fs::read_to_string(root().join("tests/e2e/workloads.yaml")).unwrap(), "workloads");
    let deployment =
        objects.iter().find_map(|o| if let Object::Deployment(d) = o { Some(d) } else { None }).expect("echo");
    let template = &deployment.spec.as_ref().unwrap().template;
    let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let served: Vec<i32> =
        template.spec.as_ref().unwrap().containers[0].ports.iter().flatten().map(|p| p.container_port).collect();
    let script = std::fs::read_to_string(root().join("tests/e2e/run.sh")).unwrap();
    let mut node_ports = Vec::new();
    for svc in objects.iter().filter_map(|o| if let Object::Service(s) = o { Some(s) } else { None }) {
        let spec = svc.spec.as_ref().unwrap();
        for (k, v) in spec.selector.as_ref().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{:?} selects {k}={v}", svc.metadata.name);
        }
        for port in spec.ports.iter().flatten() {
            let target = match port.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) => p,
                _ => port.port,
            };
            assert!(served.contains(&target), "{:?} targets {target}, served: {served:?}", svc.metadata.name);
            node_ports.extend(port.node_port);
        }
    }
    node_ports.sort_unstable();
    assert_eq!(node_ports, [30080, 30081]);
    for port in node_ports {
        assert!(script.contains(&format!(":{port}/")), "run.sh never sends to NodePort {port}");
    }
    let client = objects.iter().find_map(|o| if let Object::Pod(p) = o { Some(p) } else { None }).unwrap();
    assert_eq!(client.metadata.name.as_deref(), Some("client"), "run.sh execs into pod/client");
}

fn kustomize(overlay: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(overlay)
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render the overlays ({e}); scripts/setup.sh installs it"));
    assert!(out.status.success(), "kubectl kustomize {}: {}", overlay.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The overlays this project ships.
const SHIPPED: [&str; 4] = ["api-server", "kind", "kind-iptables", "kind-nftables"];

#[test]
fn every_overlay_renders_and_configures_what_its_name_says() {
    let overlays = root().join("deploy/overlays");
    let mut names: Vec<String> =
        std::fs::read_dir(&overlays).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    // Users add overlays of their own beside these (deploy/README.md); those must render too.
    assert!(SHIPPED.iter().all(|s| names.iter().any(|n| n == s)), "{names:?}");
    for name in &names {
        let shipped = SHIPPED.contains(&name.as_str());
        let rendered = parse_all(&kustomize(&overlays.join(name)), name);
        assert_eq!(rendered.len(), 6, "{name}: {rendered:?}");
        let ds = rendered
            .iter()
            .find_map(|o| if let Object::DaemonSet(d) = o { Some(d) } else { None })
            .unwrap_or_else(|| panic!("{name}: no DaemonSet"));
        assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"), "{name}");
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let agent = pod.containers.iter().find(|c| c.name == "proxy-agent").unwrap();
        let args = agent.args.clone().unwrap_or_default();
        let mode = args.iter().find_map(|a| a.strip_prefix("--mode="));
        if shipped {
            assert_eq!(mode, name.strip_prefix("kind-"), "{name}: the mode flag");
        }
        let image = agent.image.as_deref().unwrap();
        assert!(!image.ends_with(":latest"), "{name}: the image must be pinned by the overlay: {image}");
        let init_image = pod.init_containers.as_ref().unwrap()[0].image.as_deref().unwrap();
        assert_eq!(init_image, image, "{name}: one image for both containers");
        let api = rendered
            .iter()
            .find_map(|o| match o {
                Object::ConfigMap(c) if c.metadata.name.as_deref() == Some("proxy-agent-api-server") => c.data.clone(),
                _ => None,
            })
            .unwrap();
        let host = &api["KUBERNETES_SERVICE_HOST"];
        assert!(!host.ends_with(".invalid"), "{name}: the overlay must set the API server address, not {host}");
        if name.starts_with("kind") {
            assert_eq!(host, "proxy-e2e-control-plane", "{name}: tests/e2e/run.sh names its cluster proxy-e2e");
        }
        check_rbac_references(&rendered, pod.service_account_name.as_deref(), name);
    }
}

/// The DaemonSet's ServiceAccount exists in its namespace and is bound to the ClusterRole that exists.
fn check_rbac_references(objects: &[Object], service_account: Option<&str>, name: &str) {
    let account = objects
        .iter()
        .find_map(|o| if let Object::ServiceAccount(a) = o { Some(a) } else { None })
        .unwrap_or_else(|| panic!("{name}: no ServiceAccount"));
    assert_eq!(account.metadata.name.as_deref(), service_account, "{name}: the DaemonSet's account");
    let role = objects.iter().find_map(|o| if let Object::ClusterRole(r) = o { Some(r) } else { None }).unwrap();
    let binding =
        objects.iter().find_map(|o| if let Object::ClusterRoleBinding(b) = o { Some(b) } else { None }).unwrap();
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref(), "{name}: the binding's role");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (Some(&subject.name), subject.namespace.as_ref()),
        (account.metadata.name.as_ref(), account.metadata.namespace.as_ref()),
        "{name}: the binding's subject"
    );
}

/// A pinned version from scripts/versions.env.
fn pinned(key: &str) -> String {
    let text = std::fs::read_to_string(root().join("scripts/versions.env")).unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("{key} missing")).to_owned()
}

#[test]
fn the_image_recipe_uses_the_pinned_toolchains() {
    let recipe = std::fs::read_to_string(root().join("deploy/Containerfile")).unwrap();
    assert!(
        recipe.contains(&format!("ARG BUILD_IMAGE=docker.io/library/rust:{}-bookworm", pinned("RUST_STABLE"))),
        "the build stage must use the pinned stable Rust"
    );
    for key in ["RUST_NIGHTLY", "LLVM_MAJOR", "BPF_LINKER_VERSION"] {
        assert!(recipe.contains(&format!("ARG {key}={}", pinned(key))), "ARG {key} must match scripts/versions.env");
    }
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignored.lines().any(|l| l == "target"), "the build context must not carry target/");
}

fn lint(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed ({e}); scripts/setup.sh installs it"));
    assert!(
        out.status.success(),
        "{program} {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scripts_pass_shellcheck() {
    let mut scripts: Vec<String> = std::fs::read_dir(root().join("scripts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    scripts.push("tests/e2e/run.sh".into());
    scripts.push(".ci/run".into());
    let mut args = vec!["-x"];
    args.extend(scripts.iter().map(String::as_str));
    lint("shellcheck", &args);
}

#[test]
fn the_image_recipe_passes_hadolint() {
    let cache = std::env::var("XDG_CACHE_HOME")
        .map_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"), PathBuf::from);
    let hadolint = cache.join("proxy-tools/bin/hadolint");
    lint(hadolint.to_str().unwrap(), &["--config", ".hadolint.yaml", "deploy/Containerfile"]);
}
