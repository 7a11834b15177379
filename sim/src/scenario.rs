//! Scenario files: what cluster to build, what to do to it, and what must hold.
//!
//! TOML, with durations written as strings such as `"250ms"`, `"30s"` or `"5m"`. A
//! mistake is reported with its line and column and the field at fault.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use syncbus_mesh::MembershipConfig;

/// A whole scenario.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Length and seed of the run.
    pub run: Run,
    /// Failure-detection timing.
    #[serde(default)]
    pub membership: Membership,
    /// Zones and nodes.
    pub topology: Topology,
    /// How every link behaves unless a fault says otherwise.
    #[serde(default)]
    pub network: Network,
    /// Faults, each with a start and (for windows) a duration.
    #[serde(default)]
    pub timeline: Vec<Fault>,
    /// What the application does.
    #[serde(default)]
    pub workload: Workload,
    /// What must hold.
    #[serde(default)]
    pub checks: Checks,
    /// Where `run` writes its report and picture.
    #[serde(default)]
    pub output: Output,
}

/// Where `run` writes `summary.json` and `timeline.svg`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// The directory, relative to where the command runs; `--out` overrides it.
    /// Default: `syncbus-sim-out/<scenario file name>-seed<seed>`.
    pub dir: Option<String>,
}

/// The most nodes one simulation runs.
pub const MAX_NODES: usize = 10_000;
/// The highest workload rate, in invalidations per simulated second.
pub const MAX_RATE: f64 = 1_000_000.0;

/// Length and seed of the run.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Simulated time to run for.
    pub duration: Span,
    /// Seed of every random stream; the command line can override it.
    #[serde(default)]
    pub seed: u64,
}

/// Membership timing: a preset of `syncbus-mesh`, and any settings that differ from it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    /// `local`, `lan` (default) or `wan`.
    #[serde(default)]
    pub preset: Preset,
    /// Overrides `probe_period`.
    pub probe_period: Option<Span>,
    /// Overrides `probe_rtt`.
    pub probe_rtt: Option<Span>,
    /// Overrides `num_indirect_probes`.
    pub num_indirect_probes: Option<usize>,
    /// Overrides `suspect_to_down_after`.
    pub suspect_to_down_after: Option<Span>,
    /// Overrides `remove_down_after`.
    pub remove_down_after: Option<Span>,
    /// Overrides `gossip_interval`.
    pub gossip_interval: Option<Span>,
    /// Overrides `rejoin_interval`.
    pub rejoin_interval: Option<Span>,
    /// Overrides `sync_interval`.
    pub sync_interval: Option<Span>,
    /// Overrides `expected_cluster_size`, which otherwise becomes the node count (never
    /// below the preset's), as an operator would size it.
    pub expected_cluster_size: Option<u32>,
}

impl Membership {
    /// The mesh settings every node of a `nodes`-node cluster runs with.
    pub fn resolve(&self, nodes: usize) -> MembershipConfig {
        let mut config = match self.preset {
            Preset::Local => MembershipConfig::local(),
            Preset::Lan => MembershipConfig::lan(),
            Preset::Wan => MembershipConfig::wan(),
        };
        // Never below the preset: fewer retransmissions cost small lossy clusters
        // refutations, and with them false deaths.
        let nodes = u32::try_from(nodes).unwrap_or(u32::MAX);
        config.expected_cluster_size = config.expected_cluster_size.max(nodes);
        let spans = [
            (self.probe_period, &mut config.probe_period),
            (self.probe_rtt, &mut config.probe_rtt),
            (
                self.suspect_to_down_after,
                &mut config.suspect_to_down_after,
            ),
            (self.remove_down_after, &mut config.remove_down_after),
            (self.gossip_interval, &mut config.gossip_interval),
            (self.rejoin_interval, &mut config.rejoin_interval),
            (self.sync_interval, &mut config.sync_interval),
        ];
        for (span, setting) in spans {
            if let Some(span) = span {
                *setting = span.0;
            }
        }
        if let Some(probes) = self.num_indirect_probes {
            config.num_indirect_probes = probes;
        }
        if let Some(size) = self.expected_cluster_size {
            config.expected_cluster_size = size;
        }
        config
    }
}

/// The membership presets.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Nodes on one machine.
    Local,
    /// A data-centre network.
    #[default]
    Lan,
    /// Links between regions.
    Wan,
}

/// Zones and nodes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The zones, in order; nodes are numbered zone by zone from 0.
    pub zones: Vec<ZoneSpec>,
    /// How many of the first nodes every node uses as seeds. Default 1.
    #[serde(default = "one")]
    pub seeds: usize,
}

fn one() -> usize {
    1
}

/// One zone.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    /// Its name.
    pub name: String,
    /// How many nodes it has.
    pub nodes: usize,
}

/// Link behaviour.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// One-way latency of every datagram.
    #[serde(default)]
    pub latency: Latency,
    /// Fraction of datagrams lost at random.
    #[serde(default)]
    pub loss: f64,
    /// Fraction of datagrams delivered twice.
    #[serde(default)]
    pub duplicate: f64,
    /// Fraction of datagrams with one byte changed on the way.
    #[serde(default)]
    pub corrupt: f64,
    /// Fraction of datagrams held back by up to `reorder_delay` more, so that later ones
    /// overtake them.
    #[serde(default)]
    pub reorder: f64,
    /// The longest extra delay of a held-back datagram. Default 10 ms.
    #[serde(default = "default_reorder_delay")]
    pub reorder_delay: Span,
    /// Largest datagram the path carries; larger ones are dropped. Default: no limit.
    #[serde(default)]
    pub mtu: Option<usize>,
    /// Bursty loss on every link, on top of `loss`.
    #[serde(default)]
    pub burst: Option<Burst>,
    /// Links from one zone to another that behave differently from the defaults.
    #[serde(default)]
    pub rules: Vec<LinkRule>,
}

fn default_reorder_delay() -> Span {
    Span(Duration::from_millis(10))
}

impl Default for Network {
    fn default() -> Self {
        Network {
            latency: Latency::default(),
            loss: 0.0,
            duplicate: 0.0,
            corrupt: 0.0,
            reorder: 0.0,
            reorder_delay: default_reorder_delay(),
            mtu: None,
            burst: None,
            rules: Vec::new(),
        }
    }
}

/// Bursty loss (Gilbert-Elliott): per datagram, a good link turns bad with probability
/// `enter` and a bad one recovers with probability `leave`; a bad link loses `loss` of
/// its datagrams.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    /// Chance per datagram that a good link turns bad.
    pub enter: f64,
    /// Chance per datagram that a bad link recovers.
    pub leave: f64,
    /// Fraction lost while bad.
    pub loss: f64,
}

/// Datagrams from `from_zone` to `to_zone` use this latency and loss instead of the
/// network's defaults (a slow inter-region link, a lossy rack).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRule {
    /// Sending zone.
    pub from_zone: String,
    /// Receiving zone.
    pub to_zone: String,
    /// Latency on these links, if different.
    #[serde(default)]
    pub latency: Option<Latency>,
    /// Loss on these links, if different.
    #[serde(default)]
    pub loss: Option<f64>,
}

/// A latency distribution.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// The smallest latency.
    pub min: Span,
    /// The largest latency in the common case; uniform between `min` and `max`.
    pub max: Span,
    /// Probability of a rare slow datagram.
    #[serde(default)]
    pub tail_probability: f64,
    /// Extra delay of a slow datagram.
    #[serde(default)]
    pub tail: Span,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            min: Span(Duration::from_micros(200)),
            max: Span(Duration::from_micros(800)),
            tail_probability: 0.0,
            tail: Span(Duration::ZERO),
        }
    }
}

/// One fault. (Unknown fields are caught by the fault kinds: `deny_unknown_fields`
/// does not combine with `flatten`.)
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Fault {
    /// When it starts.
    pub at: Span,
    /// How long a window fault lasts (partitions). Crashes ignore it.
    #[serde(default)]
    pub duration: Span,
    /// What happens.
    #[serde(flatten)]
    pub kind: FaultKind,
}

/// The kinds of fault.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "fault", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FaultKind {
    /// Cuts a zone off from the rest; `loss` below 1 makes the cut partial.
    IsolateZone {
        /// The zone.
        zone: String,
        /// Fraction of datagrams lost across the cut. Default 1 (all).
        #[serde(default = "all")]
        loss: f64,
    },
    /// Cuts the cluster into groups of node numbers; nodes in no group form one more.
    Split {
        /// The groups.
        groups: Vec<Vec<usize>>,
        /// Fraction of datagrams lost between groups. Default 1 (all).
        #[serde(default = "all")]
        loss: f64,
    },
    /// Datagrams from one node to another are lost; the reverse direction works.
    OneWay {
        /// Sender.
        from: usize,
        /// Receiver.
        to: usize,
    },
    /// A node stops; with `restart_after`, it starts again at the same address.
    Crash {
        /// The node.
        node: usize,
        /// When to restart it, after the crash.
        #[serde(default)]
        restart_after: Option<Span>,
        /// Whether the restarted node keeps its node id (`reuse`) or draws a new one
        /// (`new`, the default, as a restarted process does). `reuse` models a
        /// misconfiguration: the protocol needs a new id per process start, since
        /// sequence numbers start again with it.
        #[serde(default)]
        identity: Identity,
    },
    /// A node leaves the cluster gracefully.
    Leave {
        /// The node.
        node: usize,
    },
    /// A node is not running from the start; it starts at `at` (a seed started after
    /// the nodes that need it, a late joiner).
    Join {
        /// The node.
        node: usize,
    },
    /// A node stalls for `duration` (a long pause of the process): its timers do not
    /// run, and datagrams for it wait in a bounded buffer until it resumes.
    Pause {
        /// The node.
        node: usize,
        /// Datagrams buffered while paused; more are dropped. Default 1,000.
        #[serde(default = "default_pause_buffer")]
        buffer: usize,
    },
    /// A node's clock runs fast or slow from `at` on, and may jump.
    Clock {
        /// The node.
        node: usize,
        /// Drift in parts per million (positive: the node's clock runs fast).
        #[serde(default)]
        drift_ppm: f64,
        /// A jump forward of the node's clock at `at`.
        #[serde(default)]
        step: Span,
    },
}

fn default_pause_buffer() -> usize {
    1000
}

fn all() -> f64 {
    1.0
}

/// What a restarted node is.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// A new node id and a higher generation.
    #[default]
    New,
    /// The same node id, a higher generation.
    Reuse,
}

/// What the application does.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Invalidations per second, across the cluster.
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// Distinct keys drawn from.
    #[serde(default = "default_keys")]
    pub keys: u64,
    /// Zones whose nodes publish; empty for every zone.
    #[serde(default)]
    pub origin_zones: Vec<String>,
    /// Every this many publishes, one waits for `await_replicas` acknowledgements.
    #[serde(default)]
    pub await_every: u64,
    /// The replica goal of awaited publishes.
    #[serde(default = "one")]
    pub await_replicas: usize,
    /// Deadline of awaited publishes.
    #[serde(default = "default_await_deadline")]
    pub await_deadline: Span,
    /// When publishing starts; a cluster booting all at once takes a while to form.
    #[serde(default)]
    pub start: Span,
}

fn default_rate() -> f64 {
    20.0
}

fn default_keys() -> u64 {
    1000
}

fn default_await_deadline() -> Span {
    Span(Duration::from_secs(5))
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            rate: default_rate(),
            keys: default_keys(),
            origin_zones: Vec::new(),
            await_every: 0,
            await_replicas: 1,
            await_deadline: default_await_deadline(),
            start: Span::default(),
        }
    }
}

/// What must hold; each bound is checked and reported with its number.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// Every live node sees every other live node within this long after a fault
    /// window ends.
    #[serde(default = "default_convergence")]
    pub convergence_within: Span,
    /// Every live node sees a crashed node gone within this long.
    #[serde(default = "default_detection")]
    pub detection_within: Span,
    /// How long after a fault window a death still counts as caused by it.
    #[serde(default = "default_convergence")]
    pub fault_grace: Span,
}

fn default_convergence() -> Span {
    Span(Duration::from_secs(30))
}

fn default_detection() -> Span {
    Span(Duration::from_secs(15))
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            convergence_within: default_convergence(),
            detection_within: default_detection(),
            fault_grace: default_convergence(),
        }
    }
}

/// A duration written as text: a number and a unit (`ns`, `us`, `ms`, `s`, `m`, `h`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    /// Whole nanoseconds.
    pub fn nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Span, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration such as \"250ms\" or \"30s\""))?;
        let scale = match unit.trim() {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}; use ns, us, ms, s, m or h"
                ));
            }
        };
        Duration::try_from_secs_f64(value * scale)
            .map(Span)
            .map_err(|_| format!("{text:?} is out of range"))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Span, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        match nanos {
            0 => write!(f, "0s"),
            n if n % 1_000_000_000 == 0 => write!(f, "{}s", n / 1_000_000_000),
            n if n % 1_000_000 == 0 => write!(f, "{}ms", n / 1_000_000),
            n if n % 1_000 == 0 => write!(f, "{}us", n / 1_000),
            n => write!(f, "{n}ns"),
        }
    }
}

impl Scenario {
    /// Parses and validates a scenario.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let scenario: Scenario = toml::from_str(text).map_err(|error| error.to_string())?;
        scenario
            .validate()
            .map_err(|error| match line_of(text, &error) {
                Some(line) => format!("line {line}: {error}"),
                None => error,
            })?;
        Ok(scenario)
    }

    /// Total number of nodes.
    pub fn node_count(&self) -> usize {
        self.topology.zones.iter().map(|zone| zone.nodes).sum()
    }

    fn validate(&self) -> Result<(), String> {
        let nodes = self.node_count();
        if nodes < 2 {
            return Err("topology: at least two nodes are needed".into());
        }
        if nodes > MAX_NODES {
            return Err(format!(
                "topology: {nodes} nodes is more than the {MAX_NODES} simulated at once"
            ));
        }
        if self.run.duration.0.is_zero() {
            return Err("run.duration: must be positive".into());
        }
        if let Err(error) = self.membership.resolve(nodes).validate() {
            return Err(format!("{}: {}", error.field, error.reason));
        }
        let mut names = std::collections::BTreeSet::new();
        for zone in &self.topology.zones {
            if zone.nodes == 0 || !names.insert(zone.name.as_str()) {
                return Err(format!(
                    "topology.zones: zone {:?} is empty or named twice",
                    zone.name
                ));
            }
        }
        for rule in &self.network.rules {
            if rule.latency.as_ref().is_some_and(|l| l.min > l.max) {
                return Err(format!(
                    "network.rules: latency min is larger than max from {} to {}",
                    rule.from_zone, rule.to_zone
                ));
            }
        }
        if self.workload.rate > MAX_RATE {
            return Err(format!(
                "workload.rate: at most {MAX_RATE} invalidations per second"
            ));
        }
        if self.topology.seeds == 0 || self.topology.seeds > nodes {
            return Err(format!("topology.seeds: must be between 1 and {nodes}"));
        }
        let network = &self.network;
        let burst = network
            .burst
            .iter()
            .flat_map(|b| [b.enter, b.leave, b.loss]);
        let rule_losses = network.rules.iter().filter_map(|rule| rule.loss);
        let fractions = [
            network.loss,
            network.duplicate,
            network.corrupt,
            network.reorder,
            network.latency.tail_probability,
        ];
        for fraction in fractions.into_iter().chain(burst).chain(rule_losses) {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(format!(
                    "network: {fraction} is not a fraction between 0 and 1"
                ));
            }
        }
        if self.network.latency.min > self.network.latency.max {
            return Err("network.latency: min is larger than max".into());
        }
        if !(self.workload.rate >= 0.0 && self.workload.rate.is_finite()) || self.workload.keys == 0
        {
            return Err("workload: rate must be a non-negative number and keys positive".into());
        }
        let zone_names: Vec<&str> = self
            .topology
            .zones
            .iter()
            .map(|z| z.name.as_str())
            .collect();
        for rule in &self.network.rules {
            for zone in [&rule.from_zone, &rule.to_zone] {
                if !zone_names.contains(&zone.as_str()) {
                    return Err(format!("network.rules: no zone named {zone:?}"));
                }
            }
        }
        if self.network.mtu.is_some_and(|mtu| mtu < 64) {
            return Err("network.mtu: below 64 bytes nothing fits".into());
        }
        for zone in &self.workload.origin_zones {
            if !zone_names.contains(&zone.as_str()) {
                return Err(format!("workload.origin_zones: no zone named {zone:?}"));
            }
        }
        for (index, fault) in self.timeline.iter().enumerate() {
            let timing = if fault.at > self.run.duration {
                Err(format!(
                    "starts at {} after the run ends at {}",
                    fault.at, self.run.duration
                ))
            } else if fault.kind.is_window() && fault.duration.0.is_zero() {
                Err("a window fault needs a duration".to_owned())
            } else {
                Ok(())
            };
            timing
                .and_then(|()| fault.kind.validate(nodes, &zone_names))
                .map_err(|reason| format!("timeline[{index}]: {reason}"))?;
        }
        Ok(())
    }
}

impl FaultKind {
    fn validate(&self, nodes: usize, zones: &[&str]) -> Result<(), String> {
        let node_ok = |node: usize| {
            if node < nodes {
                Ok(())
            } else {
                Err(format!(
                    "node {node} does not exist (nodes are 0 to {})",
                    nodes - 1
                ))
            }
        };
        match self {
            FaultKind::IsolateZone { zone, loss } => {
                if !zones.contains(&zone.as_str()) {
                    return Err(format!("no zone named {zone:?}"));
                }
                fraction(*loss)
            }
            FaultKind::Split { groups, loss } => {
                groups.iter().flatten().try_for_each(|n| node_ok(*n))?;
                let listed: Vec<usize> = groups.iter().flatten().copied().collect();
                let distinct: std::collections::BTreeSet<usize> = listed.iter().copied().collect();
                if distinct.len() != listed.len() {
                    return Err("a node is in more than one group".into());
                }
                fraction(*loss)
            }
            FaultKind::OneWay { from, to } if from == to => {
                Err(format!("node {from} cannot be cut from itself"))
            }
            FaultKind::OneWay { from, to } => node_ok(*from).and_then(|()| node_ok(*to)),
            FaultKind::Crash { node, .. }
            | FaultKind::Leave { node }
            | FaultKind::Join { node }
            | FaultKind::Pause { node, .. } => node_ok(*node),
            FaultKind::Clock {
                node, drift_ppm, ..
            } => {
                if !(-100_000.0..=100_000.0).contains(drift_ppm) {
                    return Err(format!("drift of {drift_ppm} ppm is beyond 10%"));
                }
                node_ok(*node)
            }
        }
    }

    /// True for faults that last a window (and whose end starts a convergence check).
    pub fn is_window(&self) -> bool {
        matches!(
            self,
            FaultKind::IsolateZone { .. }
                | FaultKind::Split { .. }
                | FaultKind::OneWay { .. }
                | FaultKind::Pause { .. }
        )
    }
}

fn fraction(value: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("loss {value} is not a fraction between 0 and 1"))
    }
}

/// The line (from 1) a validation error is about, found from the path it starts with:
/// `timeline[2]` is the third `[[timeline]]`; `network.mtu` is the `mtu` key under
/// `[network]`, or the header itself when the key is not written there.
fn line_of(text: &str, error: &str) -> Option<usize> {
    let path = error.split(": ").next()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    if let Some(index) = path
        .strip_prefix("timeline[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        let index: usize = index.parse().ok()?;
        let at = lines
            .iter()
            .enumerate()
            .filter(|(_, line)| **line == "[[timeline]]")
            .nth(index)?
            .0;
        return Some(at + 1);
    }
    let (section, key) = match path.split_once('.') {
        Some((section, key)) => (section, Some(key)),
        None => (path, None),
    };
    let headers = [format!("[{section}]"), format!("[[{path}]]")];
    let header = lines
        .iter()
        .position(|line| headers.iter().any(|h| h == line))?;
    let written = key.and_then(|key| {
        lines[header + 1..]
            .iter()
            .take_while(|line| !line.starts_with('['))
            .position(|line| {
                line.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
    });
    Some(written.map_or(header, |offset| header + 1 + offset) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(
            "250ms".parse::<Span>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "1.5s".parse::<Span>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert_eq!("5m".parse::<Span>().unwrap().0, Duration::from_secs(300));
        assert_eq!(Span(Duration::from_millis(250)).to_string(), "250ms");
        assert!("fast".parse::<Span>().is_err());
        assert!("5 parsecs".parse::<Span>().unwrap_err().contains("unit"));
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let text = "[run]\nduration = \"10s\"\n\n[topology]\nzones = [{ name = \"a\", nodes = \"three\" }]\n";
        let error = Scenario::parse(text).unwrap_err();
        assert!(error.contains("line 5"), "{error}");
        assert!(
            error.contains("nodes") || error.contains("integer"),
            "{error}"
        );
        let text = "[run]\nduration = \"10 fortnights\"\n[topology]\nzones = [{ name = \"a\", nodes = 3 }]\n";
        let error = Scenario::parse(text).unwrap_err();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn faults_are_checked_against_the_topology() {
        let text = "[run]\nduration = \"10s\"\n[topology]\nzones = [{ name = \"a\", nodes = 3 }]\n\
                    [[timeline]]\nat = \"1s\"\nfault = \"crash\"\nnode = 7\n";
        let error = Scenario::parse(text).unwrap_err();
        assert!(
            error.contains("timeline[0]") && error.contains("node 7"),
            "{error}"
        );
        assert!(error.starts_with("line 5: "), "{error}");
    }

    #[test]
    fn value_errors_name_their_line() {
        let base = "[run]\nduration = \"10s\"\n[topology]\nzones = [{ name = \"a\", nodes = 3 }]\n";
        let cases = [
            (
                format!(
                    "{base}[[timeline]]\nat = \"1s\"\nfault = \"crash\"\nnode = 1\n\n[[timeline]]\nat = \"2s\"\nfault = \"isolate-zone\"\nzone = \"a\"\n"
                ),
                "line 10: timeline[1]",
            ),
            (
                format!("{base}[network]\nloss = 0.1\nmtu = 10\n"),
                "line 7: network.mtu",
            ),
            (
                format!("{base}[membership]\nprobe_rtt = \"2s\"\n"),
                "line 6: membership.probe_rtt",
            ),
            (
                "[run]\nduration = \"0s\"\n[topology]\nzones = [{ name = \"a\", nodes = 3 }]\n"
                    .to_owned(),
                "line 2: run.duration",
            ),
        ];
        for (text, expected) in cases {
            let error = Scenario::parse(&text).unwrap_err();
            assert!(error.starts_with(expected), "{error}");
        }
    }

    #[test]
    fn membership_overrides_replace_the_preset_and_are_checked() {
        let base =
            "[run]\nduration = \"10s\"\n[topology]\nzones = [{ name = \"a\", nodes = 40 }]\n";
        let plain = Scenario::parse(base).unwrap().membership.resolve(40);
        assert_eq!(plain.probe_period, Duration::from_secs(1));
        assert_eq!(plain.expected_cluster_size, 40, "sized for the cluster");
        let text = format!(
            "{base}[membership]\npreset = \"wan\"\nsync_interval = \"5s\"\n\
             expected_cluster_size = 500\n"
        );
        let resolved = Scenario::parse(&text).unwrap().membership.resolve(40);
        assert_eq!(resolved.sync_interval, Duration::from_secs(5));
        assert_eq!(
            resolved.probe_period,
            Duration::from_secs(3),
            "the rest is wan"
        );
        assert_eq!(resolved.expected_cluster_size, 500);
        let text = format!("{base}[membership]\nprobe_rtt = \"2s\"\n");
        let error = Scenario::parse(&text).unwrap_err();
        assert!(error.contains("membership.probe_rtt"), "{error}");
        let text = format!("{base}[output]\ndir = \"results/x\"\n");
        let output = Scenario::parse(&text).unwrap().output.dir;
        assert_eq!(output.as_deref(), Some("results/x"));
        let text = format!("{base}[membership]\nprobe_every = \"2s\"\n");
        let error = Scenario::parse(&text).unwrap_err();
        assert!(
            error.contains("probe_every") && error.contains("line"),
            "{error}"
        );
    }
}
