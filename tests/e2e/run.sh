#!/usr/bin/env bash
# End-to-end: a kind cluster created without kube-proxy, this project's agent installed in its place from
# deploy/, and real traffic: a ClusterIP from a pod, CoreDNS lookups, a NodePort from the host, the
# client's source kept under externalTrafficPolicy Local, and a rolling restart of the backends plus an
# upgrade of the agent's DaemonSet under sustained traffic with no failed request.
#
# Needs kind, kubectl, and docker or podman (with access to the images' registries). `cargo xtask e2e` runs
# it. Settings: E2E_MODE=ebpf|nftables|iptables (default ebpf), E2E_ENGINE=docker|podman (default: the one
# found), E2E_KEEP=1 keeps the cluster afterwards. Traffic goes only to the cluster's own nodes and pods.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="$root/tests/e2e"
cluster=proxy-e2e
context="kind-$cluster"
image=localhost/proxy-agent:e2e
upgrade_image=localhost/proxy-agent:e2e-upgrade
mode=${E2E_MODE:-ebpf}

log() { printf '\033[1m[e2e]\033[0m %s\n' "$*" >&2; }

case "$mode" in
    ebpf) overlay=kind ;;
    nftables | iptables) overlay="kind-$mode" ;;
    *)
        echo "e2e: E2E_MODE must be ebpf, nftables or iptables, not '$mode'" >&2
        exit 2
        ;;
esac

engine=${E2E_ENGINE:-}
if [ -z "$engine" ]; then
    if command -v docker >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    fi
fi
missing=()
for tool in kind kubectl "${engine:-docker}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "e2e: needs kind, kubectl and docker or podman; missing: ${missing[*]}" >&2
    exit 2
fi
if [ "$engine" = podman ]; then
    export KIND_EXPERIMENTAL_PROVIDER=podman
fi

work=$(mktemp -d)
results=()
failures=0
check() { # check NAME OK(0|1) DETAIL
    if [ "$2" = 0 ]; then
        results+=("PASS  $1: $3")
    else
        results+=("FAIL  $1: $3")
        failures=$((failures + 1))
    fi
    log "${results[-1]}"
}

finish() {
    local status=$?
    printf '\n=== end-to-end summary (mode %s, %s) ===\n' "$mode" "$engine"
    if [ ${#results[@]} -eq 0 ]; then
        echo "no check ran (set-up failed; see the log above)"
    else
        printf '%s\n' "${results[@]}"
    fi
    printf '%d passed, %d failed\n' "$((${#results[@]} - failures))" "$failures"
    rm -rf "$work"
    if [ "${E2E_KEEP:-0}" = 1 ]; then
        log "keeping the cluster: kind delete cluster --name $cluster"
    else
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    fi
    if [ "$status" -eq 0 ] && [ "$failures" -gt 0 ]; then
        status=1
    fi
    exit "$status"
}
trap finish EXIT

kc() { kubectl --context "$context" "$@"; }

# --- the cluster, the image, the install ---------------------------------------------------------------
kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
log "creating kind cluster $cluster without kube-proxy"
kind create cluster --name "$cluster" --config "$here/kind-config.yaml"

log "building the image with $engine"
"$engine" build -f "$root/deploy/Containerfile" -t "$image" "$root"
# The upgrade is a different image (a label changes its id) of the same code, as a release would be.
"$engine" build -f "$root/deploy/Containerfile" -t "$upgrade_image" --label proxy-agent.e2e=upgrade "$root"
for img in "$image" "$upgrade_image"; do
    if [ "$engine" = podman ]; then
        archive=$(mktemp)
        podman save "$img" -o "$archive"
        kind load image-archive "$archive" --name "$cluster"
        rm -f "$archive"
    else
        kind load docker-image "$img" --name "$cluster"
    fi
done

log "installing deploy/overlays/$overlay"
kc apply -k "$root/deploy/overlays/$overlay"
kc -n kube-system rollout status ds/proxy-agent --timeout=180s
kc wait --for=condition=Ready nodes --all --timeout=180s
# CoreDNS reaches the API server through the `kubernetes` ClusterIP: it becomes ready only if we work.
kc -n kube-system rollout status deploy/coredns --timeout=180s

log "starting the workloads"
kc apply -f "$here/workloads.yaml"
kc rollout status deploy/echo --timeout=180s
kc wait --for=condition=Ready pod/client --timeout=180s

node_ip() { kc get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'; }
in_client() { kc exec client -- "$@"; }
echo_ip=$(kc get svc echo -o jsonpath='{.spec.clusterIP}')
control_plane_ip=$(node_ip "$cluster-control-plane")

# --- a ClusterIP from a pod ------------------------------------------------------------------------------
answer=$(in_client curl -fsS --max-time 5 "http://$echo_ip:8080/hostname" 2>&1) && ok=0 || ok=1
[[ "$answer" == echo-* ]] || ok=1
check "ClusterIP from a pod" "$ok" "http://$echo_ip:8080 answered by '$answer'"

# --- CoreDNS ---------------------------------------------------------------------------------------------
answer=$(in_client nslookup echo.default.svc.cluster.local 2>&1) && ok=0 || ok=1
grep -q "$echo_ip" <<<"$answer" || ok=1
check "CoreDNS resolves a Service" "$ok" "echo.default.svc.cluster.local -> $(grep -o "$echo_ip" <<<"$answer" | head -1)"
answer=$(in_client curl -fsS --max-time 5 http://echo:8080/hostname 2>&1) && ok=0 || ok=1
[[ "$answer" == echo-* ]] || ok=1
check "a Service by name (DNS, then ClusterIP)" "$ok" "http://echo:8080 answered by '$answer'"

# --- a NodePort from the host ----------------------------------------------------------------------------
# The host reaches the nodes directly where the engine runs natively (Linux, rootful); elsewhere the request
# is sent from the control-plane node, which is outside every pod network too.
from_host() { curl -fsS --max-time 5 "$@"; }
client_ip=
if from_host -o /dev/null "http://$control_plane_ip:30080/hostname" 2>/dev/null; then
    sender=host
    client_ip=$(ip -4 route get "$control_plane_ip" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
else
    sender="node $cluster-control-plane"
    from_host() { "$engine" exec "$cluster-control-plane" curl -fsS --max-time 5 "$@"; }
    client_ip=$control_plane_ip
fi
worker=$(kc get pods -l app=echo -o jsonpath='{.items[0].spec.nodeName}')
worker_ip=$(node_ip "$worker")
answer=$(from_host "http://$worker_ip:30080/hostname" 2>&1) && ok=0 || ok=1
[[ "$answer" == echo-* ]] || ok=1
check "NodePort from the $sender" "$ok" "http://$worker_ip:30080 answered by '$answer'"

# --- externalTrafficPolicy Local keeps the client's address ----------------------------------------------
seen=$(from_host "http://$worker_ip:30081/clientip" 2>&1) && ok=0 || ok=1
seen_ip=${seen%:*}
if [ -z "$client_ip" ] || [ "$seen_ip" != "$client_ip" ]; then ok=1; fi
check "externalTrafficPolicy Local keeps the source" "$ok" "the backend saw $seen_ip, the client is $client_ip"
# For contrast, policy Cluster is SNATed to the node: its backend sees the node's address, not the client's.
seen=$(from_host "http://$worker_ip:30080/clientip" 2>&1) && ok=0 || ok=1
seen_ip=${seen%:*}
[ "$seen_ip" != "$client_ip" ] || ok=1
check "externalTrafficPolicy Cluster is SNATed" "$ok" "the backend saw $seen_ip, the client is $client_ip"

# --- rolling restart and agent upgrade under sustained traffic -------------------------------------------
# New connections back to back from a pod (ClusterIP by name) and from outside (NodePort) until told to stop,
# at most 240 s and 5000 requests each.
in_client rm -f /tmp/stop
# shellcheck disable=SC2016 # expanded by the pod's shell, not this one
in_client sh -c 'ok=0; failed=0; end=$(($(date +%s) + 240)); n=0
    while [ ! -e /tmp/stop ] && [ "$(date +%s)" -lt "$end" ] && [ "$n" -lt 5000 ]; do
        n=$((n + 1))
        if curl -fsS -o /dev/null --max-time 2 http://echo:8080/hostname; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
        sleep 0.05
    done
    echo "ok=$ok failed=$failed"' >"$work/pod-load.out" 2>&1 &
pod_load=$!
stop_file="$work/stop"
(
    ok=0 failed=0 n=0 end=$(($(date +%s) + 240))
    while [ ! -e "$stop_file" ] && [ "$(date +%s)" -lt "$end" ] && [ "$n" -lt 5000 ]; do
        n=$((n + 1))
        if from_host -o /dev/null "http://$worker_ip:30080/hostname" 2>/dev/null; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
        fi
        sleep 0.05
    done
    echo "ok=$ok failed=$failed"
) >"$work/ext-load.out" 2>&1 &
ext_load=$!
sleep 3

log "rolling restart of the backends"
kc rollout restart deploy/echo
kc rollout status deploy/echo --timeout=180s
log "upgrading the agent's DaemonSet to $upgrade_image"
kc -n kube-system set image ds/proxy-agent "proxy-agent=$upgrade_image" "mount-bpffs=$upgrade_image"
kc -n kube-system rollout status ds/proxy-agent --timeout=180s
sleep 5
in_client touch /tmp/stop
touch "$stop_file"
wait "$pod_load" "$ext_load" || true
for load in pod ext; do
    out=$(tail -n 1 "$work/$load-load.out")
    ok=1
    if [[ "$out" =~ ^ok=([0-9]+)\ failed=0$ ]] && [ "${BASH_REMATCH[1]}" -gt 0 ]; then ok=0; fi
    if [ "$load" = pod ]; then
        check "no failed ClusterIP request from a pod during restart and upgrade" "$ok" "$out"
    else
        check "no failed NodePort request from the $sender during restart and upgrade" "$ok" "$out"
    fi
done
