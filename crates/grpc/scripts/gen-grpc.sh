#!/usr/bin/env bash
# Regenerates crates/grpc/src/generated/*.rs from crates/grpc/proto/**/*.proto.
#
#   bash crates/grpc/scripts/gen-grpc.sh          # rewrite the generated files
#   bash crates/grpc/scripts/gen-grpc.sh --check  # fail if they are out of date
#
# The generated code is committed so that building needs no protoc. This script builds the small
# generator in crates/grpc/codegen (tonic-prost-build, with the protoc of the protoc-bin-vendored
# crate unless $PROTOC is set; nothing to install) and formats its output like the rest of the
# workspace.
set -euo pipefail
crate="$(cd "$(dirname "$0")/.." && pwd)"
root="$(cd "$crate/../.." && pwd)"

out="$crate/src/generated"
check=0
if [ "${1:-}" = "--check" ]; then
  check=1
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi

cargo run --quiet --locked --manifest-path "$crate/codegen/Cargo.toml" \
  --target-dir "$root/target/grpc-codegen" -- "$crate/proto" "$out"
rustfmt --edition 2024 --config max_width=110,use_small_heuristics=Max "$out"/*.rs

if [ "$check" -eq 1 ]; then
  if ! diff -r "$crate/src/generated" "$out"; then
    echo "crates/grpc/src/generated is out of date: run crates/grpc/scripts/gen-grpc.sh" >&2
    exit 1
  fi
  echo "crates/grpc/src/generated is up to date"
fi
