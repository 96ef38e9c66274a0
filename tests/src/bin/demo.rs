//! The README's demo: a small cluster in network namespaces, Services served through the eBPF dataplane.

use std::{net::SocketAddrV4, time::Duration};

use proxy_lab::{
    Lab, LabSpec,
    echo::{Proto, requests},
    lab::node_name,
    manifests::{Endpoint, Port, service_with_endpoints},
};

fn main() -> anyhow::Result<()> {
    println!("Building a 2-node cluster in network namespaces (nodes 10.240.0.0/24, pods 10.200.N.0/24)...");
    let mut lab = Lab::start(LabSpec::default())?;

    let dns_ports = [
        Port { name: "dns", port: 53, protocol: "UDP", target_port: 5353 },
        Port { name: "dns-tcp", port: 53, protocol: "TCP", target_port: 5353 },
    ];
    let web_ports = [Port { name: "http", port: 80, protocol: "TCP", target_port: 8080 }];
    let dns_pods = [(1, 3), (2, 3)];
    let web_pods = [(1, 2), (2, 2), (2, 3)];
    for &(n, k) in &dns_pods {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[5353], &[5353])?;
    }
    for &(n, k) in &web_pods {
        let pod = lab.pod(n, k).clone();
        lab.serve(&pod, &[8080], &[])?;
    }
    let endpoints = |pods: &[(usize, usize)]| -> Vec<Endpoint> {
        pods.iter().map(|&(n, k)| Endpoint::ready(lab.pod(n, k).ip, node_name(n))).collect()
    };
    let dns_vip = "10.32.0.10".parse()?;
    let web_vip = "10.32.0.20".parse()?;
    lab.write_manifest(
        "kube-dns.yaml",
        &service_with_endpoints("kube-system", "kube-dns", dns_vip, &dns_ports, &endpoints(&dns_pods)),
    )?;
    lab.write_manifest(
        "web.yaml",
        &service_with_endpoints("default", "web", web_vip, &web_ports, &endpoints(&web_pods)),
    )?;
    println!("Services: kube-system/kube-dns {dns_vip}:53 (UDP+TCP, 2 pods), default/web {web_vip}:80 (TCP, 3 pods)");

    println!("Starting one proxy-agent per node (manifest source, eBPF dataplane)...");
    lab.start_agents()?;

    let clients = [lab.pod(1, 1).clone(), lab.pod(2, 1).clone()];
    let targets = [
        (Proto::Udp, SocketAddrV4::new(dns_vip, 53), "dns udp"),
        (Proto::Tcp, SocketAddrV4::new(dns_vip, 53), "dns tcp"),
        (Proto::Tcp, SocketAddrV4::new(web_vip, 80), "web"),
    ];
    println!();
    println!("{:<10} {:<12} {:<22} {:<10} backend saw client as", "client", "", "service", "backend");
    let mut failures = 0;
    for client in &clients {
        for (proto, target, label) in targets {
            for reply in requests(&client.ns, proto, target, 4, Duration::from_secs(2))? {
                match reply {
                    Ok(r) => println!(
                        "{:<10} {:<12} {:<22} {:<10} {}",
                        client.name,
                        label,
                        format!("{target}/{proto:?}"),
                        r.backend,
                        r.seen_source
                    ),
                    Err(e) => {
                        failures += 1;
                        println!(
                            "{:<10} {:<12} {:<22} FAILED: {e:#}",
                            client.name,
                            label,
                            format!("{target}/{proto:?}")
                        );
                    }
                }
            }
        }
    }
    println!();
    drop(lab);
    println!("Lab torn down.");
    if failures > 0 {
        anyhow::bail!("{failures} requests failed");
    }
    Ok(())
}
