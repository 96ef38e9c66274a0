#!/usr/bin/env bash
# Builds deploy/Containerfile into a local image with podman, without any image registry: the base image is
# made here from Debian's packages (debootstrap, then `podman import`), and the agent is the binary given,
# built outside (AGENT=prebuilt; the Containerfile's compile stage needs a Rust image from a registry).
#   scripts/build-image.sh BINARY [TAG]        (TAG defaults to localhost/proxy-agent:test)
# The Debian archive is the one this machine's apt uses. The base is built once and kept (podman's store;
# the debootstrap tarball under target/image/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="${1:?usage: $0 BINARY [TAG]}"
tag="${2:-localhost/proxy-agent:test}"
base="localhost/proxy-agent-base:bookworm"
cache="$root/target/image"
# crun cannot start containers on a hybrid cgroup hierarchy; runc can.
runtime=(); if command -v runc >/dev/null; then runtime=(--runtime runc); fi

# The first Debian archive apt knows (deb822 sources, else sources.list).
mirror() {
    local uri
    uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
    [ -n "$uri" ] || uri="$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)"
    [ -n "$uri" ] || { echo "build-image: no Debian archive in apt's sources" >&2; exit 1; }
    echo "$uri"
}

if ! podman image exists "$base"; then
    if [ ! -s "$cache/rootfs.tar" ]; then
        rm -rf "$cache/rootfs"
        mkdir -p "$cache"
        archive="$(mirror)"
        echo "build-image: debootstrap bookworm (minbase) from $archive" >&2
        debootstrap --variant=minbase bookworm "$cache/rootfs" "$archive" >"$cache/debootstrap.log" 2>&1 \
            || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
        tar -C "$cache/rootfs" -cf "$cache/rootfs.tar.part" .
        mv "$cache/rootfs.tar.part" "$cache/rootfs.tar"
        rm -rf "$cache/rootfs"
    fi
    podman import "$cache/rootfs.tar" "$base" >/dev/null
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/proxy-agent"
# The build's RUN steps reach Debian's archive through the host's network (no bridge is created).
podman "${runtime[@]}" build --quiet --network host \
    --build-arg "BASE_IMAGE=$base" --build-arg AGENT=prebuilt \
    -f "$root/deploy/Containerfile" -t "$tag" "$context" >/dev/null
echo "$tag"
