#!/usr/bin/env bash
# The demo: a two-node cluster in network namespaces, a DNS-like and a web Service, one real agent per node,
# and real requests whose answers show which backend pod served them. Tears everything down at the end.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cd "$root"
exec cargo xtask demo "$@"
