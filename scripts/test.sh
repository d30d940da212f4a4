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
# The gRPC tests' Go peer: Go, its gRPC and protobuf sources, and protoc with the Go plugins.
command -v go >/dev/null 2>&1 || need_pkgs+=(golang-go)
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
command -v protoc-gen-go >/dev/null 2>&1 || need_pkgs+=(protoc-gen-go)
command -v protoc-gen-go-grpc >/dev/null 2>&1 || need_pkgs+=(protoc-gen-go-grpc)
[ -d /usr/share/gocode/src/google.golang.org/grpc ] || need_pkgs+=(golang-google-grpc-dev)
[ -d /usr/share/gocode/src/google.golang.org/protobuf ] || need_pkgs+=(golang-google-protobuf-dev)
# Debian's gRPC encodes messages with github.com/golang/protobuf; its 1.3 series (which it pulls
# in by default) cannot encode the messages protoc-gen-go 1.28 generates, and the peer panics on
# its first call. 1.5 wraps the new API.
dpkg-query -W -f='${Status}' golang-github-golang-protobuf-1-5-dev 2>/dev/null | grep -q 'ok installed' ||
  need_pkgs+=(golang-github-golang-protobuf-1-5-dev)
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

# Every step below runs even when one before it failed, so that one failure hides nothing; the
# script exits non-zero at the end if any failed, and lists them.
failed=()
step() {
  local name=$1
  shift
  log "$name"
  local started=$SECONDS
  if "$@"; then
    printf '==> %s: ok (%d s)\n' "$name" $((SECONDS - started))
  else
    printf '==> %s: FAILED (exit %d, %d s)\n' "$name" "$?" $((SECONDS - started))
    failed+=("$name")
  fi
}

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings

for bench in core:pipeline net:transport mount:mount region:region nbd:nbd migrate:migrate stores:stores; do
  step "benchmark smoke run: r3map-${bench%%:*} ${bench#*:}" \
    cargo bench --locked -p "r3map-${bench%%:*}" --bench "${bench#*:}" -- --quick
done

step "tests" cargo nextest run --workspace --locked --no-fail-fast

# Kernel paths this host lacks (nbd.ko): Debian's kernel under QEMU's software emulation.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  step "kernel-path tests in a VM" bash scripts/vm/run.sh
  step "kernel block device benchmark in the VM (smoke run)" bash scripts/bench-vm.sh --quick
else
  echo "skipped the VM tests: they need root and apt-get (to fetch Debian's kernel and QEMU)" >&2
fi

if [ "${#failed[@]}" -gt 0 ]; then
  printf '\n==> FAILED: %s\n' "${failed[@]}"
  exit 1
fi
printf '\n==> all steps passed (%d s)\n' "$SECONDS"
