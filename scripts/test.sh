#!/usr/bin/env bash
# The whole test suite: installs what is missing, then formatting, clippy, unit tests and the lab tests
# (real packets through the eBPF dataplane in network namespaces). Needs root.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cd "$root"
exec cargo xtask test "$@"
