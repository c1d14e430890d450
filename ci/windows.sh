#!/usr/bin/env bash
# Windows build of echod, checked on Linux: cross-compiles for x86_64-pc-windows-gnu with
# Debian's Rust toolchain and mingw-w64, runs the test suite under Wine, then drives the built
# echod.exe from Linux (ci/windows/smoke.py) and runs it as a service under Wine's service
# manager (ci/windows/service.py). Run from the repository root:
#
#     bash ci/windows.sh
#     bash ci/windows.sh --install-only   only install the packages
#     bash ci/windows.sh --build-only     only the cross-build (packages installed): ci/test runs
#                                         it in the background while other stages wait on I/O,
#                                         and the full run after it finds the build done
#
# Environment (all optional):
#   ECHOD_WINDOWS_TARGET_DIR  cargo target dir for the Windows build (default: target/windows);
#                             the Wine prefix lives inside it, in wine/
#   ECHOD_WINDOWS_TEST_ARGS   extra arguments for the test binaries (e.g. a test name filter)
#   ECHOD_TEST_SCALE          size multiplier for the bulk tests (e.g. 0.1), passed on
#   ECHOD_WINDOWS_SKIP_APT=1  do not install packages (they must already be there)
#
# See docs/windows.md for why each step is needed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
MODE=${1:-all}
case "$MODE" in
    all | --install-only | --build-only) ;;
    *) echo "usage: ci/windows.sh [--install-only | --build-only]" >&2; exit 2 ;;
esac
TARGET=x86_64-pc-windows-gnu
TRIPLE_ENV=X86_64_PC_WINDOWS_GNU
PACKAGES=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 wine64)
WINE=/usr/lib/wine/wine64
WINESERVER=/usr/lib/wine/wineserver
# Debian's toolchain, by absolute path: rustup's proxies come first in PATH and have no Windows
# standard library (and cannot download one here).
CARGO=/usr/bin/cargo

T_START=$(date +%s.%N)
T_STAGE=$T_START
declare -a TIMINGS=()
CURRENT=""

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
end_stage() {
    if [[ -n $CURRENT ]]; then
        local t
        t=$(now)
        TIMINGS+=("$(printf '%-44s %7s s' "$CURRENT" "$(elapsed "$T_STAGE" "$t")")")
        echo "   ($CURRENT: $(elapsed "$T_STAGE" "$t") s)"
    fi
}
stage() {
    end_stage
    CURRENT=$1
    T_STAGE=$(now)
    echo
    echo "==> $1"
}
print_timings() {
    end_stage
    CURRENT=""
    echo
    echo "==> timings"
    local line
    for line in "${TIMINGS[@]}"; do echo "   $line"; done
    echo "   $(printf '%-44s %7s s' total "$(elapsed "$T_START" "$(now)")")"
}

WINESERVER_STARTED=0
cleanup() {
    # Ends the Wine processes of this script's own prefix (and its wineserver), nothing else.
    if [[ $WINESERVER_STARTED == 1 ]]; then
        "$WINESERVER" -k 2>/dev/null || true
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
stage "install packages"
echo "${PACKAGES[*]}"
missing=()
for p in "${PACKAGES[@]}"; do
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
        missing+=("$p")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "already installed"
elif [[ ${ECHOD_WINDOWS_SKIP_APT:-0} == 1 ]]; then
    echo "missing packages: ${missing[*]} (and ECHOD_WINDOWS_SKIP_APT=1)" >&2
    exit 1
else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "installed: ${missing[*]}"
fi
if [[ $MODE == --install-only ]]; then
    exit 0
fi

# ---------------------------------------------------------------------------------------------
stage "toolchain"
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
# -Zbuild-std is unstable; Debian ships a stable compiler, which accepts it with this set.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_${TRIPLE_ENV}_LINKER=x86_64-w64-mingw32-gcc
export CARGO_TARGET_${TRIPLE_ENV}_RUNNER=$WINE
export CARGO_TARGET_DIR=${ECHOD_WINDOWS_TARGET_DIR:-$ROOT/target/windows}
# A check build, made for build speed: no optimisation (the manifest's dev profile optimises
# dependencies, and with -Zbuild-std that would include the standard library), no debug info,
# no incremental state.
export CARGO_PROFILE_DEV_OPT_LEVEL=0 CARGO_PROFILE_DEV_DEBUG=0 CARGO_INCREMENTAL=0
# Flags meant for the host build would also apply to the standard library built here.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET
SYSROOT_SRC=$($RUSTC --print sysroot)/lib/rustlib/src/rust/library
[[ -f $SYSROOT_SRC/std/Cargo.toml ]] || { echo "no standard library source at $SYSROOT_SRC" >&2; exit 1; }
"$CARGO" --version
"$RUSTC" --version
echo "x86_64-w64-mingw32-gcc $(x86_64-w64-mingw32-gcc -dumpfullversion)"
"$WINE" --version
BUILD_STD=(-Zbuild-std=std,panic_abort --target "$TARGET" --config 'profile.dev.package."*".opt-level=0')
mkdir -p "$CARGO_TARGET_DIR"
echo "target dir: $CARGO_TARGET_DIR"

# ---------------------------------------------------------------------------------------------
stage "ProcessPrng shim (bcryptprimitives.dll)"
# Rust's Windows std imports ProcessPrng from bcryptprimitives.dll; Wine 8 has no such DLL and
# every Rust program then fails to load, without a word under WINEDEBUG=-all.
SHIM=$CARGO_TARGET_DIR/shim/bcryptprimitives.dll
mkdir -p "$(dirname "$SHIM")"
if [[ ! -f $SHIM || ci/windows/processprng.c -nt $SHIM ]]; then
    x86_64-w64-mingw32-gcc -shared -O2 -s -Wall -Werror -o "$SHIM" ci/windows/processprng.c -lbcrypt
fi
exports=$(x86_64-w64-mingw32-objdump -p "$SHIM")
[[ $exports == *"] ProcessPrng"* ]] || {
    echo "$SHIM does not export ProcessPrng" >&2
    exit 1
}
echo "built $SHIM"

# ---------------------------------------------------------------------------------------------
if [[ $MODE == --build-only ]]; then
    stage "cross-build echod.exe and the test binaries"
    "$CARGO" test "${BUILD_STD[@]}" --tests --no-run
    "$CARGO" build "${BUILD_STD[@]}" --bin echod
    print_timings
    exit 0
fi

stage "Wine prefix (started in the background)"
export WINEPREFIX=$CARGO_TARGET_DIR/wine
export WINEDEBUG=-all
# The shim must load as a native DLL; mscoree/mshtml off so no Mono/Gecko install is attempted.
export WINEDLLOVERRIDES="bcryptprimitives=n;mscoree,mshtml="
WINEBOOT_LOG=$CARGO_TARGET_DIR/wineboot.log
WINEBOOT_PID=""
if [[ ! -f $WINEPREFIX/system.reg ]]; then
    rm -rf "$WINEPREFIX"
fi
mkdir -p "$WINEPREFIX"
# One persistent wineserver for the whole run instead of one per program (ended by the EXIT
# trap); an earlier run's server may still be up, hence the `|| true`.
WINESERVER_STARTED=1
"$WINESERVER" -p 2>/dev/null || true
if [[ -f $WINEPREFIX/system.reg ]]; then
    echo "reusing $WINEPREFIX"
else
    echo "creating $WINEPREFIX"
fi
# Also on a reused prefix: wineboot starts Wine's background services (winedevice.exe), which
# keep the standard output they were started with open for as long as the wineserver lives. They
# must get this log file, not a pipe that a later step reads to its end.
"$WINE" wineboot --init >"$WINEBOOT_LOG" 2>&1 &
WINEBOOT_PID=$!

# ---------------------------------------------------------------------------------------------
stage "cross-build echod.exe and the test binaries"
# One build: the integration tests need the binaries (CARGO_BIN_EXE_echod), so this also
# produces echod.exe, with the same dependency features as the tests.
"$CARGO" test "${BUILD_STD[@]}" --tests --no-run
EXE=$CARGO_TARGET_DIR/$TARGET/debug/echod.exe
if [[ ! -f $EXE ]]; then
    "$CARGO" build "${BUILD_STD[@]}" --bin echod
fi
ls -l "$EXE"

# ---------------------------------------------------------------------------------------------
stage "finish the Wine prefix"
if ! wait "$WINEBOOT_PID"; then
    cat "$WINEBOOT_LOG" >&2
    echo "wineboot --init failed" >&2
    exit 1
fi
cp "$SHIM" "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll"
# Loading check: a program that cannot load exits non-zero and prints nothing.
HELP_OUT=$CARGO_TARGET_DIR/echod-help.txt
if ! timeout 60 "$WINE" "$EXE" --help >"$HELP_OUT" 2>&1 || ! grep -q -- --listen "$HELP_OUT"; then
    echo "echod.exe does not run under Wine (exit status or output wrong):" >&2
    cat "$HELP_OUT" >&2
    exit 1
fi
echo "echod.exe --help runs under Wine"

# ---------------------------------------------------------------------------------------------
stage "tests under Wine"
# Two tests at a time: Wine's wineserver slows down sharply with many open sockets.
# ECHOD_TEST_WINE=1 tells the tests they run under Wine, which reports a peer's reset (RST) to
# the program as a clean end of stream, unlike Windows.
export ECHOD_TEST_WINE=1
tests_rc=0
# shellcheck disable=SC2086
timeout -k 10 900 "$CARGO" test "${BUILD_STD[@]}" --tests --no-fail-fast -- --test-threads=2 \
    ${ECHOD_WINDOWS_TEST_ARGS:-} || tests_rc=$?

# ---------------------------------------------------------------------------------------------
stage "smoke test of echod.exe under Wine"
smoke_rc=0
timeout -k 10 300 python3 ci/windows/smoke.py "$WINE" "$EXE" || smoke_rc=$?

# ---------------------------------------------------------------------------------------------
stage "echod.exe --service under Wine's service manager"
# sc create / net start / echo / net stop with a client connected: the stop drains like ctrl-c.
# On a fresh Wine session: the services.exe that `wineboot --init` started refuses to start a
# service created after it (OpenService with start rights fails, "Could not get handle to
# service"); one started by a plain `wineboot` does not. So this prefix's wineserver is ended
# (the EXIT trap's command), a persistent one started again, and the session booted with its
# output in a file: the background services it starts hold that output open (a pipe there
# keeps the next reader waiting for about a minute).
"$WINESERVER" -k 2>/dev/null || true
"$WINESERVER" -w 2>/dev/null || true
"$WINESERVER" -p 2>/dev/null || true
"$WINE" wineboot >"$CARGO_TARGET_DIR/wineboot-service.log" 2>&1 || {
    cat "$CARGO_TARGET_DIR/wineboot-service.log" >&2
    echo "wineboot before the service check failed" >&2
}
service_rc=0
timeout -k 10 300 python3 ci/windows/service.py "$WINE" "$EXE" || service_rc=$?

print_timings
echo
if [[ $tests_rc != 0 || $smoke_rc != 0 || $service_rc != 0 ]]; then
    echo "windows: FAILED (tests exit status $tests_rc, smoke test exit status $smoke_rc," \
        "service test exit status $service_rc)"
    exit 1
fi
echo "windows: OK"
