#!/usr/bin/env bash
# Runs the kernel block device benchmark (crates/mount/benches/kernel.rs) in the test VM of
# scripts/vm/run.sh (Debian's kernel, which has nbd.ko, under QEMU's software emulation) and
# prints its report.
#
#   bash scripts/bench-vm.sh          # full run: bench profile, 64 MiB, a few minutes in the VM
#   bash scripts/bench-vm.sh --quick  # smoke run: debug build (as the tests), 16 MiB, under a minute
#
# CARGO_TARGET_DIR, when set, is used for the benchmark and for the binaries run.sh builds.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "")
    name=kernel
    build=(cargo bench --locked -p r3map-mount --bench kernel --no-run --message-format=json)
    test_timeout=900
    ;;
  --quick)
    name=kernel-quick
    build=(cargo test --locked -p r3map-mount --bench kernel --no-run --message-format=json)
    test_timeout=300
    ;;
  *)
    echo "usage: $0 [--quick]" >&2
    exit 2
    ;;
esac

echo "==> building the benchmark"
exe=$("${build[@]}" | grep '"kind":\["bench"\]' |
  sed -n 's/.*"name":"kernel".*"executable":"\([^"]*\)".*/\1/p' | tail -1)
if [ -z "$exe" ] || [ ! -x "$exe" ]; then
  echo "could not find the benchmark's executable in cargo's output" >&2
  exit 1
fi
# Under a name the VM script knows (run.sh copies it into the VM's /bin by its basename).
bins=$(mktemp -d)
trap 'rm -rf "$bins"' EXIT
cp "$exe" "$bins/r3map-kernel-bench"

# The report is printed indented under the PASS line; unindented here, it is plain markdown.
R3MAP_VM_TESTS=scripts/vm/bench R3MAP_VM_BINS="$bins/r3map-kernel-bench" R3MAP_VM_SHOW_OUTPUT=1 \
  R3MAP_VM_TEST_TIMEOUT="${R3MAP_VM_TEST_TIMEOUT:-$test_timeout}" \
  R3MAP_VM_TIMEOUT="${R3MAP_VM_TIMEOUT:-$((test_timeout + 300))}" \
  bash scripts/vm/run.sh "$name" | sed 's/^    //'
