#!/usr/bin/env bash
# Runs every test of the workspace: unit, property, loopback integration and CLI tests,
# and compiles the benches. Needs nothing but a Rust toolchain and loopback networking.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-features --locked
# Benches are not run here (timing claims live in docs/BENCHMARKS.md), but they must
# build; the dev profile reuses the test build instead of compiling everything again.
cargo build --workspace --all-features --locked --benches
