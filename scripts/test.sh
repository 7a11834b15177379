#!/usr/bin/env bash
# Runs every test of the workspace: unit, property, loopback integration and CLI tests,
# and compiles the benches. Needs nothing but a Rust toolchain and loopback networking.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-features --locked
# Benches are not run here (timing claims live in docs/BENCHMARKS.md), but they must build.
cargo bench --workspace --all-features --locked --no-run
