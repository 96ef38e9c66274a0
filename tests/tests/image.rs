//! The image, for real: `deploy/Containerfile` built with podman from locally made Debian base images
//! (`scripts/build-image.sh`), and the agent run from it in a lab node's network namespace with exactly the
//! DaemonSet's capabilities, security settings, arguments and mounts (`proxy_lab::image`). The smoke test:
//! a pod reaches a ClusterIP's endpoints on both nodes, an external client a NodePort, the node itself the
//! ClusterIP (through the socket programs, attached to the mounted cgroup).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Outcome, Proto, request},
    image::{self, AgentContainer},
    lab::{PodNetwork, node_ip, node_name},
    manifests::{Endpoint, Port, Svc},
};

const TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn the_agent_runs_from_its_image_as_the_daemonset_runs_it() {
    if image::engine().is_none() {
        // scripts/setup.sh installs podman; a machine without it cannot run this test.
        eprintln!("SKIPPED: no container engine (podman) here; scripts/setup.sh installs one");
        return;
    }
    let binary = proxy_lab::agent::binary().expect("the agent binary to put in the image");
    let tag = image::build(&binary).expect("building the image");

    // A bridge lab: the DaemonSet passes no --pod-interfaces, so the defaults must find the pods.
    let mut lab = Lab::start(LabSpec { pod_network: PodNetwork::Bridge, ..LabSpec::default() }).expect("lab");
    for (n, k) in [(1, 2), (2, 2)] {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[]).unwrap();
    }
    let vip = Ipv4Addr::new(10, 32, 0, 140);
    let mut svc = Svc::new("imaged", vip, vec![Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }]);
    svc.type_ = "NodePort";
    svc.node_ports = vec![30140];
    let endpoints =
        vec![Endpoint::ready(lab.pod(1, 2).ip, node_name(1)), Endpoint::ready(lab.pod(2, 2).ip, node_name(2))];
    lab.write_manifest("svc.yaml", &svc.with_endpoints(&endpoints)).unwrap();

    // The lab has no API server: the agent reads the same objects from the mounted manifest directory.
    let agent = AgentContainer::start(&lab, 1, &tag, &["--manifests=/lab-manifests", "--manifest-poll-interval=100ms"])
        .expect("starting the agent container");
    agent.wait_for_log("service table applied", Duration::from_secs(30)).unwrap();
    let log = agent.log();
    assert!(log.contains("dataplane started mode=\"ebpf\""), "the DaemonSet's config selects eBPF:\n{log}");
    assert!(log.contains("config file loaded"), "the ConfigMap's file is read:\n{log}");
    assert!(lab.pin_dir(1).join("proxy-agent").is_dir(), "the maps are pinned under the DaemonSet's --bpffs");

    let pod_ns = lab.pod(1, 1).ns.clone();
    let seen: BTreeSet<String> = (0..20)
        .map(|_| request(&pod_ns, Proto::Tcp, SocketAddrV4::new(vip, 80), TIMEOUT).expect("pod → ClusterIP").backend)
        .collect();
    assert_eq!(seen, BTreeSet::from(["pod-1-2".to_owned(), "pod-2-2".to_owned()]), "both endpoints");
    let r = request(&lab.external_ns(), Proto::Tcp, SocketAddrV4::new(node_ip(1), 30140), TIMEOUT).unwrap();
    assert!(["pod-1-2", "pod-2-2"].contains(&r.backend.as_str()), "external → NodePort: {r:?}");
    let client = Path::new(env!("CARGO_BIN_EXE_lab-client"));
    match lab.request_from_node(1, client, Proto::Tcp, SocketAddrV4::new(vip, 80)).unwrap() {
        Outcome::Answered(r) => assert!(r.backend.starts_with("pod-"), "{r:?}"),
        other => panic!("the node's own connection to the ClusterIP: {other:?}\n{}", agent.log()),
    }
    lab.assert_no_leaks();
}
