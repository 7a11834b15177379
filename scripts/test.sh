#!/usr/bin/env bash
# Runs every test of the workspace: unit, property, loopback integration, CLI and broker
# tests, and compiles the benches. Needs a Rust toolchain, loopback networking, and the
# brokers the broker buses are tested against (NATS, Redis, and tansu for Kafka), which
# it starts, or installs and starts, itself.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/brokers.sh
source scripts/brokers.sh

cargo test --workspace --all-features --locked
# Benches are not run here (timing claims live in docs/BENCHMARKS.md), but they must
# build; the dev profile reuses the test build instead of compiling everything again.
cargo build --workspace --all-features --locked --benches
# So must the fuzz targets (fuzz/, a workspace of their own); running them takes
# cargo-fuzz, see docs/FUZZING.md.
cargo check --manifest-path fuzz/Cargo.toml --locked --bins
