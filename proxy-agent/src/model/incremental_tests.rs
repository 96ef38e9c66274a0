//! The incremental model must always say what `desired` says about the same state. Random change sequences
//! over a small universe of names and addresses, so conflicts, rejections, shared backends, health ports
//! and node changes all come up often.

use std::{net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use proptest::prelude::*;
use serde_json::json;

use super::IncrementalModel;
use crate::{
    model::{NodeIdentity, NodePortAddresses, desired},
    store::{ClusterState, ObjectKey},
};

const NAMES: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 2] = ["x", "y"];

#[derive(Clone, Debug)]
enum Change {
    Service {
        ns: usize,
        name: usize,
        spec: ServiceSpec,
    },
    DeleteService {
        ns: usize,
        name: usize,
    },
    Slice {
        ns: usize,
        slice: usize,
        service: usize,
        spec: SliceSpec,
    },
    DeleteSlice {
        ns: usize,
        slice: usize,
    },
    Node {
        zone: Option<usize>,
        internal_ip: u8,
    },
    /// `ServiceCIDR` `c{name}` with `10.{second}.0.0/16` (or, with `bad`, a range that does not parse).
    ServiceCidr {
        name: usize,
        second: u8,
        bad: bool,
    },
    DeleteServiceCidr {
        name: usize,
    },
}

#[derive(Clone, Debug)]
struct ServiceSpec {
    cluster_ip: u8,
    type_: usize,
    local: bool,
    affinity: bool,
    ports: Vec<(usize, usize, u16)>,
    bad: bool,
}

#[derive(Clone, Debug)]
struct SliceSpec {
    endpoints: Vec<(u8, bool, bool, Option<usize>)>,
    port_names: Vec<usize>,
    bad: bool,
}

const PORT_NAMES: [&str; 2] = ["p", "q"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const TYPES: [&str; 3] = ["ClusterIP", "NodePort", "LoadBalancer"];
const ZONES: [&str; 2] = ["z1", "z2"];

fn service(ns: usize, name: usize, spec: &ServiceSpec) -> Service {
    let ports: Vec<_> = spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, (port_name, protocol, port))| {
            json!({"name": PORT_NAMES[*port_name], "port": port, "protocol": PROTOCOLS[*protocol],
                   "targetPort": 8000 + i, "nodePort": 30000 + port})
        })
        .collect();
    let cluster_ip = if spec.bad { "not-an-ip".to_owned() } else { format!("10.32.0.{}", spec.cluster_ip) };
    let mut object = json!({
        "metadata": {"name": NAMES[name], "namespace": NAMESPACES[ns]},
        "spec": {"clusterIP": cluster_ip, "type": TYPES[spec.type_], "ports": ports,
                 "externalTrafficPolicy": if spec.local { "Local" } else { "Cluster" },
                 "sessionAffinity": if spec.affinity { "ClientIP" } else { "None" }}
    });
    if spec.local && spec.type_ > 0 {
        object["spec"]["healthCheckNodePort"] = json!(32000);
    }
    if spec.type_ == 2 {
        object["status"] = json!({"loadBalancer": {"ingress": [{"ip": format!("192.0.2.{}", spec.cluster_ip)}]}});
    }
    serde_json::from_value(object).expect("generated Service deserializes")
}

fn slice(ns: usize, slice: usize, service: usize, spec: &SliceSpec) -> EndpointSlice {
    let endpoints: Vec<_> = spec
        .endpoints
        .iter()
        .map(|(addr, ready, local, zone)| {
            let address = if spec.bad { "10.200.0.x".to_owned() } else { format!("10.200.0.{addr}") };
            let mut e = json!({"addresses": [address], "conditions": {"ready": ready, "serving": true,
                               "terminating": !ready},
                               "nodeName": if *local { "node1" } else { "node2" }});
            if let Some(zone) = zone {
                e["hints"] = json!({"forZones": [{"name": ZONES[*zone]}]});
            }
            e
        })
        .collect();
    let ports: Vec<_> = spec
        .port_names
        .iter()
        .map(|p| json!({"name": PORT_NAMES[*p], "port": 9000 + p, "protocol": "TCP"}))
        .chain(spec.port_names.iter().map(|p| json!({"name": PORT_NAMES[*p], "port": 9100 + p, "protocol": "UDP"})))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{slice}"), "namespace": NAMESPACES[ns],
                     "labels": {"kubernetes.io/service-name": NAMES[service]}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("generated EndpointSlice deserializes")
}

fn node(zone: Option<usize>, internal_ip: u8) -> Node {
    let labels = zone.map_or_else(|| json!({}), |z| json!({"topology.kubernetes.io/zone": ZONES[z]}));
    serde_json::from_value(json!({
        "metadata": {"name": "node1", "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("172.18.0.{internal_ip}")}]}
    }))
    .expect("generated Node deserializes")
}

fn key(ns: usize, name: &str) -> ObjectKey {
    ObjectKey { namespace: NAMESPACES[ns].into(), name: name.into() }
}

fn apply(state: &mut ClusterState, change: &Change) {
    match change {
        Change::Service { ns, name, spec } => {
            state.services.insert(key(*ns, NAMES[*name]), Arc::new(service(*ns, *name, spec)));
        }
        Change::DeleteService { ns, name } => drop(state.services.remove(&key(*ns, NAMES[*name]))),
        Change::Slice { ns, slice: s, service, spec } => {
            state.endpoint_slices.insert(key(*ns, &format!("s{s}")), Arc::new(slice(*ns, *s, *service, spec)));
        }
        Change::DeleteSlice { ns, slice } => drop(state.endpoint_slices.remove(&key(*ns, &format!("s{slice}")))),
        Change::Node { zone, internal_ip } => {
            drop(state.nodes.insert("node1".into(), Arc::new(node(*zone, *internal_ip))));
        }
        Change::ServiceCidr { name, second, bad } => {
            let cidr = if *bad { "10.0.0.0/33".to_owned() } else { format!("10.{second}.0.0/16") };
            let obj =
                serde_json::from_value(json!({"metadata": {"name": format!("c{name}")}, "spec": {"cidrs": [cidr]}}))
                    .expect("a ServiceCIDR");
            drop(state.service_cidrs.insert(format!("c{name}"), Arc::new(obj)));
        }
        Change::DeleteServiceCidr { name } => drop(state.service_cidrs.remove(&format!("c{name}"))),
    }
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        1u8..4,
        0usize..3,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec((0usize..2, 0usize..3, 80u16..82), 1..3),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(cluster_ip, type_, local, affinity, ports, bad)| ServiceSpec {
            cluster_ip,
            type_,
            local,
            affinity,
            ports,
            bad,
        })
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    (
        prop::collection::vec((1u8..6, any::<bool>(), any::<bool>(), prop::option::of(0usize..2)), 0..4),
        prop::collection::vec(0usize..2, 1..3),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(endpoints, port_names, bad)| SliceSpec { endpoints, port_names, bad })
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0usize..2, 0usize..3, service_spec()).prop_map(|(ns, name, spec)| Change::Service { ns, name, spec }),
        1 => (0usize..2, 0usize..3).prop_map(|(ns, name)| Change::DeleteService { ns, name }),
        4 => (0usize..2, 0usize..4, 0usize..3, slice_spec())
            .prop_map(|(ns, slice, service, spec)| Change::Slice { ns, slice, service, spec }),
        1 => (0usize..2, 0usize..4).prop_map(|(ns, slice)| Change::DeleteSlice { ns, slice }),
        1 => (prop::option::of(0usize..2), 2u8..4).prop_map(|(zone, internal_ip)| Change::Node { zone, internal_ip }),
        1 => (0usize..2, 31u8..34, prop::bool::weighted(0.2))
            .prop_map(|(name, second, bad)| Change::ServiceCidr { name, second, bad }),
        1 => (0usize..2).prop_map(|name| Change::DeleteServiceCidr { name }),
    ]
}

fn identity(primary: bool) -> NodeIdentity {
    NodeIdentity {
        name: "node1".into(),
        addresses: vec![Ipv4Addr::new(172, 18, 0, 2).into(), Ipv4Addr::new(172, 18, 0, 3).into()],
        node_port_addresses: if primary { NodePortAddresses::Primary } else { NodePortAddresses::All },
        service_cidrs: vec![(Ipv4Addr::new(10, 32, 0, 0).into(), 16)],
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_update_gives_what_a_full_recomputation_gives(
        primary in any::<bool>(),
        changes in prop::collection::vec(prop::collection::vec(change(), 1..4), 1..25),
    ) {
        let node = identity(primary);
        let mut model = IncrementalModel::new(node.clone());
        let mut state = ClusterState::default();
        let mut before = desired(&state, &node);
        for batch in &changes {
            for change in batch {
                apply(&mut state, change);
            }
            let changed = model.update(&Arc::new(state.clone()));
            let mut expected = desired(&state, &node);
            expected.rejected.sort();
            prop_assert_eq!(model.table(), &expected.table);
            prop_assert_eq!(model.health_checks(), &expected.health_checks);
            prop_assert_eq!(model.rejected(), expected.rejected.clone());
            prop_assert_eq!(model.distinct_backends(), expected.table.distinct_backends());
            // Every frontend whose entry differs must be reported (more is allowed, fewer is a lost write).
            let all: std::collections::BTreeSet<_> =
                before.table.frontends.keys().chain(expected.table.frontends.keys()).copied().collect();
            for frontend in all {
                if before.table.frontends.get(&frontend) != expected.table.frontends.get(&frontend) {
                    prop_assert!(changed.contains(&frontend), "{frontend} changed but was not reported");
                }
            }
            before = expected;
        }
    }
}

#[test]
fn an_unrelated_change_recomputes_nothing_else() {
    let node = identity(false);
    let mut model = IncrementalModel::new(node);
    let mut state = ClusterState::default();
    let spec =
        ServiceSpec { cluster_ip: 1, type_: 0, local: false, affinity: false, ports: vec![(0, 0, 80)], bad: false };
    for name in 0..3 {
        let mut spec = spec.clone();
        spec.cluster_ip = u8::try_from(name + 1).unwrap();
        apply(&mut state, &Change::Service { ns: 0, name, spec });
    }
    assert_eq!(model.update(&Arc::new(state.clone())).len(), 3);
    let endpoints = SliceSpec { endpoints: vec![(1, true, true, None)], port_names: vec![0], bad: false };
    apply(&mut state, &Change::Slice { ns: 0, slice: 0, service: 1, spec: endpoints });
    let changed = model.update(&Arc::new(state.clone()));
    assert_eq!(changed.into_iter().map(|f| f.addr).collect::<Vec<_>>(), [Ipv4Addr::new(10, 32, 0, 2)]);
    assert!(model.update(&Arc::new(state)).is_empty(), "no change, nothing to write");
}

/// Not a test: where the time and memory of a large table go. `cargo test --release -p proxy-agent
/// model_at_scale -- --ignored --nocapture` (`PROXY_SCALE` Services, default 100000, 10 endpoints each).
#[test]
#[ignore = "a measurement, run by hand"]
fn model_at_scale() {
    let services: usize = std::env::var("PROXY_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let base = crate::testing::resident_mib();
    let mut state = ClusterState::default();
    for i in 0..services {
        let name = format!("svc-{i:06}");
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + u32::try_from(i).unwrap());
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
        let endpoints: Vec<_> = (0..10)
            .map(|k| {
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + u32::try_from(i * 16 + k).unwrap());
                json!({"addresses": [addr.to_string()], "conditions": {"ready": true}, "nodeName": "node2"})
            })
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-x"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints,
        }))
        .unwrap();
        state.services.insert(ObjectKey::of(&svc.metadata), Arc::new(svc));
        state.endpoint_slices.insert(ObjectKey::of(&slice.metadata), Arc::new(slice));
    }
    let objects = crate::testing::resident_mib();
    let mut model = IncrementalModel::new(identity(false));
    let state = Arc::new(state);
    let started = std::time::Instant::now();
    let changed = model.update(&state);
    let full = started.elapsed();
    let after_model = crate::testing::resident_mib();
    let mut next = (*state).clone();
    let key = ObjectKey { namespace: "default".into(), name: "svc-000007-x".into() };
    let mut slice = (*next.endpoint_slices[&key]).clone();
    slice.endpoints[0].addresses[0] = "10.65.0.1".into();
    next.endpoint_slices.insert(key, Arc::new(slice));
    let next = Arc::new(next);
    let started = std::time::Instant::now();
    let one = model.update(&next);
    let change = started.elapsed();
    let started = std::time::Instant::now();
    let rejected = model.rejected().len();
    let listing = started.elapsed();
    eprintln!(
        "{services} Services: objects {:.0} MiB; full update {full:?} ({} frontends), {:.0} MiB more; \
         one endpoint {change:?} ({} frontends); rejected() {listing:?} ({rejected})",
        objects - base,
        changed.len(),
        after_model - objects,
        one.len()
    );
    assert_eq!(one.len(), 1);
}
