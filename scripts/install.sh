#!/usr/bin/env bash
# Builds MOSIX in release mode and installs it (run as root for the default prefix).
#
#   bash scripts/install.sh [--prefix DIR]      # default /usr/local
#   bash scripts/install.sh --uninstall [--prefix DIR]
#
# Installs, under PREFIX: bin/mosix and the MOSIX names bin/{mosrun,migrate,mon,mosctl}
# (links to mosix: it answers to its argv[0]), sbin/mosixd, man pages (man1, man8),
# completions for bash, zsh and fish, lib/systemd/system/mosixd.service, and under
# share/doc/mosix the docs, the example config and a Grafana dashboard. The example config
# also goes to SYSCONFDIR/mosix/mosix.toml unless one is there already (never overwritten).
# Every file installed is listed in PREFIX/share/mosix/installed-files, which --uninstall
# removes (configuration, secrets and keys under SYSCONFDIR/mosix stay).
#
# Options:
#   --prefix DIR      where to install (default /usr/local)
#   --sysconfdir DIR  where mosix/mosix.toml goes (default /etc for the prefixes /usr and
#                     /usr/local, else PREFIX/etc)
#   --destdir DIR     stage everything under DIR (for packages: scripts/deb.sh)
#   --bin-dir DIR     take mosix and mosixd from DIR instead of building them
#   --no-config       do not write SYSCONFDIR/mosix/mosix.toml (packages do it in postinst)
#   --no-strip        keep the debug information in the installed binaries
#   --uninstall       remove what an earlier install into PREFIX installed
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

prefix=/usr/local
sysconfdir=
destdir=
bindir_in=
uninstall=0
config=1
strip=1
die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --sysconfdir) [ $# -ge 2 ] || die "--sysconfdir needs a directory"; sysconfdir=$2; shift 2 ;;
        --sysconfdir=*) sysconfdir=${1#*=}; shift ;;
        --destdir) [ $# -ge 2 ] || die "--destdir needs a directory"; destdir=$2; shift 2 ;;
        --destdir=*) destdir=${1#*=}; shift ;;
        --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; bindir_in=$2; shift 2 ;;
        --bin-dir=*) bindir_in=${1#*=}; shift ;;
        --uninstall) uninstall=1; shift ;;
        --no-config) config=0; shift ;;
        --no-strip) strip=0; shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path, not '$prefix'" ;; esac
prefix=${prefix%/}
[ -n "$prefix" ] || prefix=/
if [ -z "$sysconfdir" ]; then
    case "$prefix" in /usr|/usr/local) sysconfdir=/etc ;; *) sysconfdir=$prefix/etc ;; esac
fi
ALIASES=(mosrun migrate mon mosctl)
manifest_rel=share/mosix/installed-files

if [ "$uninstall" = 1 ]; then
    m="$destdir$prefix/$manifest_rel"
    [ -f "$m" ] || die "nothing installed in $prefix by install.sh (no $m)"
    n=0
    while IFS= read -r f; do
        case "$f" in "$prefix"/*) ;; *) continue ;; esac   # only what is under PREFIX
        if [ -e "$destdir$f" ] || [ -L "$destdir$f" ]; then rm -f "$destdir$f"; n=$((n + 1)); fi
    done < "$m"
    rm -f "$m"
    # Directories of ours that are empty now.
    for d in share/mosix share/doc/mosix; do rmdir "$destdir$prefix/$d" 2>/dev/null || true; done
    echo "uninstalled $n files from $prefix (configuration in $sysconfdir/mosix kept)"
    exit 0
fi

if [ -n "$bindir_in" ]; then
    bins=$bindir_in
else
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first, or give --bin-dir"
    echo "install.sh: building (release)..." >&2
    cargo build --release --locked --quiet -p mosix -p mosixd
    bins=target/release
fi
for b in mosix mosixd; do [ -x "$bins/$b" ] || die "no $bins/$b (build first, or fix --bin-dir)"; done

root=$destdir$prefix
installed=()
put() { # put MODE SRC DEST(relative to prefix)
    install -D -m "$1" "$2" "$root/$3"
    installed+=("$prefix/$3")
}
link() { # link TARGET NAME(relative to prefix)
    mkdir -p "$(dirname "$root/$2")"
    ln -sfn "$1" "$root/$2"
    installed+=("$prefix/$2")
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for b in mosix mosixd; do
    cp "$bins/$b" "$tmp/$b"
    # The release profile keeps debug information (for backtraces while developing).
    if [ "$strip" = 1 ] && command -v strip >/dev/null; then strip --strip-debug "$tmp/$b"; fi
done
put 755 "$tmp/mosix" bin/mosix
for a in "${ALIASES[@]}"; do link mosix "bin/$a"; done
put 755 "$tmp/mosixd" sbin/mosixd

# Man pages, generated from the commands' own definitions (with their examples).
"$bins/mosix" __man-pages "$tmp/man1" >/dev/null
"$bins/mosixd" --man-page > "$tmp/mosixd.8"
for f in "$tmp"/man1/*.1; do
    gzip -9n < "$f" > "$f.gz"
    put 644 "$f.gz" "share/man/man1/$(basename "$f").gz"
done
gzip -9n < "$tmp/mosixd.8" > "$tmp/mosixd.8.gz"
put 644 "$tmp/mosixd.8.gz" share/man/man8/mosixd.8.gz

# Shell completions, for mosix, each MOSIX name, and mosixd.
for name in mosix "${ALIASES[@]}" mosixd; do
    for sh in bash zsh fish; do
        if [ "$name" = mosixd ]; then
            "$bins/mosixd" --completions "$sh" > "$tmp/c"
        else
            "$bins/mosix" completions "$sh" --name "$name" > "$tmp/c"
        fi
        case "$sh" in
            bash) put 644 "$tmp/c" "share/bash-completion/completions/$name" ;;
            zsh) put 644 "$tmp/c" "share/zsh/site-functions/_$name" ;;
            fish) put 644 "$tmp/c" "share/fish/vendor_completions.d/$name.fish" ;;
        esac
    done
done

# The systemd unit, pointing at this prefix's mosixd.
sed "s|/usr/local/sbin/mosixd|$prefix/sbin/mosixd|g" crates/mosixd/dist/mosixd.service > "$tmp/mosixd.service"
put 644 "$tmp/mosixd.service" lib/systemd/system/mosixd.service

# Documentation, the example configuration, the Grafana dashboard.
put 644 crates/mosixd/dist/mosix.toml.example share/doc/mosix/mosix.toml.example
put 644 crates/mosixd/dist/grafana-dashboard.json share/doc/mosix/grafana-dashboard.json
put 644 README.md share/doc/mosix/README.md
for d in docs/*.md; do put 644 "$d" "share/doc/mosix/$(basename "$d")"; done

# The manifest (itself included), for --uninstall.
mkdir -p "$root/share/mosix"
installed+=("$prefix/$manifest_rel")
printf '%s\n' "${installed[@]}" > "$root/$manifest_rel"

# The example configuration, unless there is one (never overwritten, not in the manifest).
conf=$destdir$sysconfdir/mosix/mosix.toml
if [ "$config" = 0 ]; then
    :
elif [ -e "$conf" ]; then
    echo "install.sh: keeping the existing $sysconfdir/mosix/mosix.toml" >&2
else
    install -D -m 644 crates/mosixd/dist/mosix.toml.example "$conf"
    echo "install.sh: wrote an example $sysconfdir/mosix/mosix.toml: edit node and [[map]]" >&2
fi

echo "installed MOSIX into $prefix (${#installed[@]} files; list in $prefix/$manifest_rel)"
if [ -z "$destdir" ]; then
    cat <<EOF
Next, on every node:
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > $sysconfdir/mosix/secret   # the same file on every node
  chmod 600 $sysconfdir/mosix/secret
  $prefix/sbin/mosixd --gen-key $sysconfdir/mosix/node.key   # add its line to $sysconfdir/mosix/nodes.keys
  systemctl daemon-reload && systemctl enable --now mosixd
Uninstall: bash scripts/install.sh --uninstall --prefix $prefix
EOF
fi
