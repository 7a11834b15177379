#!/usr/bin/env bash
# Sourced by test.sh and bench.sh: makes sure NATS (with JetStream), Redis and the
# Kafka-compatible broker tansu listen on their loopback ports, starting them (or
# installing and starting them) when they do not.

# True when something listens on 127.0.0.1:$1.
listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Waits up to 10 s for 127.0.0.1:$1 to accept connections.
wait_for_port() {
    for _ in $(seq 1 50); do
        listening "$1" && return 0
        sleep 0.2
    done
    echo "nothing listens on 127.0.0.1:$1 after 10 s" >&2
    return 1
}

# NATS with JetStream on 127.0.0.1:4222; the tests that kill a server start their own.
ensure_nats() {
    listening 4222 && return 0
    if [ ! -x /usr/sbin/nats-server ]; then
        apt-get install -y nats-server || { apt-get update && apt-get install -y nats-server; }
    fi
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server
    wait_for_port 4222
}

# Redis on 127.0.0.1:6379, keeping nothing on disk.
ensure_redis() {
    listening 6379 && return 0
    if ! command -v redis-server >/dev/null; then
        apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }
    fi
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    wait_for_port 6379
}

# The Kafka-compatible broker tansu on 127.0.0.1:9092, keeping its log in memory.
# Installing it compiles it, once: about 15 minutes.
ensure_kafka() {
    listening 9092 && return 0
    if ! command -v tansu >/dev/null; then
        cargo install tansu --version 0.6.0 --features dynostore
    fi
    setsid nohup tansu broker --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
        >"${TMPDIR:-/tmp}/syncbus-tansu.log" 2>&1 </dev/null &
    wait_for_port 9092
}

# cargo install puts tansu here; the Kafka tests start private brokers from it too.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
ensure_nats
ensure_redis
ensure_kafka
