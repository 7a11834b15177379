//! `syncbus node`: one mesh node driven by commands on stdin.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use serde_json::{Value, json};
use syncbus::{
    Bus, Event, EventKind, MembershipConfig, MeshBus, MeshConfig, MulticastDiscovery, Peer,
    PublishOptions, Subscription, Zone,
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
    /// Events each subscription buffers before it overflows into a resync.
    #[arg(long, default_value_t = 65_536)]
    pub(crate) subscriber_capacity: usize,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub(crate) json: bool,
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
    fn config(&self) -> MeshConfig {
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
        config.multicast = self
            .multicast
            .map(|group| MulticastDiscovery::new(group, self.multicast_interface));
        config
    }
}

/// A command read from stdin.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Sub(String),
    Unsub(String),
    SubLease(String),
    Pub(String),
    Revoke(String),
    Await(usize, String),
    Zones(usize, String),
    Members,
    Metrics,
    Help,
    Quit,
}

const HELP: &str = "commands: sub KEY | sub PREFIX* | unsub KEY | sublease ID | pub KEY | \
                    revoke ID | await N KEY | zones M KEY | members | metrics | help | quit";

fn parse(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let count = |text: &str| {
        text.parse::<usize>()
            .map_err(|_| format!("{text:?} is not a count"))
    };
    match words.as_slice() {
        ["sub", key] => Ok(Command::Sub((*key).to_owned())),
        ["unsub", key] => Ok(Command::Unsub((*key).to_owned())),
        ["sublease", id] => Ok(Command::SubLease((*id).to_owned())),
        ["pub", key] => Ok(Command::Pub((*key).to_owned())),
        ["revoke", id] => Ok(Command::Revoke((*id).to_owned())),
        ["await", n, key] => Ok(Command::Await(count(n)?, (*key).to_owned())),
        ["zones", m, key] => Ok(Command::Zones(count(m)?, (*key).to_owned())),
        ["members"] => Ok(Command::Members),
        ["metrics"] => Ok(Command::Metrics),
        ["help"] => Ok(Command::Help),
        ["quit"] => Ok(Command::Quit),
        _ => Err(format!("cannot parse {line:?}; {HELP}")),
    }
}

/// Runs the node until `quit`, Ctrl-C or SIGTERM.
pub(crate) async fn run(args: NodeArgs) -> Result<(), String> {
    let (out, writer) = Output::start(args.json);
    let bus = MeshBus::bind(args.config())
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
    subscriptions: HashMap<String, JoinHandle<()>>,
}

impl Commands {
    /// Reads commands until `quit` or a signal. The end of stdin is not a reason to
    /// stop: a node started with stdin closed runs until interrupted.
    async fn serve(&mut self) {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let mut stdin_open = true;
        let mut terminate = terminate_signal();
        loop {
            tokio::select! {
                line = lines.next_line(), if stdin_open => match line {
                    Ok(Some(line)) if line.trim().is_empty() => {}
                    Ok(Some(line)) => {
                        if self.handle(&line).await {
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

    /// Carries out one command; true for `quit`.
    async fn handle(&mut self, line: &str) -> bool {
        let command = match parse(line) {
            Ok(command) => command,
            Err(message) => {
                self.out.print("error", json!({"message": message})).await;
                return false;
            }
        };
        let options = PublishOptions::default();
        match command {
            Command::Sub(key) => self.subscribe(key).await,
            Command::SubLease(id) => self.subscribe(format!("lease {id}")).await,
            Command::Unsub(key) => {
                let removed = self.subscriptions.remove(&key).map(|task| task.abort());
                let kind = if removed.is_some() {
                    "unsubscribed"
                } else {
                    "error"
                };
                self.out.print(kind, json!({"key": key})).await;
            }
            Command::Pub(key) => {
                let outcome = self.bus.publish(&key, options).await;
                self.report("published", &key, outcome.map(|()| Value::Null))
                    .await;
            }
            Command::Revoke(id) => {
                let outcome = self.bus.revoke_lease(&id, options).await;
                self.report("revoked", &id, outcome.map(|()| Value::Null))
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
                let metrics = format!("{:?}", self.bus.metrics());
                self.out.print("metrics", json!({"metrics": metrics})).await;
            }
            Command::Help => self.out.print("help", json!({"message": HELP})).await,
            Command::Quit => return true,
        }
        false
    }

    async fn subscribe(&mut self, topic: String) {
        let subscription = if let Some(id) = topic.strip_prefix("lease ") {
            self.bus.subscribe_lease(id).await
        } else if let Some(prefix) = topic.strip_suffix('*') {
            self.bus.subscribe_prefix(prefix).await
        } else {
            self.bus.subscribe(&topic).await
        };
        match subscription {
            Ok(subscription) => {
                let task = tokio::spawn(forward(subscription, self.out.clone()));
                if let Some(previous) = self.subscriptions.insert(topic.clone(), task) {
                    previous.abort();
                }
                self.out.print("subscribed", json!({"key": topic})).await;
            }
            Err(error) => self.report("subscribed", &topic, Err(error)).await,
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
                let zones: Vec<String> = acked.zones.iter().map(ToString::to_string).collect();
                let micros = started.elapsed().as_micros() as u64;
                json!({"replicas": acked.replicas, "zones": zones, "latency_us": micros})
            });
            let what = if zones { "zones" } else { "await" };
            report(&out, what, &key, outcome).await;
        });
    }

    async fn report(&self, what: &str, key: &str, outcome: Result<Value, syncbus::Error>) {
        report(&self.out, what, key, outcome).await;
    }
}

async fn report(out: &Output, what: &str, key: &str, outcome: Result<Value, syncbus::Error>) {
    match outcome {
        Ok(details) => {
            let mut fields = json!({"key": key, "at_ns": unix_nanos()});
            if let (Value::Object(fields), Value::Object(details)) = (&mut fields, details) {
                fields.extend(details);
            }
            out.print(what, fields).await;
        }
        Err(error) => {
            let fields = json!({"command": what, "key": key, "message": error.to_string()});
            out.print("error", fields).await;
        }
    }
}

/// Prints every event of one subscription.
async fn forward(mut subscription: Subscription, out: Output) {
    while let Some(event) = subscription.recv().await {
        out.print("event", event_json(&event)).await;
    }
}

fn event_json(event: &Event) -> Value {
    let kind = match &event.kind {
        EventKind::Invalidate => "invalidate".to_owned(),
        EventKind::LeaseRevoked => "lease_revoked".to_owned(),
        EventKind::Resync(reason) => format!("resync ({reason:?})"),
        other => format!("{other:?}"),
    };
    json!({
        "kind": kind,
        "key": event.key,
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
                    let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
                    let message = format!(
                        "no seed has answered after {}s; still announcing to {}",
                        ALONE_NOTICE.as_secs(),
                        seeds.join(", ")
                    );
                    out.print("waiting", json!({"message": message})).await;
                }
            }
        }
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
        assert_eq!(parse("sub user:*"), Ok(Command::Sub("user:*".into())));
        assert_eq!(parse("  pub k  "), Ok(Command::Pub("k".into())));
        assert_eq!(parse("await 3 k"), Ok(Command::Await(3, "k".into())));
        assert_eq!(parse("zones 2 k"), Ok(Command::Zones(2, "k".into())));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert!(parse("await many k").unwrap_err().contains("not a count"));
        assert!(parse("publish k").unwrap_err().contains("commands:"));
        assert!(parse("pub").is_err());
    }
}
