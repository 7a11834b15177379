//! `syncbus node`: one mesh node driven by commands on stdin.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use serde_json::{Value, json};
use syncbus::{
    Bus, ClusterKey, Encryption, Event, EventKind, MembershipConfig, MeshBus, MeshConfig, Metrics,
    MulticastDiscovery, Peer, PublishOptions, ResyncReason, SealMode, Subscription, Topic, Zone,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;

use crate::output::{Output, unix_nanos};

/// Timing presets for failure detection.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Preset {
    /// Nodes on one machine: detection within about a second.
    Local,
    /// A data-centre network: about 5 s to declare a silent node down.
    Lan,
    /// Links between regions: slower and more patient.
    Wan,
}

#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    /// Local address to bind, as IP:PORT (port 0 picks a free one).
    #[arg(long, value_parser = parse_addr)]
    pub(crate) bind: SocketAddr,
    /// Address peers reach this node at; required when binding to 0.0.0.0.
    #[arg(long, value_parser = parse_addr)]
    pub(crate) advertise: Option<SocketAddr>,
    /// A node to join through; repeat for several.
    #[arg(long = "seed", value_name = "ADDR", value_parser = parse_addr)]
    pub(crate) seeds: Vec<SocketAddr>,
    /// This node's failure domain.
    #[arg(long, default_value = "default", value_parser = parse_zone)]
    pub(crate) zone: Zone,
    /// Cluster name; nodes of other clusters are ignored.
    #[arg(long, default_value = "syncbus")]
    pub(crate) cluster: String,
    /// Failure-detection timing.
    #[arg(long, value_enum, default_value = "lan")]
    pub(crate) preset: Preset,
    /// Also find peers by multicast on this IPv4 group, as IP:PORT.
    #[arg(long, value_name = "GROUP")]
    pub(crate) multicast: Option<SocketAddrV4>,
    /// The interface address to join the multicast group on.
    #[arg(long, default_value = "0.0.0.0", requires = "multicast")]
    pub(crate) multicast_interface: Ipv4Addr,
    /// Events each subscription buffers before it overflows into a resync. Larger than
    /// the library's default of 1,024, since a terminal or pipe reads in bursts.
    #[arg(long, default_value_t = 65_536)]
    pub(crate) subscriber_capacity: usize,
    /// Drop this fraction (0.0 to 1.0) of incoming datagrams, to watch repair at work.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) inbound_loss: f64,
    /// Seal every datagram with the cluster keys in this file: one key per line, 64
    /// hexadecimal digits (`syncbus keygen` makes one); the first seals, all open.
    /// Blank lines and lines starting with `#` are skipped.
    #[arg(long, value_name = "PATH")]
    pub(crate) key_file: Option<std::path::PathBuf>,
    /// With --key-file: what to do with plaintext. `open` sends plaintext and accepts
    /// both, `seal` sends sealed and accepts both, `require` refuses plaintext. A
    /// plaintext cluster moves to sealed by restarting every node with the key in
    /// `open`, then switching every node to `seal`, then to `require`.
    #[arg(long, value_enum, default_value = "require", requires = "key_file")]
    pub(crate) seal_mode: SealModeArg,
    /// Carry datagrams over QUIC with mutual TLS: this node's certificate chain (PEM).
    /// Needs --quic-key and --quic-trust; every node of the cluster must use QUIC.
    #[cfg(feature = "quic")]
    #[arg(long, value_name = "PATH", requires_all = ["quic_key", "quic_trust"])]
    pub(crate) quic_cert: Option<std::path::PathBuf>,
    /// The private key of --quic-cert (PEM).
    #[cfg(feature = "quic")]
    #[arg(long, value_name = "PATH", requires = "quic_cert")]
    pub(crate) quic_key: Option<std::path::PathBuf>,
    /// The certificate authorities peers' certificates must come from (PEM).
    #[cfg(feature = "quic")]
    #[arg(long, value_name = "PATH", requires = "quic_cert")]
    pub(crate) quic_trust: Option<std::path::PathBuf>,
    /// The name every node's certificate carries.
    #[cfg(feature = "quic")]
    #[arg(long, default_value = "syncbus", requires = "quic_cert")]
    pub(crate) quic_server_name: String,
    /// The smallest UDP payload every path carries (at least 1200); datagrams are sized
    /// to it.
    #[cfg(feature = "quic")]
    #[arg(long, default_value_t = 1200, requires = "quic_cert")]
    pub(crate) quic_mtu_floor: u16,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// [`SealMode`] on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SealModeArg {
    Open,
    Seal,
    Require,
}

/// The seal mode as the `seal` command and `--seal-mode` spell it; "none" without
/// encryption.
fn seal_mode_name(mode: Option<SealMode>) -> &'static str {
    match mode {
        None => "none",
        Some(SealMode::Open) => "open",
        Some(SealMode::Seal) => "seal",
        Some(SealMode::Require) => "require",
    }
}

impl From<SealModeArg> for SealMode {
    fn from(mode: SealModeArg) -> SealMode {
        match mode {
            SealModeArg::Open => SealMode::Open,
            SealModeArg::Seal => SealMode::Seal,
            SealModeArg::Require => SealMode::Require,
        }
    }
}

/// The keys in a key file, the first one the primary.
fn read_keys(path: &std::path::Path) -> Result<Vec<ClusterKey>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = ClusterKey::from_hex(line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), number + 1))?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(format!("the key file {} holds no key", path.display()));
    }
    Ok(keys)
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("expected IP:PORT, such as 127.0.0.1:7946 or [::1]:7946, got {text:?}")
    })
}

fn parse_zone(text: &str) -> Result<Zone, String> {
    Zone::new(text).map_err(|error| error.reason)
}

impl NodeArgs {
    fn config(&self) -> Result<MeshConfig, String> {
        let mut config = MeshConfig::new(self.bind);
        config.advertise = self.advertise;
        config.seeds = self.seeds.clone();
        config.zone = self.zone.clone();
        config.cluster = self.cluster.clone();
        config.membership = match self.preset {
            Preset::Local => MembershipConfig::local(),
            Preset::Lan => MembershipConfig::lan(),
            Preset::Wan => MembershipConfig::wan(),
        };
        config.subscriber_capacity = self.subscriber_capacity;
        config.inbound_loss = self.inbound_loss;
        config.multicast = self
            .multicast
            .map(|group| MulticastDiscovery::new(group, self.multicast_interface));
        #[cfg(feature = "quic")]
        if let (Some(cert), Some(key), Some(trust)) =
            (&self.quic_cert, &self.quic_key, &self.quic_trust)
        {
            let mut quic = syncbus::QuicConfig::new(cert, key, trust);
            quic.server_name = self.quic_server_name.clone();
            quic.mtu_floor = self.quic_mtu_floor;
            config.quic = Some(quic);
        }
        if let Some(path) = &self.key_file {
            config.encryption = Some(Encryption {
                keys: read_keys(path)?,
                mode: self.seal_mode.into(),
            });
        }
        Ok(config)
    }
}

/// A command read from stdin.
#[derive(Debug, PartialEq)]
enum Command {
    Sub(Topic),
    Unsub(Topic),
    Pub(String),
    Revoke(String),
    Await(usize, String),
    Zones(usize, String),
    Members,
    Metrics,
    Loss(f64),
    Keys(KeyringCommand),
    Help,
    Quit,
}

impl Command {
    /// The command's name, for error lines.
    fn name(&self) -> &'static str {
        match self {
            Command::Sub(_) => "sub",
            Command::Unsub(_) => "unsub",
            Command::Pub(_) => "pub",
            Command::Revoke(_) => "revoke",
            Command::Await(..) => "await",
            Command::Zones(..) => "zones",
            Command::Members => "members",
            Command::Metrics => "metrics",
            Command::Loss(_) => "loss",
            Command::Keys(_) => "key",
            Command::Help => "help",
            Command::Quit => "quit",
        }
    }
}

const HELP: &str = "commands: sub KEY | sub PREFIX* | sublease ID | unsub KEY | unsub PREFIX* | \
                    unsublease ID | pub KEY | revoke ID | await N KEY | zones M KEY | members | \
                    metrics | loss RATE | keys | key install|use|remove HEX | \
                    seal open|seal|require | help | quit";

/// A keyring command: `keys`, `key install|use|remove HEX`, `seal MODE`.
#[derive(Debug, PartialEq)]
enum KeyringCommand {
    List,
    Install(ClusterKey),
    Use(ClusterKey),
    Remove(ClusterKey),
    Mode(SealMode),
}

/// `line` with every word that could be a cluster key (32 or more hexadecimal digits)
/// replaced, so that a mistyped key command never prints the key.
fn redact_keys(line: &str) -> String {
    let words: Vec<&str> = line
        .split_whitespace()
        .map(|word| {
            let hexish = word.len() >= 32 && word.bytes().all(|b| b.is_ascii_hexdigit());
            if hexish { "<key>" } else { word }
        })
        .collect();
    words.join(" ")
}

/// `KEY` or `PREFIX*` as a topic.
fn key_topic(text: &str) -> Topic {
    match text.strip_suffix('*') {
        Some(prefix) => Topic::Prefix(prefix.to_owned()),
        None => Topic::Key(text.to_owned()),
    }
}

fn topic_name(topic: &Topic) -> String {
    match topic {
        Topic::Key(key) => key.clone(),
        Topic::Prefix(prefix) => format!("{prefix}*"),
        Topic::Lease(id) => format!("lease {id}"),
    }
}

fn parse(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let count = |text: &str| {
        text.parse::<usize>()
            .map_err(|_| format!("{text:?} is not a count"))
    };
    match words.as_slice() {
        ["sub", key] => Ok(Command::Sub(key_topic(key))),
        ["sublease", id] => Ok(Command::Sub(Topic::Lease((*id).to_owned()))),
        ["unsub", key] => Ok(Command::Unsub(key_topic(key))),
        ["unsublease", id] => Ok(Command::Unsub(Topic::Lease((*id).to_owned()))),
        ["pub", key] => Ok(Command::Pub((*key).to_owned())),
        ["revoke", id] => Ok(Command::Revoke((*id).to_owned())),
        ["await", n, key] => Ok(Command::Await(count(n)?, (*key).to_owned())),
        ["zones", m, key] => Ok(Command::Zones(count(m)?, (*key).to_owned())),
        ["members"] => Ok(Command::Members),
        ["metrics"] => Ok(Command::Metrics),
        ["loss", rate] => match rate.parse::<f64>() {
            Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(Command::Loss(rate)),
            _ => Err(format!("{rate:?} is not a fraction between 0 and 1")),
        },
        ["keys"] => Ok(Command::Keys(KeyringCommand::List)),
        ["key", verb, hex] => {
            let key = ClusterKey::from_hex(hex).map_err(|e| e.to_string())?;
            match *verb {
                "install" => Ok(Command::Keys(KeyringCommand::Install(key))),
                "use" => Ok(Command::Keys(KeyringCommand::Use(key))),
                "remove" => Ok(Command::Keys(KeyringCommand::Remove(key))),
                _ => Err(format!("{verb:?}: key install|use|remove HEX")),
            }
        }
        ["seal", mode] => match *mode {
            "open" => Ok(Command::Keys(KeyringCommand::Mode(SealMode::Open))),
            "seal" => Ok(Command::Keys(KeyringCommand::Mode(SealMode::Seal))),
            "require" => Ok(Command::Keys(KeyringCommand::Mode(SealMode::Require))),
            _ => Err(format!("{mode:?}: seal open|seal|require")),
        },
        ["help"] => Ok(Command::Help),
        ["quit"] => Ok(Command::Quit),
        _ => Err(format!("cannot parse {:?}; {HELP}", redact_keys(line))),
    }
}

/// Runs the node until `quit`, Ctrl-C or SIGTERM.
pub(crate) async fn run(args: NodeArgs) -> Result<(), String> {
    let (out, writer) = Output::start(args.json);
    let bus = MeshBus::bind(args.config()?)
        .await
        .map_err(|e| e.to_string())?;
    let member = bus.member().clone();
    out.print(
        "ready",
        json!({"id": member.id.to_string(), "addr": member.addr.to_string(), "zone": member.zone.as_str()}),
    )
    .await;
    let watcher = tokio::spawn(watch_members(bus.clone(), out.clone(), args.seeds.clone()));
    let mut node = Commands {
        bus: Arc::new(bus.clone()),
        out: out.clone(),
        subscriptions: HashMap::new(),
    };
    node.serve().await;
    watcher.abort();
    node.subscriptions.values().for_each(JoinHandle::abort);
    bus.shutdown().await.map_err(|e| e.to_string())?;
    out.print("stopped", json!({"at_ns": unix_nanos()})).await;
    drop(out);
    drop(node);
    let _ = writer.await;
    Ok(())
}

struct Commands {
    bus: Arc<MeshBus>,
    out: Output,
    subscriptions: HashMap<Topic, JoinHandle<()>>,
}

impl Commands {
    /// Reads commands until `quit` or a signal. The end of stdin is not a reason to
    /// stop: a node started with stdin closed runs until interrupted.
    async fn serve(&mut self) {
        let mut lines = BufReader::new(tokio::io::stdin()).split(b'\n');
        let mut stdin_open = true;
        let mut terminate = terminate_signal();
        loop {
            tokio::select! {
                line = lines.next_segment(), if stdin_open => match line {
                    Ok(Some(bytes)) => {
                        if self.handle_bytes(&bytes).await {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => stdin_open = false,
                },
                _ = tokio::signal::ctrl_c() => return,
                () = &mut terminate => return,
            }
        }
    }

    /// One line of stdin; true for `quit`.
    async fn handle_bytes(&mut self, bytes: &[u8]) -> bool {
        let Ok(line) = std::str::from_utf8(bytes) else {
            let message = "input line is not UTF-8; ignored";
            self.out.print("error", json!({"message": message})).await;
            return false;
        };
        let line = line.trim();
        !line.is_empty() && self.handle(line).await
    }

    /// Carries out one command; true for `quit`.
    async fn handle(&mut self, line: &str) -> bool {
        let command = match parse(line) {
            Ok(command) => command,
            Err(message) => {
                self.out.print("error", json!({"message": message})).await;
                return false;
            }
        };
        let name = command.name();
        let options = PublishOptions::default();
        match command {
            Command::Sub(topic) => self.subscribe(topic).await,
            Command::Unsub(topic) => self.unsubscribe(&topic).await,
            Command::Pub(key) => {
                // A publish on an idle node leaves before the call returns: the call's
                // start is when it was published.
                let called_ns = unix_nanos();
                let outcome = self.bus.publish(&key, options).await;
                report(
                    &self.out,
                    name,
                    "published",
                    &key,
                    outcome.map(|()| json!({"called_ns": called_ns})),
                )
                .await;
            }
            Command::Revoke(id) => {
                let outcome = self.bus.revoke_lease(&id, options).await;
                report(
                    &self.out,
                    name,
                    "revoked",
                    &id,
                    outcome.map(|()| Value::Null),
                )
                .await;
            }
            Command::Await(replicas, key) => self.spawn_awaited(replicas, key, false),
            Command::Zones(zones, key) => self.spawn_awaited(zones, key, true),
            Command::Members => {
                let members: Vec<Value> = self.bus.peers().iter().map(peer_json).collect();
                let healthy = self.bus.is_healthy();
                self.out
                    .print("members", json!({"healthy": healthy, "members": members}))
                    .await;
            }
            Command::Metrics => {
                self.out
                    .print("metrics", metrics_json(&self.bus.metrics()))
                    .await
            }
            Command::Loss(rate) => match self.bus.set_inbound_loss(rate).await {
                Ok(()) => {
                    self.out
                        .print("loss", json!({"rate": rate, "at_ns": unix_nanos()}))
                        .await
                }
                Err(failure) => error(&self.out, name, &failure.to_string()).await,
            },
            Command::Keys(change) => {
                let outcome = match change {
                    KeyringCommand::List => self.bus.key_fingerprints().await,
                    KeyringCommand::Install(key) => self.bus.install_key(key).await,
                    KeyringCommand::Use(key) => self.bus.use_key(&key).await,
                    KeyringCommand::Remove(key) => self.bus.remove_key(&key).await,
                    KeyringCommand::Mode(mode) => self.bus.set_seal_mode(mode).await,
                };
                match outcome {
                    Ok(keys) => {
                        let mode = self.bus.seal_mode().await.ok().flatten();
                        // Fingerprints only: a key never appears in the output. The
                        // first one seals.
                        let report = json!({
                            "keys": keys,
                            "primary": keys.first(),
                            "mode": seal_mode_name(mode),
                        });
                        self.out.print("keys", report).await
                    }
                    Err(failure) => error(&self.out, name, &failure.to_string()).await,
                }
            }
            Command::Help => self.out.print("help", json!({"message": HELP})).await,
            Command::Quit => return true,
        }
        false
    }

    async fn subscribe(&mut self, topic: Topic) {
        let name = topic_name(&topic);
        let subscription = match &topic {
            Topic::Key(key) => self.bus.subscribe(key).await,
            Topic::Prefix(prefix) => self.bus.subscribe_prefix(prefix).await,
            Topic::Lease(id) => self.bus.subscribe_lease(id).await,
        };
        match subscription {
            Ok(subscription) => {
                let task = tokio::spawn(forward(subscription, name.clone(), self.out.clone()));
                if let Some(previous) = self.subscriptions.insert(topic, task) {
                    previous.abort();
                }
                self.out.print("subscribed", json!({"key": name})).await;
            }
            Err(failure) => error(&self.out, "sub", &failure.to_string()).await,
        }
    }

    async fn unsubscribe(&mut self, topic: &Topic) {
        let name = topic_name(topic);
        match self.subscriptions.remove(topic) {
            Some(task) => {
                task.abort();
                self.out.print("unsubscribed", json!({"key": name})).await;
            }
            None => error(&self.out, "unsub", &format!("no subscription to {name}")).await,
        }
    }

    fn spawn_awaited(&self, goal: usize, key: String, zones: bool) {
        let bus = Arc::clone(&self.bus);
        let out = self.out.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let options = PublishOptions::default();
            let outcome = if zones {
                bus.publish_and_await_topology(&key, goal, options).await
            } else {
                bus.publish_and_await(&key, goal, options).await
            };
            let outcome = outcome.map(|acked| {
                let zones: Vec<&str> = acked.zones.iter().map(Zone::as_str).collect();
                let micros = started.elapsed().as_micros() as u64;
                json!({"replicas": acked.replicas, "zones": zones, "latency_us": micros})
            });
            let name = if zones { "zones" } else { "await" };
            report(&out, name, name, &key, outcome).await;
        });
    }
}

async fn error(out: &Output, command: &str, message: &str) {
    out.print("error", json!({"command": command, "message": message}))
        .await;
}

/// Prints `what` for a success, or an error line naming `command`.
async fn report(
    out: &Output,
    command: &str,
    what: &str,
    key: &str,
    outcome: Result<Value, syncbus::Error>,
) {
    match outcome {
        Ok(details) => {
            let mut fields = json!({"key": key, "at_ns": unix_nanos()});
            if let (Value::Object(fields), Value::Object(details)) = (&mut fields, details) {
                fields.extend(details);
            }
            out.print(what, fields).await;
        }
        Err(failure) => {
            let message = explain(command, &failure);
            let fields =
                json!({"command": command, "key": key, "message": message, "at_ns": unix_nanos()});
            out.print("error", fields).await;
        }
    }
}

/// The error's own words, plus what they mean for the commands whose goals count.
fn explain(command: &str, failure: &syncbus::Error) -> String {
    let syncbus::Error::QuorumNotSatisfied {
        required,
        available,
        published,
        ..
    } = failure
    else {
        return failure.to_string();
    };
    let unit = if command == "zones" {
        "zones"
    } else {
        "other nodes"
    };
    if !published {
        format!(
            "nothing was published: the goal needs {required} {unit}, and {available} can be reached"
        )
    } else {
        format!("published, but the goal was not met: {failure} (counting {unit})")
    }
}

/// Prints every event of one subscription.
async fn forward(mut subscription: Subscription, name: String, out: Output) {
    while let Some(event) = subscription.recv().await {
        out.print("event", event_json(&event, &name)).await;
    }
}

fn event_json(event: &Event, subscription: &str) -> Value {
    let (kind, reason, missed) = match &event.kind {
        EventKind::Invalidate => ("invalidate", None, None),
        EventKind::LeaseRevoked => ("lease_revoked", None, None),
        EventKind::Resync(ResyncReason::Overflow) => ("resync", Some("overflow"), None),
        EventKind::Resync(ResyncReason::Lost { missed }) => ("resync", Some("lost"), Some(*missed)),
        _ => ("other", None, None),
    };
    json!({
        "kind": kind,
        "key": event.key,
        "subscription": subscription,
        "reason": reason,
        "missed": missed,
        "origin": event.origin.map(|id| id.to_string()),
        "zone": event.zone.as_ref().map(Zone::as_str),
        "region": event.region,
        "at_ns": unix_nanos(),
    })
}

fn peer_json(peer: &Peer) -> Value {
    json!({
        "id": peer.id.to_string(),
        "addr": peer.addr.map(|a| a.to_string()),
        "zone": peer.zone.as_ref().map(Zone::as_str),
    })
}

fn metrics_json(m: &Metrics) -> Value {
    let d = &m.dropped;
    json!({
        "published": m.published, "coalesced": m.coalesced, "delivered": m.delivered,
        "acknowledged": m.acknowledged, "retransmitted": m.retransmitted,
        "repairs_requested": m.repairs_requested, "resyncs": m.resyncs,
        "member_updates_synced": m.member_updates_synced,
        "overflowed": m.overflowed, "missed": m.missed, "duplicates": m.duplicates,
        "datagrams_sent": m.datagrams_sent, "bytes_sent": m.bytes_sent,
        "datagrams_sent_in_zone": m.datagrams_sent_in_zone,
        "datagrams_sent_across_zones": m.datagrams_sent_across_zones,
        "datagrams_received": m.datagrams_received, "bytes_received": m.bytes_received,
        "send_errors": m.send_errors, "injected_drops": m.injected_drops,
        "awaits_in_flight": m.awaits_in_flight,
        "dropped": {
            "truncated": d.truncated, "bad_magic": d.bad_magic,
            "unsupported_version": d.unsupported_version,
            "unsupported_kind": d.unsupported_kind, "wrong_cluster": d.wrong_cluster,
            "oversize": d.oversize, "malformed": d.malformed, "corrupt": d.corrupt, "membership": d.membership,
            "own": d.own, "after_leave": d.after_leave, "unknown_peer": d.unknown_peer,
            "unauthenticated": d.unauthenticated, "replayed": d.replayed,
            "plaintext": d.plaintext,
        },
    })
}

/// How long a node given seeds may stay alone before it says so.
const ALONE_NOTICE: std::time::Duration = std::time::Duration::from_secs(3);

/// Prints a line for every member that comes or goes, and a notice when no seed has
/// answered for a while (a seed that is down is the commonest start-up surprise).
async fn watch_members(bus: MeshBus, out: Output, seeds: Vec<SocketAddr>) {
    let mut peers = bus.watch_peers();
    let mut known: BTreeMap<_, Peer> = BTreeMap::new();
    let mut notice = Box::pin(tokio::time::sleep(ALONE_NOTICE));
    let mut noticed = seeds.is_empty();
    loop {
        let current: BTreeMap<_, Peer> = peers
            .borrow_and_update()
            .iter()
            .map(|peer| (peer.id, peer.clone()))
            .collect();
        let at_ns = unix_nanos();
        let came = current.iter().filter(|(id, _)| !known.contains_key(*id));
        for (_, peer) in came {
            print_member(&out, "member_up", peer, at_ns).await;
        }
        let went = known.iter().filter(|(id, _)| !current.contains_key(*id));
        for (_, peer) in went {
            print_member(&out, "member_down", peer, at_ns).await;
        }
        known = current;
        tokio::select! {
            changed = peers.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = &mut notice, if !noticed => {
                noticed = true;
                if known.is_empty() {
                    let message = alone_message(&bus, &seeds);
                    out.print("waiting", json!({"message": message})).await;
                }
            }
        }
    }
}

/// Why a node given seeds is still alone, as far as its counters tell.
fn alone_message(bus: &MeshBus, seeds: &[SocketAddr]) -> String {
    let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
    let seeds = seeds.join(", ");
    let metrics = bus.metrics();
    let after = ALONE_NOTICE.as_secs();
    if metrics.dropped.wrong_cluster > 0 {
        format!(
            "after {after}s still alone: nodes answered from another cluster (check --cluster); seeds {seeds}"
        )
    } else if metrics.send_errors > 0 {
        format!(
            "after {after}s still alone: sending to the seeds fails (see RUST_LOG=debug); seeds {seeds}"
        )
    } else {
        format!("no seed has answered after {after}s; still announcing to {seeds}")
    }
}

async fn print_member(out: &Output, kind: &str, peer: &Peer, at_ns: u64) {
    let mut fields = peer_json(peer);
    fields["at_ns"] = at_ns.into();
    out.print(kind, fields).await;
}

/// Resolves on SIGTERM (Unix), so `kill` stops the node as gracefully as Ctrl-C.
fn terminate_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return Box::pin(async move {
                term.recv().await;
            });
        }
    }
    Box::pin(std::future::pending())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse("sub user:*"),
            Ok(Command::Sub(Topic::Prefix("user:".into())))
        );
        assert_eq!(
            parse("sublease l1"),
            Ok(Command::Sub(Topic::Lease("l1".into())))
        );
        assert_eq!(
            parse("unsublease l1"),
            Ok(Command::Unsub(Topic::Lease("l1".into())))
        );
        assert_eq!(parse("  pub k  "), Ok(Command::Pub("k".into())));
        assert_eq!(parse("await 3 k"), Ok(Command::Await(3, "k".into())));
        assert_eq!(parse("zones 2 k"), Ok(Command::Zones(2, "k".into())));
        assert_eq!(parse("loss 0.2"), Ok(Command::Loss(0.2)));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert!(parse("loss 2").unwrap_err().contains("fraction"));
        assert!(parse("await many k").unwrap_err().contains("not a count"));
        assert!(parse("publish k").unwrap_err().contains("commands:"));
        assert!(parse("pub").is_err());
    }

    #[test]
    fn a_mistyped_key_command_never_echoes_the_key() {
        let key = "0c322d64".repeat(8);
        for line in [
            format!("key {key}"),
            format!("key install {key} now"),
            format!("key add {key}"),
            format!("keys {key}"),
        ] {
            let error = parse(&line).unwrap_err();
            assert!(!error.contains("0c322d64"), "{error}");
        }
        assert_eq!(
            parse(&format!("key use {key}")),
            Ok(Command::Keys(KeyringCommand::Use(
                ClusterKey::from_hex(&key).unwrap()
            )))
        );
    }
}
