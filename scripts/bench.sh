#!/usr/bin/env bash
# Runs the side-by-side comparison (benches/compare.rs): the mesh against the NATS,
# Redis and Kafka buses and raw UDP, in one run, printing markdown tables. Starts the
# brokers as the test command does. About two minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/brokers.sh
source scripts/brokers.sh

# Bus names given (mesh, nats, redis, kafka) limit the run to those.
cargo bench --locked --all-features --bench compare -- "$@"
