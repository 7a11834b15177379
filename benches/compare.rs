//! The comparison harness: one workload through the mesh (UDP on loopback), the NATS,
//! Redis and Kafka buses, and raw UDP as a floor, all measured in the same run, and
//! printed as markdown tables with ratios against the mesh.
//!
//! `./scripts/bench.sh` makes sure the brokers are up and runs it; it takes about two
//! minutes. `./scripts/bench.sh mesh nats` runs only those buses. Workloads, for each bus: one publisher and three subscribers, each in a zone
//! of its own:
//! - throughput: publish as fast as the bus takes it, count what every subscriber got;
//! - latency: invalidations at a fixed low rate, publish-to-delivery at a subscriber,
//!   also with the publisher and one subscriber only;
//! - awaited: `publish_and_await` for 3 replicas and `publish_and_await_topology` for
//!   3 zones, one after another;
//! - cost: CPU seconds of this process (and of the broker's process) per million
//!   deliveries, and memory: how far this process's peak resident memory grows during
//!   the throughput runs, per instance, and the broker's resident memory after them.
//!
//! Environment: `SYNCBUS_BENCH_KEYS` sets the keys per throughput run (100,000);
//! `SYNCBUS_BENCH_BATCH_WINDOW_MS` sets the broker buses' batch window (10 ms).
//!
//! The raw UDP floor: 1,400-byte datagrams one per `send_to` as fast as one thread
//! sends them; the same with segmentation offload (46 per `sendmsg` with GSO, received
//! coalesced with GRO, through quinn-udp); and a ping-pong of small datagrams for the
//! round trip; and one-way latency through tokio tasks (a sending task, a receiving
//! task, a channel to a subscriber task), the least an async bus can do, to one
//! receiver and to three (each datagram sent to all, measured at one); and throughput
//! in process, with no transport (an `InMemoryBus` and three subscriptions of it), the
//! most any bus delivering through the same registry can do. And an idle node:
//! a `syncbus node` process in a two-node cluster, its resident memory and CPU over
//! ten seconds of nothing to do.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use syncbus::{
    Bus, InMemoryBus, InMemoryConfig, MembershipConfig, MeshBus, MeshConfig, PublishOptions, Zone,
};

/// Invalidations per throughput run; `SYNCBUS_BENCH_KEYS` changes it (more for a
/// profile of the steady state).
fn burst() -> usize {
    std::env::var("SYNCBUS_BENCH_KEYS")
        .ok()
        .and_then(|keys| keys.parse().ok())
        .unwrap_or(100_000)
}
/// The broker buses' batch window, if `SYNCBUS_BENCH_BATCH_WINDOW_MS` sets one (to
/// see what the window does to their latency).
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
fn batch_window() -> Option<Duration> {
    let ms = std::env::var("SYNCBUS_BENCH_BATCH_WINDOW_MS").ok()?;
    ms.parse().ok().map(Duration::from_millis)
}
/// Longest a throughput run may take before what arrived is counted.
const BURST_DEADLINE: Duration = Duration::from_secs(30);
/// Latency samples per bus, and their rate.
const LATENCY_SAMPLES: usize = 1_000;
const LATENCY_RATE: u64 = 500;
/// Awaited publishes per goal and bus.
const AWAITED: usize = 300;
const ZONES: [&str; 4] = ["a", "b", "c", "d"];

/// One bus under test: a publisher and its subscribers (three, or one for the latency
/// run of a pair), and the broker's process.
struct Setup {
    name: &'static str,
    publisher: Arc<dyn Bus>,
    subscribers: Vec<Arc<dyn Bus>>,
    broker_process: Option<&'static str>,
}

#[derive(Default)]
struct Row {
    bus: &'static str,
    /// Keys per second delivered to each subscriber, for 16- and 64-byte keys.
    throughput: [f64; 2],
    /// Deliveries missing or covered by a resync in the throughput runs.
    missing: u64,
    latency: [Duration; 3],
    /// The same with one subscriber node only: one datagram or message per publish,
    /// one receiver, as in the floors.
    latency_pair: [Duration; 3],
    replicas: [Duration; 2],
    zones: [Duration; 2],
    cpu_per_million: f64,
    broker_cpu_per_million: Option<f64>,
    /// Growth of this process's peak resident memory during the throughput runs, per
    /// instance (publisher and three subscribers), MB; `None` where the peak cannot be
    /// reset.
    peak_mb_per_instance: Option<f64>,
    /// The broker process's resident memory after the throughput runs, MB.
    broker_mb: Option<f64>,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // Bus names after `--` pick which to run (`cargo bench --bench compare -- mesh`);
    // cargo's own `--bench` flag is not one.
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let floor = udp_floor(&runtime);
    let idle = idle_node();
    let mut rows = Vec::new();
    for name in ["mesh", "nats", "redis", "kafka"] {
        if !picked.is_empty() && !picked.iter().any(|p| p == name) {
            continue;
        }
        let Some(buses) = runtime.block_on(setup(name, SUBSCRIBERS)) else {
            eprintln!("{name}: not built or not reachable; skipped");
            continue;
        };
        eprintln!("measuring {name}...");
        let mut row = runtime.block_on(measure(buses));
        if let Some(pair) = runtime.block_on(setup(name, 1)) {
            row.latency_pair = runtime.block_on(latency_alone(pair));
        }
        rows.push(row);
    }
    print_report(&floor, &rows);
    match draw_chart(&rows) {
        Ok(path) => println!("\nChart: {path}"),
        Err(error) => eprintln!("chart not drawn: {error}"),
    }
    println!(
        "\n## Idle node\n\nA `syncbus node` process (preset `lan`) with one peer, over {} s: \
         {:.1} MB resident, {:.2}% of a core.",
        IDLE_FOR.as_secs(),
        idle.0,
        idle.1
    );
}

/// How long the idle node is watched.
const IDLE_FOR: Duration = Duration::from_secs(10);

/// Resident memory (MB) and CPU (% of one core) of an idle node process with a peer.
fn idle_node() -> (f64, f64) {
    use std::process::{Command, Stdio};
    let node = |port: u16, seed: Option<u16>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_syncbus"));
        command.args(["node", "--bind", &format!("127.0.0.1:{port}")]);
        if let Some(seed) = seed {
            command.args(["--seed", &format!("127.0.0.1:{seed}")]);
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the syncbus binary")
    };
    let free = || {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let seed_port = free();
    let mut seed = node(seed_port, None);
    let mut idle = node(free(), Some(seed_port));
    // Joined and settled.
    std::thread::sleep(Duration::from_secs(3));
    let pid = idle.id().to_string();
    let before = process_cpu(&pid);
    std::thread::sleep(IDLE_FOR);
    let cpu = (process_cpu(&pid) - before) / IDLE_FOR.as_secs_f64() * 100.0;
    let rss_kib = status_kib(&pid, "VmRSS");
    for child in [&mut seed, &mut idle] {
        let _ = child.kill();
        let _ = child.wait();
    }
    (rss_kib / 1024.0, cpu)
}

/// Subscriber nodes in the main setup.
const SUBSCRIBERS: usize = 3;

/// A publisher and `subscribers` subscriber instances of the named bus, each in a zone
/// of its own, met.
async fn setup(name: &'static str, subscribers: usize) -> Option<Setup> {
    let zones = &ZONES[..=subscribers];
    match name {
        "mesh" => Some(mesh(zones).await),
        #[cfg(feature = "nats")]
        "nats" => brokers(name, Some("nats-server"), zones).await,
        #[cfg(feature = "redis")]
        "redis" => brokers(name, Some("redis-server"), zones).await,
        #[cfg(feature = "kafka")]
        "kafka" => brokers(name, Some("tansu"), zones).await,
        _ => None,
    }
}

/// Keys per second to each of three subscriptions of one `InMemoryBus`, for 16- and
/// 64-byte keys, and CPU seconds per million deliveries: the publish loop, the
/// subscription registry, the events and the counting subscribers of this harness,
/// without any transport. Every bus here delivers through the same registry and
/// events, so none can beat it.
async fn in_process_floor() -> ([f64; 2], f64) {
    let bus = InMemoryBus::with_config(InMemoryConfig {
        subscriber_capacity: burst() * 2,
        ..InMemoryConfig::default()
    });
    let setup = Setup {
        name: "in-process",
        publisher: Arc::new(bus.clone()),
        subscribers: (0..SUBSCRIBERS)
            .map(|_| Arc::new(bus.clone()) as Arc<dyn Bus>)
            .collect(),
        broker_process: None,
    };
    let before = process_cpu("self");
    let (rates, delivered, _) = throughput_runs(&setup).await;
    let cpu = (process_cpu("self") - before) * 1e6 / delivered.max(1) as f64;
    (rates, cpu)
}

/// The throughput workload for both key sizes: keys per second to each subscriber
/// (16- and 64-byte keys), deliveries, and deliveries missing.
async fn throughput_runs(setup: &Setup) -> ([f64; 2], u64, u64) {
    let mut rates = [0.0; 2];
    let (mut delivered, mut missing) = (0, 0);
    for (slot, key_len) in [16, 64].into_iter().enumerate() {
        let (rate, got, lacking) = throughput(setup, key_len, slot).await;
        rates[slot] = rate;
        delivered += got;
        missing += lacking;
    }
    (rates, delivered, missing)
}

async fn mesh(zones: &[&str]) -> Setup {
    let config = |zone: &str, seeds: &[SocketAddr]| {
        let mut config = MeshConfig::new("127.0.0.1:0".parse().unwrap());
        config.zone = Zone::new(zone).unwrap();
        config.seeds = seeds.to_vec();
        config.membership = MembershipConfig::local();
        // Room for a whole burst, so a subscriber never overflows into a resync.
        config.subscriber_capacity = burst() * 2;
        config
    };
    let publisher = MeshBus::bind(config(zones[0], &[])).await.unwrap();
    let seed = [publisher.local_addr()];
    let mut subscribers: Vec<Arc<dyn Bus>> = Vec::new();
    for zone in &zones[1..] {
        subscribers.push(Arc::new(MeshBus::bind(config(zone, &seed)).await.unwrap()));
    }
    let setup = Setup {
        name: "mesh",
        publisher: Arc::new(publisher),
        subscribers,
        broker_process: None,
    };
    wait_for_peers(&setup).await;
    setup
}

#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
async fn brokers(
    name: &'static str,
    process: Option<&'static str>,
    zones: &[&str],
) -> Option<Setup> {
    let topic = format!("syncbus.bench.{:x}", getrandom::u64().unwrap_or(1));
    let mut buses: Vec<Arc<dyn Bus>> = Vec::new();
    for &zone in zones {
        let mut config = syncbus::BrokerConfig::new(Zone::new(zone).unwrap());
        config.subscriber_capacity = burst() * 2;
        config.presence_interval = Duration::from_millis(200);
        config.peer_timeout = Duration::from_secs(2);
        if let Some(window) = batch_window() {
            config.batch_window = window;
        }
        let bus = match name {
            #[cfg(feature = "nats")]
            "nats" => {
                let client = async_nats::connect("nats://127.0.0.1:4222").await.ok()?;
                syncbus::BrokerBus::nats(client, &topic, config)
                    .await
                    .ok()?
            }
            #[cfg(feature = "redis")]
            "redis" => {
                let client = redis::Client::open("redis://127.0.0.1:6379/").ok()?;
                syncbus::BrokerBus::redis(client, &topic, config)
                    .await
                    .ok()?
            }
            #[cfg(feature = "kafka")]
            "kafka" => {
                let brokers = vec!["127.0.0.1:9092".to_owned()];
                syncbus::BrokerBus::kafka(brokers, &topic, config)
                    .await
                    .ok()?
            }
            _ => return None,
        };
        buses.push(Arc::new(bus));
    }
    let publisher = buses.remove(0);
    let setup = Setup {
        name,
        publisher,
        subscribers: buses,
        broker_process: process,
    };
    wait_for_peers(&setup).await;
    Some(setup)
}

async fn wait_for_peers(setup: &Setup) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let others = setup.subscribers.len();
    let all = || {
        setup.publisher.peers().len() == others
            && setup.subscribers.iter().all(|s| s.peers().len() == others)
    };
    while !all() {
        assert!(Instant::now() < deadline, "{}: peers never met", setup.name);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn measure(setup: Setup) -> Row {
    let mut row = Row {
        bus: setup.name,
        ..Row::default()
    };
    let cpu_before = (
        process_cpu("self"),
        setup.broker_process.and_then(named_process_cpu),
    );
    let peak_reset = reset_peak_memory();
    let resident_before = status_kib("self", "VmRSS");
    let (rates, delivered, missing) = throughput_runs(&setup).await;
    row.throughput = rates;
    row.missing = missing;
    if peak_reset {
        let instances = 1 + setup.subscribers.len();
        let growth = (status_kib("self", "VmHWM") - resident_before).max(0.0);
        row.peak_mb_per_instance = Some(growth / 1024.0 / instances as f64);
    }
    row.broker_mb = setup
        .broker_process
        .and_then(named_pid)
        .map(|pid| status_kib(&pid, "VmRSS") / 1024.0);
    let per_million = 1e6 / delivered.max(1) as f64;
    row.cpu_per_million = (process_cpu("self") - cpu_before.0) * per_million;
    row.broker_cpu_per_million = match (
        cpu_before.1,
        setup.broker_process.and_then(named_process_cpu),
    ) {
        (Some(before), Some(after)) => Some((after - before) * per_million),
        _ => None,
    };
    row.latency = latency(&setup).await;
    row.replicas = awaited(&setup, false).await;
    row.zones = awaited(&setup, true).await;
    shut_down(&setup).await;
    row
}

/// The latency workload on its own, then the setup shut down.
async fn latency_alone(setup: Setup) -> [Duration; 3] {
    let measured = latency(&setup).await;
    shut_down(&setup).await;
    measured
}

async fn shut_down(setup: &Setup) {
    for bus in setup.subscribers.iter().chain([&setup.publisher]) {
        let _ = bus.shutdown().await;
    }
}

/// Publishes `burst()` keys as fast as the bus takes them; returns keys per second per
/// subscriber (the slowest subscriber's), deliveries, and deliveries missing.
async fn throughput(setup: &Setup, key_len: usize, run: usize) -> (f64, u64, u64) {
    let keys = burst();
    let prefix = format!("t{run}:");
    // One buffer rewritten per key: building the keys costs the harness no allocation.
    let write_key = |key: &mut String, i: usize| {
        use std::fmt::Write as _;
        key.clear();
        let _ = write!(key, "{prefix}{i}");
        while key.len() < key_len {
            key.push('.');
        }
    };
    let mut counters = Vec::new();
    for subscriber in &setup.subscribers {
        let mut sub = subscriber.subscribe_prefix(&prefix).await.unwrap();
        counters.push(tokio::spawn(async move {
            // Drains what is queued without a timer or a clock read per event, so the
            // harness costs little next to the bus; waits (bounded) only when empty.
            let mut got = 0u64;
            let mut last = Instant::now();
            let until = Instant::now() + BURST_DEADLINE;
            while got < keys as u64 {
                while let Ok(event) = sub.try_recv() {
                    got += u64::from(!event.is_resync());
                }
                last = Instant::now();
                if got >= keys as u64 {
                    break;
                }
                let wait = until.saturating_duration_since(last);
                match tokio::time::timeout(wait, sub.recv()).await {
                    Ok(Some(event)) => got += u64::from(!event.is_resync()),
                    _ => break,
                }
            }
            (got, last)
        }));
    }
    let started = Instant::now();
    let mut key = String::with_capacity(key_len + 32);
    for i in 0..keys {
        if started.elapsed() > BURST_DEADLINE {
            break;
        }
        write_key(&mut key, i);
        let _ = setup
            .publisher
            .publish(&key, PublishOptions::default())
            .await;
    }
    let mut slowest = 0.0f64;
    let (mut delivered, mut missing) = (0, 0);
    for counter in counters {
        let (got, last) = counter.await.unwrap();
        delivered += got;
        missing += keys as u64 - got;
        let seconds = last.duration_since(started).as_secs_f64().max(1e-9);
        let rate = got as f64 / seconds;
        slowest = if slowest == 0.0 {
            rate
        } else {
            slowest.min(rate)
        };
    }
    (slowest, delivered, missing)
}

/// Publish-to-delivery at one subscriber, at `LATENCY_RATE` per second.
async fn latency(setup: &Setup) -> [Duration; 3] {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut sub = setup.subscribers[0].subscribe_prefix("l:").await.unwrap();
    let seen = Arc::clone(&sent);
    let collector = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        let until = Instant::now() + Duration::from_secs(30);
        while samples.len() < LATENCY_SAMPLES {
            let wait = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(wait, sub.recv()).await {
                Ok(Some(event)) => {
                    let at = Instant::now();
                    if let Some(sent) = seen.lock().unwrap().remove(&event.key) {
                        samples.push(at - sent);
                    }
                }
                _ => break,
            }
        }
        samples
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    for i in 0..LATENCY_SAMPLES {
        tick.tick().await;
        let key = format!("l:{i}");
        sent.lock().unwrap().insert(key.clone(), Instant::now());
        let _ = setup
            .publisher
            .publish(&key, PublishOptions::default())
            .await;
    }
    percentiles(collector.await.unwrap())
}

/// `AWAITED` awaited publishes, one after another: p50 and p99 of their completion.
async fn awaited(setup: &Setup, zones: bool) -> [Duration; 2] {
    let mut samples = Vec::with_capacity(AWAITED);
    for i in 0..AWAITED {
        let options = PublishOptions::default().timeout(Duration::from_secs(5));
        let started = Instant::now();
        let key = format!("a:{i}");
        let done = if zones {
            setup
                .publisher
                .publish_and_await_topology(&key, 3, options)
                .await
                .is_ok()
        } else {
            setup
                .publisher
                .publish_and_await(&key, 3, options)
                .await
                .is_ok()
        };
        if done {
            samples.push(started.elapsed());
        }
    }
    let [p50, p99, _] = percentiles(samples);
    [p50, p99]
}

fn percentiles(mut samples: Vec<Duration>) -> [Duration; 3] {
    if samples.is_empty() {
        return [Duration::MAX; 3];
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.99), at(0.999)]
}

/// The raw UDP floor on loopback.
struct Floor {
    datagrams_per_second: f64,
    /// With segmentation offload, if the kernel offers it.
    offload: Option<Offload>,
    keys_per_datagram: [usize; 2],
    round_trip: [Duration; 3],
    /// One-way through tokio to one receiver: see [`async_one_way`].
    async_one_way: [Duration; 3],
    /// The same, sent to as many receivers as the workloads have subscriber nodes.
    async_one_way_fan_out: [Duration; 3],
    /// Throughput without transport, and its CPU cost: see [`in_process_floor`].
    in_process: ([f64; 2], f64),
}

/// The floor with segmentation offload: GSO on send, GRO on receive.
struct Offload {
    datagrams_per_second: f64,
    /// Datagrams handed to the kernel per `sendmsg`.
    per_send: usize,
    /// Datagrams the receiving socket may be handed per `recvmsg`, at most.
    per_receive: usize,
}

/// A loopback socket with the mesh's default buffers (4 MiB each way), so the floor
/// absorbs the bursts the mesh's own socket does.
fn floor_socket() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let buffers = MeshConfig::new(socket.local_addr().unwrap()).socket_buffer;
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(buffers);
    let _ = sock.set_send_buffer_size(buffers);
    socket
}

fn udp_floor(runtime: &tokio::runtime::Runtime) -> Floor {
    let receiver = floor_socket();
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let to = receiver.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while receiver.recv(&mut buf).is_ok() {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    let sender = floor_socket();
    let datagram = [7u8; 1400];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let _ = sender.send_to(&datagram, to);
    }
    let elapsed = started.elapsed().as_secs_f64();
    reading.join().unwrap();
    let received = count.load(Ordering::Relaxed) as f64;

    Floor {
        datagrams_per_second: received / elapsed,
        offload: offload_floor(),
        keys_per_datagram: [16, 64].map(keys_per_datagram),
        round_trip: ping_pong(),
        async_one_way: runtime.block_on(async_one_way(1)),
        async_one_way_fan_out: runtime.block_on(async_one_way(SUBSCRIBERS)),
        in_process: runtime.block_on(in_process_floor()),
    }
}

/// The least any bus on this tokio runtime can do for one-way latency: a task sends a
/// small datagram at the latency workload's rate to each of `receivers` sockets, the
/// measured one first; a receiving task per socket takes it off, and the first passes
/// it down a channel to a subscriber task, which notes the time. Two task wake-ups and
/// a loopback hop; with three receivers, also the work of the other two, as with the
/// three subscriber nodes of the latency workload (all get every datagram, one has the
/// subscription).
async fn async_one_way(receivers: usize) -> [Duration; 3] {
    let base = Instant::now();
    let (deliver, mut delivered) = tokio::sync::mpsc::channel::<u64>(1024);
    let mut destinations = Vec::new();
    let mut readers = Vec::new();
    for index in 0..receivers {
        let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        destinations.push(receiver.local_addr().unwrap());
        let deliver = (index == 0).then(|| deliver.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(Ok(len)) =
                tokio::time::timeout(Duration::from_secs(1), receiver.recv(&mut buf)).await
            {
                let Ok(sent) = <[u8; 8]>::try_from(&buf[..len.min(8)]) else {
                    continue;
                };
                if let Some(deliver) = &deliver
                    && deliver.send(u64::from_le_bytes(sent)).await.is_err()
                {
                    break;
                }
            }
        }));
    }
    drop(deliver);
    let subscriber = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        while let Some(sent) = delivered.recv().await {
            samples.push(base.elapsed().saturating_sub(Duration::from_nanos(sent)));
        }
        samples
    });
    let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    for _ in 0..LATENCY_SAMPLES {
        tick.tick().await;
        let sent = base.elapsed().as_nanos() as u64;
        for to in &destinations {
            let _ = sender.send_to(&sent.to_le_bytes(), to).await;
        }
    }
    for reader in readers {
        let _ = reader.await;
    }
    percentiles(subscriber.await.unwrap_or_default())
}

/// The same 1,400-byte datagrams, 46 per `sendmsg` (GSO; one send carries 64 KiB at
/// most) and received coalesced (GRO), through quinn-udp; `None` where the kernel
/// offers no GSO.
fn offload_floor() -> Option<Offload> {
    use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
    let sender = floor_socket();
    let sending = UdpSocketState::new((&sender).into()).ok()?;
    let per_send = sending.max_gso_segments().min(65_000 / 1400);
    if per_send < 2 {
        eprintln!("offload floor: no GSO; left out");
        return None;
    }
    let receiver = floor_socket();
    let receiving = UdpSocketState::new((&receiver).into()).ok()?;
    // quinn-udp makes the socket non-blocking; this reader blocks, with a timeout.
    receiver.set_nonblocking(false).ok()?;
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let per_receive = receiving.gro_segments();
    let to = receiver.local_addr().ok()?;
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    let sent_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::clone(&sent_all);
    let reading = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut meta = [RecvMeta::default()];
        loop {
            let mut bufs = [std::io::IoSliceMut::new(&mut buf)];
            match receiving.recv((&receiver).into(), &mut bufs, &mut meta) {
                Ok(filled) => {
                    let datagrams: usize = meta[..filled]
                        .iter()
                        .map(|m| m.len.div_ceil(m.stride.max(1)))
                        .sum();
                    counted.fetch_add(datagrams as u64, Ordering::Relaxed);
                }
                // A read timeout once the sender has stopped: all is in.
                Err(_) if done.load(Ordering::Relaxed) => break,
                Err(_) => {}
            }
        }
    });
    let contents = vec![7u8; 1400 * per_send];
    let transmit = Transmit {
        destination: to,
        ecn: None,
        contents: &contents,
        segment_size: Some(1400),
        src_ip: None,
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let _ = sending.try_send((&sender).into(), &transmit);
    }
    let elapsed = started.elapsed().as_secs_f64();
    sent_all.store(true, Ordering::Relaxed);
    reading.join().ok()?;
    let received = count.load(Ordering::Relaxed);
    if received == 0 {
        eprintln!("offload floor: nothing arrived; left out");
        return None;
    }
    Some(Offload {
        datagrams_per_second: received as f64 / elapsed,
        per_send,
        per_receive,
    })
}

/// How many keys of `len` bytes one full 1,400-byte mesh datagram holds, uncompressed.
fn keys_per_datagram(len: usize) -> usize {
    let mut entry = Vec::new();
    let key: String = "k".repeat(len);
    syncbus_mesh::wire::encode_entry(&syncbus::Invalidation::key(key), false, &mut entry);
    syncbus_mesh::wire::max_entry_len(1400) / entry.len()
}

fn ping_pong() -> [Duration; 3] {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    echo.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let echoing = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok((len, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..len], from);
        }
    });
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut samples = Vec::with_capacity(10_000);
    let mut buf = [0u8; 256];
    for _ in 0..10_000 {
        let started = Instant::now();
        client.send_to(&[1u8; 64], echo_addr).unwrap();
        if client.recv(&mut buf).is_ok() {
            samples.push(started.elapsed());
        }
    }
    drop(client);
    echoing.join().unwrap();
    percentiles(samples)
}

/// CPU seconds (user and system) of a process, from /proc.
fn process_cpu(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of the first process whose command is `name`.
fn named_process_cpu(name: &str) -> Option<f64> {
    named_pid(name).map(|pid| process_cpu(&pid))
}

/// The first process whose command is `name`.
fn named_pid(name: &str) -> Option<String> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return Some(pid);
        }
    }
    None
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, the resident memory; `VmHWM`, its
/// peak), in KiB; zero where there is none.
fn status_kib(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.split(':').next() == Some(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0.0)
}

/// Starts a new peak of this process's resident memory (Linux: writing 5 to
/// `clear_refs` sets `VmHWM` back to `VmRSS`); false where that is not possible.
fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn ms(d: Duration) -> String {
    if d == Duration::MAX {
        return "-".into();
    }
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn print_report(floor: &Floor, rows: &[Row]) {
    let mesh = rows.iter().find(|r| r.bus == "mesh");
    println!("## Raw UDP floor (loopback)\n");
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| 1,400-byte datagrams per second | {:.0} |",
        floor.datagrams_per_second
    );
    for (i, len) in [16, 64].into_iter().enumerate() {
        println!(
            "| keys per second if full, {len}-byte keys ({} per datagram) | {:.0} |",
            floor.keys_per_datagram[i],
            floor.datagrams_per_second * floor.keys_per_datagram[i] as f64
        );
    }
    if let Some(offload) = &floor.offload {
        println!(
            "| 1,400-byte datagrams per second, GSO ({} per sendmsg) and GRO (up to {} per recvmsg) | {:.0} |",
            offload.per_send, offload.per_receive, offload.datagrams_per_second
        );
        for (i, len) in [16, 64].into_iter().enumerate() {
            println!(
                "| keys per second if full with offload, {len}-byte keys | {:.0} |",
                offload.datagrams_per_second * floor.keys_per_datagram[i] as f64
            );
        }
    }
    let ([in_16, in_64], in_cpu) = floor.in_process;
    println!(
        "| in process, no transport (an `InMemoryBus`, three subscriptions), keys per second to each, 16 / 64-byte keys | {in_16:.0} / {in_64:.0} ({in_cpu:.2} CPU s per million deliveries) |"
    );
    let [p50, p99, p999] = floor.round_trip;
    println!(
        "| round trip p50 / p99 / p99.9 (ms) | {} / {} / {} |",
        ms(p50),
        ms(p99),
        ms(p999)
    );
    let [p50, p99, p999] = floor.async_one_way;
    println!(
        "| one way through tokio (sending task, receiving task, channel, subscriber task) at {LATENCY_RATE}/s, p50 / p99 / p99.9 (ms) | {} / {} / {} |",
        ms(p50),
        ms(p99),
        ms(p999)
    );
    let [p50, p99, p999] = floor.async_one_way_fan_out;
    println!(
        "| the same, each datagram sent to {SUBSCRIBERS} receiving tasks, measured at the first, p50 / p99 / p99.9 (ms) | {} / {} / {} |\n",
        ms(p50),
        ms(p99),
        ms(p999)
    );

    println!("## Throughput: keys per second delivered to each subscriber\n");
    println!(
        "| bus | 16-byte keys | 64-byte keys | mesh is x faster (16 / 64) | missing | CPU s per million (this process) | broker CPU s per million |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        let ratio = |i: usize| {
            mesh.map_or("-".into(), |m| {
                format!("{:.1}", m.throughput[i] / row.throughput[i].max(1e-9))
            })
        };
        println!(
            "| {} | {:.0} | {:.0} | {} / {} | {} | {:.2} | {} |",
            row.bus,
            row.throughput[0],
            row.throughput[1],
            ratio(0),
            ratio(1),
            row.missing,
            row.cpu_per_million,
            row.broker_cpu_per_million
                .map_or("-".into(), |c| format!("{c:.2}")),
        );
    }
    if let Some(mesh) = mesh {
        let [in_16, in_64] = floor.in_process.0;
        println!(
            "\nMesh at 16 / 64-byte keys: {:.0}% / {:.0}% of the in-process floor.",
            100.0 * mesh.throughput[0] / in_16.max(1e-9),
            100.0 * mesh.throughput[1] / in_64.max(1e-9)
        );
        for (i, len) in [16, 64].into_iter().enumerate() {
            let full = floor.datagrams_per_second * floor.keys_per_datagram[i] as f64;
            println!(
                "\nMesh at {len}-byte keys: {:.1}% of the floor if datagrams were packed full.",
                100.0 * mesh.throughput[i] / full
            );
            if let Some(offload) = &floor.offload {
                let full = offload.datagrams_per_second * floor.keys_per_datagram[i] as f64;
                println!(
                    "Mesh at {len}-byte keys: {:.1}% of the offload floor if packed full.",
                    100.0 * mesh.throughput[i] / full
                );
            }
        }
    }
    println!(
        "\n## Memory during the throughput runs ({} invalidations, each to three subscribers)\n",
        2 * burst()
    );
    println!("| bus | peak growth per instance, MB (this process) | broker resident after, MB |");
    println!("| --- | --- | --- |");
    for row in rows {
        let mb = |v: Option<f64>| v.map_or("-".into(), |mb| format!("{mb:.1}"));
        println!(
            "| {} | {} | {} |",
            row.bus,
            mb(row.peak_mb_per_instance),
            mb(row.broker_mb)
        );
    }
    println!("\n## Latency: publish to delivery at {LATENCY_RATE} per second (ms)\n");
    println!(
        "At one subscriber, with the publisher and one subscriber node (as in the floors: \
         one datagram or message per publish, one receiver), and with the three subscriber \
         nodes of the other workloads (the publisher's datagrams, or the broker's \
         messages, go to all three).\n"
    );
    println!(
        "| bus | subscriber nodes | p50 | p99 | p99.9 | p99 vs half the UDP round trip p99 | p99 vs one way through tokio to as many receivers, p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let half_rtt = floor.round_trip[1].as_secs_f64() / 2.0;
    for row in rows {
        let cases = [
            (1, row.latency_pair, floor.async_one_way),
            (SUBSCRIBERS, row.latency, floor.async_one_way_fan_out),
        ];
        for (nodes, latency, through_tokio) in cases {
            let p99 = latency[1].as_secs_f64();
            println!(
                "| {} | {nodes} | {} | {} | {} | {:.1}x | {:.1}x |",
                row.bus,
                ms(latency[0]),
                ms(latency[1]),
                ms(latency[2]),
                p99 / half_rtt,
                p99 / through_tokio[1].as_secs_f64().max(1e-9)
            );
        }
    }
    println!("\n## Awaited publishes, one at a time (ms)\n");
    println!(
        "| bus | 3 replicas p50 | p99 | 3 zones p50 | p99 | replicas p99 vs own one-way p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.2}x |",
            row.bus,
            ms(row.replicas[0]),
            ms(row.replicas[1]),
            ms(row.zones[0]),
            ms(row.zones[1]),
            row.replicas[1].as_secs_f64() / row.latency[1].as_secs_f64().max(1e-9)
        );
    }
}

/// Where the chart goes, beside the build.
const CHART: &str = "target/compare.svg";

/// Bars of throughput per bus (16- and 64-byte keys), and of latency p99 per bus on a
/// log scale, as an SVG file.
fn draw_chart(rows: &[Row]) -> Result<&'static str, Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(CHART, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(480);
    let names: Vec<&str> = rows.iter().map(|r| r.bus).collect();
    let most = rows
        .iter()
        .flat_map(|r| r.throughput)
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&left)
        .caption("keys/s to each subscriber", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..rows.len() as f64, 0.0..most * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| names.get(*x as usize).copied().unwrap_or("").to_owned())
        .draw()?;
    for (size, color) in [(0, BLUE), (1, RED)] {
        let bars = rows.iter().enumerate().map(|(i, row)| {
            let x = i as f64 + 0.15 + 0.35 * size as f64;
            Rectangle::new([(x, 0.0), (x + 0.3, row.throughput[size])], color.filled())
        });
        let label = if size == 0 {
            "16-byte keys"
        } else {
            "64-byte keys"
        };
        chart
            .draw_series(bars)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;

    let slowest = rows
        .iter()
        .map(|r| r.latency[1].as_secs_f64() * 1e3)
        .filter(|ms| ms.is_finite())
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption("latency p99 (ms, log scale)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..rows.len() as f64, (0.01..slowest * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| names.get(*x as usize).copied().unwrap_or("").to_owned())
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, row)| {
        let p99 = (row.latency[1].as_secs_f64() * 1e3).max(0.01);
        Rectangle::new(
            [(i as f64 + 0.25, 0.01), (i as f64 + 0.75, p99)],
            GREEN.filled(),
        )
    }))?;
    root.present()?;
    Ok(CHART)
}
