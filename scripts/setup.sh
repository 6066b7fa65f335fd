#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian machine (run as root).
# Idempotent: a second run only checks. Every setup step lives here, nowhere else.
set -euo pipefail

# Debian packages: compiler and C library (tests build C programs, one static, one with
# OpenMP: libgomp comes with gcc), interpreters and tools used by the tests, iproute2 for
# the testbed, tmux to test `mon`; for the multi-threaded programs of tests/threads.rs: Go,
# a JVM, numpy over OpenBLAS's threaded BLAS; man-db (`man -l` on the generated pages),
# fuse3 (fusermount3 for `mosix fs` run by a user; root mounts without it), binutils
# (strip, for install.sh), dpkg-deb and dpkg-shlibdeps (scripts/deb.sh).
PACKAGES=(gcc libc6-dev make python3 mawk iproute2 procps tmux util-linux pkg-config
    xz-utils gzip golang-go default-jre-headless python3-numpy libopenblas0-pthread
    man-db fuse3 binutils dpkg dpkg-dev)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rust toolchain: the machine's rustup toolchain; install it if absent.
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "setup: cargo not found; install Rust (rustup) first" >&2
        exit 1
    fi
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
