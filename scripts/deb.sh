#!/usr/bin/env bash
# Builds the Debian package of MOSIX: what scripts/install.sh installs, with prefix /usr.
#
#   bash scripts/deb.sh [--out DIR] [--bin-dir DIR]
#   dpkg -i DIR/mosix_VERSION_ARCH.deb        # then: systemctl enable --now mosixd
#   dpkg -r mosix    (or --purge: also what the package made in /etc/mosix)
#
# postinst creates /etc/mosix with the example mosix.toml and a fresh cluster secret
# (mode 0600) when there are none, never replacing existing ones; what it created is
# removed on purge. Prints the path of the .deb.
#   --out DIR       where the .deb goes (default target/deb)
#   --bin-dir DIR   take mosix and mosixd from DIR instead of building them
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/deb
bin_args=()
die() { echo "deb.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
        --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; bin_args=(--bin-dir "$2"); shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian's dpkg package)"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || die "no version in Cargo.toml"
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"
# Stage the files (dpkg keeps the list: no manifest); /etc/mosix is postinst's business.
bash scripts/install.sh --prefix /usr --destdir "$stage" --no-config "${bin_args[@]}" >/dev/null
rm -rf "$stage/usr/share/mosix"
mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
# Depends: the shared libraries the programs link to, with the versions their symbols
# need (dpkg-shlibdeps, from Debian's dpkg-dev; it wants a debian/control to read).
command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps not found (Debian's dpkg-dev package)"
shl=$(mktemp -d)
mkdir "$shl/debian"
printf 'Source: mosix\n\nPackage: mosix\nArchitecture: any\n' > "$shl/debian/control"
mapfile -t progs < <(find "$stage" -type f -perm -u+x ! -path "*/DEBIAN/*" -exec sh -c 'head -c4 "$1" | grep -q ELF' _ {} \; -print)
depends=$(cd "$shl" && dpkg-shlibdeps -O "${progs[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
rm -rf "$shl"
[ -n "$depends" ] || die "dpkg-shlibdeps found no dependencies for ${progs[*]}"
cat > "$stage/DEBIAN/control" <<CTL
Package: mosix
Version: $version
Architecture: $arch
Maintainer: MOSIX for Linux <root@localhost>
Installed-Size: $size
Depends: $depends
Recommends: fuse3
Section: admin
Priority: optional
Description: cluster of Linux machines that behaves like one computer
 MOSIX for today's Linux: processes started with mosrun move, while they run,
 to the node of the cluster where they finish soonest, and keep their home
 node's PID, stdio, signals and exit status. Includes mosixd (the node
 daemon, with a systemd unit), mosix and the MOSIX commands mosrun, migrate,
 mon and mosctl, man pages and shell completions.
CTL
cat > "$stage/DEBIAN/postinst" <<'SH'
#!/bin/sh
# Creates /etc/mosix, an example mosix.toml and a cluster secret when there are none.
set -e
if [ "$1" = configure ]; then
    created=/var/lib/mosix-package/created
    mkdir -p /var/lib/mosix-package
    if [ ! -d /etc/mosix ]; then
        mkdir -m 755 /etc/mosix
        echo /etc/mosix >> "$created"
    fi
    if [ ! -e /etc/mosix/mosix.toml ]; then
        cp /usr/share/doc/mosix/mosix.toml.example /etc/mosix/mosix.toml
        chmod 644 /etc/mosix/mosix.toml
        echo /etc/mosix/mosix.toml >> "$created"
    fi
    if [ ! -e /etc/mosix/secret ]; then
        (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/mosix/secret)
        echo /etc/mosix/secret >> "$created"
        echo "mosix: made a new cluster secret /etc/mosix/secret: copy the same file to every node"
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
    echo "mosix: edit /etc/mosix/mosix.toml (node, [[map]]), then: systemctl enable --now mosixd"
fi
exit 0
SH
cat > "$stage/DEBIAN/prerm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now mosixd >/dev/null 2>&1 || true
fi
exit 0
SH
cat > "$stage/DEBIAN/postrm" <<'SH'
#!/bin/sh
# On purge: removes what postinst created (the files first, then the directory if empty).
set -e
created=/var/lib/mosix-package/created
if [ "$1" = purge ] && [ -f "$created" ]; then
    for f in $(grep -v '^/etc/mosix$' "$created"); do rm -f "$f"; done
    if grep -qx /etc/mosix "$created"; then rmdir /etc/mosix 2>/dev/null || true; fi
    rm -rf /var/lib/mosix-package
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
SH
chmod 755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/mosix_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
