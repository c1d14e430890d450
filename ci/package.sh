#!/usr/bin/env bash
# The Debian package of echod, built with cargo-deb and checked as an operator meets it:
# lintian (no errors; every warning fixed or overridden with its reason), `dpkg -i`,
# /usr/bin/echod --version, `man -l` on the installed pages, `systemd-analyze verify` on the
# installed units, `dpkg --purge`, and nothing of the package left on the system.
#
#   bash ci/package.sh            package the binaries CI's test stage built (ECHOD_BIN, and
#                                 echod-bench beside it): no compile, about 15 s once the
#                                 tools are there
#   bash ci/package.sh --release  build a release package: cargo build --release, then the same
#   bash ci/package.sh --build-only [--release]   build the .deb, check nothing, install nothing
#   bash ci/package.sh --install-cargo-deb       only install cargo-deb (ci/test runs this in the
#                                 background while other stages run: it compiles for ~1.5 min)
#
# Either way the man pages and completions come from the packaged binaries' own `--generate`,
# written into the build's target/release/generated/, where [package.metadata.deb] in
# Cargo.toml finds them. The CI package stages the test binaries in a target directory of its
# own (target/package/release/), so cargo-deb treats them as its build: same manifest, same
# stripping, no release compile (which takes about 4 minutes here).
#
# Environment:
#   ECHOD_BIN          the echod to package (CI mode; default: the static test build)
#   ECHOD_DEB_OUT      where the .deb goes (default: target/debian/)
#   CARGO_DEB_VERSION  cargo-deb to install when missing (default below)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$SECONDS
CARGO_DEB_VERSION=${CARGO_DEB_VERSION:-3.8.0}
PKG=echod

release=0
check=1
tools_only=0
for arg in "$@"; do
    case $arg in
        --release) release=1 ;;
        --build-only) check=0 ;;
        --install-cargo-deb) tools_only=1 ;;
        *) echo "usage: ci/package.sh [--release] [--build-only] | --install-cargo-deb" >&2; exit 2 ;;
    esac
done

step() { printf '\n==> %s  [%ds]\n' "$*" $((SECONDS - START)); }
fail() { echo "FAIL: $*" >&2; exit 1; }

TMP=$(mktemp -d /tmp/echod-package.XXXXXX)
INSTALLED=0
cleanup() {
    # A failed check must not leave the package installed.
    if [[ $INSTALLED == 1 ]]; then
        dpkg --purge "$PKG" >/dev/null 2>&1 || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

install_cargo_deb() {
    if [[ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]]; then
        # From crates.io, compiled here (about 1.5 minutes on 2 cores); kept in ~/.cargo/bin.
        # Without default features: no bundled liblzma to build (the .deb is xz-compressed by
        # the system's xz instead, --compress-system below).
        echo "installing cargo-deb $CARGO_DEB_VERSION"
        cargo install --locked --quiet --no-default-features --version "$CARGO_DEB_VERSION" cargo-deb
    fi
    cargo deb --version
}
if [[ $tools_only == 1 ]]; then
    install_cargo_deb
    exit 0
fi

# ------------------------------------------------------------------------------- tools
step "tools"
if [[ $check == 1 ]]; then
    need=()
    command -v lintian >/dev/null || need+=(lintian)
    command -v man >/dev/null || need+=(man-db)
    command -v systemd-analyze >/dev/null || need+=(systemd)
    command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
    command -v strip >/dev/null || need+=(binutils)
    if ((${#need[@]})); then
        echo "installing: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
        apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${need[@]}" >/dev/null
    fi
    lintian --version
fi
install_cargo_deb
command -v xz >/dev/null || fail "xz is needed (apt-get install xz-utils)"

# ------------------------------------------------------------------------------- binaries
if [[ $release == 1 ]]; then
    step "cargo build --release --locked (echod, echod-bench)"
    cargo build --release --locked --bins
    TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
else
    step "stage the test build's binaries"
    BIN=${ECHOD_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/debug/echod}
    BENCH=$(dirname "$BIN")/echod-bench
    [[ -x $BIN && -x $BENCH ]] || fail "no built echod and echod-bench at $(dirname "$BIN") (run the test stage, or set ECHOD_BIN)"
    TARGET_DIR=$ROOT/target/package
    rm -rf "$TARGET_DIR/release"
    mkdir -p "$TARGET_DIR/release"
    cp "$BIN" "$BENCH" "$TARGET_DIR/release/"
    ls -l "$TARGET_DIR/release/"
fi
OUT_BIN=$TARGET_DIR/release

step "man pages and completions from the binaries' --generate"
GEN=$OUT_BIN/generated
# The pages' date: the commit's, so the same commit gives the same pages.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
rm -rf "$GEN"
mkdir -p "$GEN"
for bin in echod echod-bench; do
    # Debian ships pages gzipped at the highest level, without a timestamp (reproducible).
    "$OUT_BIN/$bin" --generate man | gzip -9n >"$GEN/$bin.1.gz"
    "$OUT_BIN/$bin" --generate complete-bash >"$GEN/$bin.bash"
    "$OUT_BIN/$bin" --generate complete-zsh >"$GEN/_$bin"
    "$OUT_BIN/$bin" --generate complete-fish >"$GEN/$bin.fish"
done
ls "$GEN" | tr '\n' ' '
echo

# ------------------------------------------------------------------------------- the .deb
step "cargo deb --no-build"
OUT=${ECHOD_DEB_OUT:-$ROOT/target/debian}
mkdir -p "$OUT"
DEB=$(CARGO_TARGET_DIR=$TARGET_DIR cargo deb --no-build --locked --compress-system --output "$OUT" | tail -n 1)
[[ -f $DEB ]] || fail "cargo deb did not name the package it built (got: $DEB)"
echo "$DEB: $(stat -c %s "$DEB") bytes"
dpkg-deb --info "$DEB" | sed -n '/Package:/,$p'
dpkg-deb --contents "$DEB" | awk '{print $1, $3, $6}' | column -t
if [[ $check == 0 ]]; then
    printf '\npackage built in %ds (not checked)\n' $((SECONDS - START))
    exit 0
fi

step "lintian"
# --fail-on error: warnings are fixed or overridden (deploy/debian/lintian-overrides says why).
lintian --fail-on error --display-info --show-overrides "$DEB" | tee "$TMP/lintian.txt" \
    || fail "lintian reported errors"
grep -E '^W: ' "$TMP/lintian.txt" >"$TMP/warnings.txt" || true
if [[ $release == 0 ]]; then
    # CI packs the test stage's static binaries (crt-static: static-pie, so ELF type DYN with no
    # NEEDED entry), which lintian takes for shared libraries without their prerequisites, and
    # which need no library, so cargo-deb's $auto leaves Depends: empty. A release package is
    # dynamically linked and has neither warning; these two are expected here and only here.
    grep -Ev "^W: $PKG: (shared-library-lacks-prerequisites \[usr/bin/echod(-bench)?\]|empty-field Depends)\$" \
        "$TMP/warnings.txt" >"$TMP/unexpected.txt" || true
    mv "$TMP/unexpected.txt" "$TMP/warnings.txt"
    echo "(expected for the static CI binaries: empty-field Depends, shared-library-lacks-prerequisites)"
fi
if [[ -s $TMP/warnings.txt ]]; then
    cat "$TMP/warnings.txt"
    fail "lintian warnings without an override (fix them or override them with the reason)"
fi
grep -q . "$TMP/lintian.txt" || echo "(nothing to report)"

# ------------------------------------------------------------------------------- install
step "dpkg -i"
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep 'install ok' >/dev/null; then
    fail "$PKG is already installed on this machine: purge it first (dpkg --purge $PKG)"
fi
# What exists now, to compare with after the purge (paths that name echod).
snapshot() {
    find /etc /usr /var/lib /run -xdev \( -path /var/lib/dpkg -o -path /proc \) -prune -o \
        -name '*echod*' -print 2>/dev/null | LC_ALL=C sort
}
snapshot >"$TMP/before.txt"
INSTALLED=1
dpkg -i "$DEB"

step "installed: binaries, pages, completions, units (not enabled, not started)"
/usr/bin/echod --version
/usr/bin/echod-bench --version
want="echod $(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | sed -n 1p)"
[[ "$(/usr/bin/echod --version)" == "$want" ]] || fail "/usr/bin/echod --version is not '$want'"
for f in /usr/share/bash-completion/completions/echod /usr/share/bash-completion/completions/echod-bench \
    /usr/share/zsh/vendor-completions/_echod /usr/share/zsh/vendor-completions/_echod-bench \
    /usr/share/fish/vendor_completions.d/echod.fish /usr/share/fish/vendor_completions.d/echod-bench.fish \
    /usr/share/doc/echod/copyright /usr/share/doc/echod/changelog.Debian.gz; do
    [[ -s $f ]] || fail "$f is not installed"
done
bash -n /usr/share/bash-completion/completions/echod || fail "bash completion does not parse"
grep -q -- '--listen' /usr/share/bash-completion/completions/echod || fail "bash completion lacks --listen"
for f in /etc/systemd/system/*.wants/echod.* /etc/systemd/system/echod.*; do
    [[ -e $f || -L $f ]] && fail "the install enabled a unit: $f"
done
if pgrep -x echod >/dev/null; then
    echo "note: an echod process runs on this machine (not started by the package: no unit is enabled)"
fi

step "man -l on the installed pages"
for page in echod echod-bench; do
    path=/usr/share/man/man1/$page.1.gz
    [[ -s $path ]] || fail "$path is not installed (does a dpkg path-exclude drop /usr/share/man?)"
    MANPAGER=cat MANWIDTH=100 LC_ALL=C.UTF-8 man --warnings -l "$path" >"$TMP/$page.txt" 2>"$TMP/$page.err" \
        || fail "man -l $path failed: $(cat "$TMP/$page.err")"
    [[ -s $TMP/$page.err ]] && fail "man -l $path warned: $(cat "$TMP/$page.err")"
    head -n 3 "$TMP/$page.txt"
    echo "   ... $(wc -l <"$TMP/$page.txt") lines, no warnings"
done
grep -q -- '--shutdown-timeout' "$TMP/echod.txt" || fail "echod(1) lacks --shutdown-timeout"
grep -q 'ECHOD_LISTEN' "$TMP/echod.txt" || fail "echod(1) lacks ECHOD_LISTEN"
# Found by name too, as `man echod` does.
[[ "$(man -w echod)" == /usr/share/man/man1/echod.1.gz ]] || fail "man -w echod: $(man -w echod 2>&1)"

step "systemd-analyze verify on the installed units"
UNITS=(/usr/lib/systemd/system/echod.service /usr/lib/systemd/system/echod.socket)
for u in "${UNITS[@]}" /usr/lib/systemd/system/echod.service.d/package.conf; do
    [[ -s $u ]] || fail "$u is not installed"
done
systemd-analyze verify "${UNITS[@]}" >"$TMP/verify.txt" 2>&1 || { cat "$TMP/verify.txt"; fail "systemd-analyze verify"; }
[[ -s $TMP/verify.txt ]] && { cat "$TMP/verify.txt"; fail "systemd-analyze verify printed warnings"; }
# The drop-in points the unit at the packaged binary.
grep -qx 'ExecStart=/usr/bin/echod' /usr/lib/systemd/system/echod.service.d/package.conf \
    || fail "the drop-in does not point ExecStart at /usr/bin/echod"
echo "clean (ExecStart=/usr/bin/echod through echod.service.d/package.conf)"

# ------------------------------------------------------------------------------- purge
step "dpkg --purge"
dpkg --purge "$PKG"
INSTALLED=0
dpkg-query -W "$PKG" >/dev/null 2>&1 && fail "dpkg still knows $PKG after the purge"
snapshot >"$TMP/after.txt"
if ! diff -u "$TMP/before.txt" "$TMP/after.txt"; then
    fail "the purge left files behind (above)"
fi
dpkg-deb --contents "$DEB" | awk '{print $6}' | sed 's|^\./|/|' | while read -r path; do
    case $path in
        */) [[ $path == *echod* && -e $path ]] && fail "directory left behind: $path" ;;
        *) [[ -e $path || -L $path ]] && fail "file left behind: $path" ;;
    esac
    true
done
echo "nothing left behind"

printf '\npackage: %s, %s bytes; checked in %ds\n' "$(basename "$DEB")" "$(stat -c %s "$DEB")" $((SECONDS - START))
