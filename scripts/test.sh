#!/usr/bin/env bash
# Installs what the tests need and runs all of them: formatting, lints, a short benchmark smoke run,
# and the test suite (as root the privileged tests run too). Safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# System packages the tests use. Only installed when missing, so repeated runs are quick.
need_pkgs=()
command -v losetup >/dev/null 2>&1 || need_pkgs+=(mount)
# The mount benchmark's nbdfuse baseline, and the NBD server's peers (nbdinfo, nbdcopy, qemu-io,
# qemu-img, fio's nbd engine) and the NBD client's (nbdkit, qemu-nbd).
command -v nbdkit >/dev/null 2>&1 || need_pkgs+=(nbdkit)
command -v nbdfuse >/dev/null 2>&1 || need_pkgs+=(libnbd-bin)
command -v qemu-io >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v fio >/dev/null 2>&1 || need_pkgs+=(fio)
command -v fusermount3 >/dev/null 2>&1 || need_pkgs+=(fuse3)
# The stores' integration tests start their own redis-server; moto (below) needs a venv.
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
  else
    echo "missing ${need_pkgs[*]}; some privileged tests will be skipped" >&2
  fi
fi

# Debian starts a redis-server service on install; the tests start their own on free ports.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
  systemctl stop redis-server || true
fi

# An S3-compatible server for the S3 store's tests: moto, in a venv of its own. The tests look for
# it in $R3MAP_MOTO_SERVER, then in this venv, then on PATH.
moto_dir="${R3MAP_MOTO_DIR:-$HOME/.cache/r3map/moto}"
if [ ! -x "$moto_dir/bin/moto_server" ]; then
  log "installing moto (S3-compatible test server) in $moto_dir"
  python3 -m venv "$moto_dir"
  "$moto_dir/bin/pip" install -q 'moto[server]'
fi
export R3MAP_MOTO_SERVER="$moto_dir/bin/moto_server"

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "benchmark smoke runs"
cargo bench --locked -p r3map-core --bench pipeline -- --quick
cargo bench --locked -p r3map-net --bench transport -- --quick
cargo bench --locked -p r3map-mount --bench mount -- --quick
cargo bench --locked -p r3map-region --bench region -- --quick
cargo bench --locked -p r3map-nbd --bench nbd -- --quick
cargo bench --locked -p r3map-migrate --bench migrate -- --quick
cargo bench --locked -p r3map-stores --bench stores -- --quick

log "tests"
cargo nextest run --workspace --locked --no-fail-fast

# Kernel paths this host lacks (nbd.ko): Debian's kernel under QEMU's software emulation.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "kernel-path tests in a VM"
  bash scripts/vm/run.sh
  log "kernel block device benchmark in the VM (smoke run)"
  bash scripts/bench-vm.sh --quick
else
  echo "skipped the VM tests: they need root and apt-get (to fetch Debian's kernel and QEMU)" >&2
fi
