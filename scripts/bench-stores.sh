#!/usr/bin/env bash
# Runs the store benchmark with every server it knows: redis-server and moto as scripts/test.sh
# installs them, and s3s-fs (a fast S3-compatible server, built from crates.io on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

s3s_dir="${R3MAP_S3S_DIR:-$HOME/.cache/r3map/s3s}"
if [ ! -x "$s3s_dir/bin/s3s-fs" ]; then
  echo "==> installing s3s-fs in $s3s_dir (a few minutes, once)"
  # s3s-fs 0.15 and later need a newer Rust than this project's 1.95.
  cargo install s3s-fs --version "<0.15" --locked --features binary --root "$s3s_dir"
fi
export R3MAP_S3S_FS="$s3s_dir/bin/s3s-fs"
cargo bench -p r3map-stores --bench stores -- "$@"
