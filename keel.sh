#!/usr/bin/env bash
# keel's two entry points on a fresh Debian 12 machine:
#   ./keel.sh up     install what is missing, build, start the appliance
#                    (REST API on 127.0.0.1:8080, state in ./var/keel)
#   ./keel.sh test   install what is missing, build, run the whole suite
# Both are idempotent and quiet when everything is already installed.
set -euo pipefail
cd "$(dirname "$0")"

# Packages the appliance needs at build and run time.
# libvirt + QEMU + OVMF + qemu-utils: the host agent runs VMs (and links libvirt).
UP_PACKAGES=(gcc libc6-dev pkg-config ca-certificates libvirt-dev libvirt-daemon-system
    qemu-system-x86 qemu-utils ovmf seabios)
# Packages the test fixtures need: namespaces, QEMU guests, vhost-user peers.
TEST_PACKAGES=("${UP_PACKAGES[@]}" iproute2 iputils-ping procps util-linux
    qemu-system-x86 qemu-system-common busybox-static linux-image-amd64 xz-utils
    ethtool tcpdump curl haproxy wrk iperf3 python3-venv python3-scapy nftables
    ovmf systemd-boot-efi shim-signed grub-efi-amd64-signed grub-pc-bin
    dosfstools mtools gdisk fdisk
    e2fsprogs binutils
    postgresql)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'keel.sh: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $*"; fi
}

install_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_rust() {
    if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null || die "no Rust toolchain: install one with rustup (https://rustup.rs), then rerun"
    local need="1.89"
    local have
    have=$(rustc --version | awk '{print $2}')
    [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" = "$need" ] \
        || die "rustc $have is too old; keel needs $need or newer (rustup update)"
}

cmd_up() {
    install_packages "${UP_PACKAGES[@]}"
    ensure_rust
    log "building keel (release)"
    cargo build --release --locked --quiet -p keel
    log "starting keel up (Ctrl-C stops it)"
    exec ./target/release/keel up "$@"
}

STEPS=()
FAILED=0
step() {
    local name=$1; shift
    local start=$SECONDS
    log "$name"
    if "$@"; then
        STEPS+=("PASS  $(printf '%-28s' "$name") $((SECONDS - start))s")
    else
        STEPS+=("FAIL  $(printf '%-28s' "$name") $((SECONDS - start))s")
        FAILED=$((FAILED + 1))
    fi
}

TEST_LOG=target/keel-test.log
run_tests() {
    mkdir -p target
    cargo test --workspace --locked 2>&1 | tee "$TEST_LOG"
    return "${PIPESTATUS[0]}"
}

# Adds up cargo's "test result:" lines.
test_totals() {
    awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
         END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$TEST_LOG" 2>/dev/null || echo "0 passed, 0 failed"
}

no_leftovers() {
    local ns procs keels
    ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep '^keelt-' || true)
    procs=$(pgrep -a -f 'keel-guest/runs|keel-fw-' || true)
    # keel processes the tests started from this tree's binary (keel up and
    # its helpers: disk servers, data planes, load balancers, CDP).
    keels=$(pgrep -a -f "^$PWD/target/debug/keel (up|vhost-blk|dataplane|lb|cdp)( |\$)" || true)
    [ -z "$ns" ] || { echo "leftover namespaces: $ns" >&2; return 1; }
    [ -z "$procs" ] || { echo "leftover guests: $procs" >&2; return 1; }
    [ -z "$keels" ] || { echo "leftover keel processes: $keels" >&2; return 1; }
}

cmd_test() {
    install_packages "${TEST_PACKAGES[@]}"
    ensure_rust
    for tool in rustfmt cargo-clippy; do
        command -v "$tool" >/dev/null || die "$tool missing: rustup component add ${tool#cargo-}"
    done
    [ "$(id -u)" -eq 0 ] || die "the suite creates network namespaces: run it as root"
    export RUST_BACKTRACE=1
    step "format (cargo fmt --check)" cargo fmt --all --check
    step "lint (clippy -D warnings)" cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
    step "tests (cargo test)" run_tests
    step "no leftover netns/guests/keel processes" no_leftovers

    echo
    echo "keel test summary"
    printf '  %s\n' "${STEPS[@]}"
    local passed=$(( ${#STEPS[@]} - FAILED ))
    echo "steps: $passed of ${#STEPS[@]} passed"
    echo "tests: $(test_totals)"
    [ "$FAILED" -eq 0 ]
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    test) shift; cmd_test "$@" ;;
    *) echo "usage: $0 up [keel up flags] | test" >&2; exit 2 ;;
esac
