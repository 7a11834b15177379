//! `syncbus demo`: a local cluster of `syncbus node` processes, a burst of
//! invalidations, a departure, and a report of what arrived and how fast.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::output::unix_nanos;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Nodes to start, each a separate process.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=32))]
    nodes: u16,
    /// Zones to spread the nodes over.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    zones: u16,
    /// Invalidations to publish from the first node.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    invalidations: u32,
}

/// How long each phase may take before the demo gives up.
const PHASE_DEADLINE: Duration = Duration::from_secs(60);
/// The paced phase: single invalidations on an idle cluster show latency without
/// queueing.
const PACED_COUNT: usize = 200;
const PACED_INTERVAL: Duration = Duration::from_millis(5);
/// Awaited publishes per goal, one every `AWAITED_INTERVAL`.
const AWAITED_COUNT: usize = 200;
const AWAITED_INTERVAL: Duration = Duration::from_millis(5);
/// The loss run: every node drops this fraction of what it receives.
const LOSS_RATE: f64 = 0.2;
const LOSSY_COUNT: usize = 500;
const LOSSY_INTERVAL: Duration = Duration::from_millis(2);

/// A line from a node: its index and the parsed JSON object. `None` when its stdout
/// closed.
type Line = (usize, Option<Value>);

struct Node {
    zone: String,
    id: String,
    addr: String,
    process: Child,
    /// Taken while a background task writes a long script to it.
    stdin: Option<ChildStdin>,
}

/// What the demo learns from the nodes' output.
#[derive(Default)]
struct Observed {
    members: BTreeMap<usize, BTreeSet<String>>,
    subscribed: BTreeSet<usize>,
    published_at: BTreeMap<String, u64>,
    received: BTreeMap<usize, BTreeMap<String, u64>>,
    resyncs: BTreeMap<usize, u64>,
    /// Awaited publishes from node 0 by key: completion latency in µs, or the error.
    awaited: BTreeMap<String, Result<u64, String>>,
    loss_set: BTreeSet<usize>,
    left_at: BTreeMap<usize, u64>,
    exited: BTreeSet<usize>,
    errors: Vec<String>,
}

impl Observed {
    fn record(&mut self, index: usize, line: Option<Value>, leaving: Option<&str>) {
        let Some(line) = line else {
            self.exited.insert(index);
            return;
        };
        let text = |name: &str| line[name].as_str().unwrap_or_default().to_owned();
        let at_ns = line["at_ns"].as_u64().unwrap_or_default();
        match line["type"].as_str().unwrap_or_default() {
            "member_up" => drop(self.members.entry(index).or_default().insert(text("id"))),
            "member_down" => {
                self.members.entry(index).or_default().remove(&text("id"));
                if leaving == Some(text("id").as_str()) {
                    self.left_at.insert(index, at_ns);
                }
            }
            "subscribed" => drop(self.subscribed.insert(index)),
            "loss" => drop(self.loss_set.insert(index)),
            "await" | "zones" => {
                let latency = line["latency_us"].as_u64().unwrap_or_default();
                self.awaited.insert(text("key"), Ok(latency));
            }
            "error" if matches!(line["command"].as_str(), Some("await" | "zones")) => {
                self.awaited.insert(text("key"), Err(text("message")));
            }
            "published" => {
                let called = line["called_ns"].as_u64().unwrap_or(at_ns);
                self.published_at.insert(text("key"), called);
            }
            "event" if text("kind") == "invalidate" => {
                self.received
                    .entry(index)
                    .or_default()
                    .insert(text("key"), at_ns);
            }
            "event" => *self.resyncs.entry(index).or_default() += 1,
            "error" => self
                .errors
                .push(format!("node {index}: {}", text("message"))),
            _ => {}
        }
    }

    /// Keys starting with `prefix` that node `index` received.
    fn received_by(&self, index: usize, prefix: &str) -> usize {
        let received = self.received.get(&index);
        received.map_or(0, |keys| {
            keys.keys().filter(|k| k.starts_with(prefix)).count()
        })
    }
}

struct Demo {
    args: DemoArgs,
    nodes: Vec<Node>,
    lines: mpsc::Receiver<Line>,
    sender: mpsc::Sender<Line>,
    seen: Observed,
    leaving: Option<String>,
}

pub(crate) async fn run(args: DemoArgs) -> Result<(), String> {
    let (sender, lines) = mpsc::channel(65_536);
    let mut demo = Demo {
        args,
        nodes: Vec::new(),
        lines,
        sender,
        seen: Observed::default(),
        leaving: None,
    };
    let outcome = demo.run().await;
    demo.stop_all().await;
    outcome
}

impl Demo {
    async fn run(&mut self) -> Result<(), String> {
        if self.args.zones > self.args.nodes {
            println!(
                "--zones {} is more than --nodes {}: using {} zones, one node each",
                self.args.zones, self.args.nodes, self.args.nodes
            );
            self.args.zones = self.args.nodes;
        }
        let total = usize::from(self.args.nodes);
        let zones = self.args.zones.min(self.args.nodes);
        println!(
            "syncbus demo: {total} nodes in {zones} zones on 127.0.0.1, {} invalidations from node 0",
            self.args.invalidations
        );
        self.start_cluster().await?;

        let started = Instant::now();
        let converged = |seen: &Observed| {
            (0..total).all(|i| seen.members.get(&i).map_or(0, BTreeSet::len) == total - 1)
        };
        self.wait_for("membership to converge", converged).await?;
        println!(
            "membership converged in {} ms",
            started.elapsed().as_millis()
        );

        self.send_all("sub demo:*").await?;
        self.wait_for("subscriptions", |seen| seen.subscribed.len() == total)
            .await?;
        let burst = self.args.invalidations as usize;
        println!("\nburst: {burst} invalidations from node 0 as fast as it accepts them");
        self.publish_phase("demo:burst:", burst, None).await?;
        self.report_deliveries("demo:burst:", burst);
        println!("(burst latency includes queueing behind the rest of the burst)");

        println!(
            "\npaced: {PACED_COUNT} invalidations from node 0, one every {} ms",
            PACED_INTERVAL.as_millis()
        );
        self.publish_phase("demo:paced:", PACED_COUNT, Some(PACED_INTERVAL))
            .await?;
        self.report_deliveries("demo:paced:", PACED_COUNT);

        let others = total - 1;
        println!(
            "\nawaited: {AWAITED_COUNT} publishes from node 0, each waiting for all {others} other nodes"
        );
        self.awaited_phase(&format!("await {others}"), "demo:await:")
            .await?;
        // A zone goal counts the zones of the other nodes: node 0's own counts only if
        // another node shares it.
        let zone_count = usize::from(self.args.zones);
        let zones = (1..total)
            .map(|index| index % zone_count)
            .collect::<BTreeSet<_>>()
            .len();
        println!(
            "\nawaited: {AWAITED_COUNT} publishes from node 0, each waiting for nodes in {zones} zones"
        );
        self.awaited_phase(&format!("zones {zones}"), "demo:zones:")
            .await?;

        println!(
            "\nloss: every node drops {:.0}% of the datagrams it receives; {LOSSY_COUNT} invalidations \
             from node 0, one every {} ms",
            LOSS_RATE * 100.0,
            LOSSY_INTERVAL.as_millis()
        );
        self.send_all(&format!("loss {LOSS_RATE}")).await?;
        self.wait_for("loss to be set", |seen| seen.loss_set.len() == total)
            .await?;
        self.publish_phase("demo:lossy:", LOSSY_COUNT, Some(LOSSY_INTERVAL))
            .await?;
        self.send_all("loss 0").await?;
        self.report_deliveries("demo:lossy:", LOSSY_COUNT);
        println!(
            "(lost datagrams are repaired from the origin; what cannot be is reported as a resync)"
        );
        println!();

        self.stop_one_node().await?;
        self.verdict()
    }

    async fn start_cluster(&mut self) -> Result<(), String> {
        let zones = self.args.zones.min(self.args.nodes);
        for index in 0..usize::from(self.args.nodes) {
            let zone = format!(
                "zone-{}",
                (b'a' + (index % usize::from(zones)) as u8) as char
            );
            let seed = self.nodes.first().map(|first| first.addr.clone());
            let node = self.spawn(index, zone, seed).await?;
            println!(
                "started node {index} ({}) at {} id {}",
                node.zone, node.addr, node.id
            );
            self.nodes.push(node);
        }
        Ok(())
    }

    /// Starts one `syncbus node` process and waits for its ready line.
    async fn spawn(
        &mut self,
        index: usize,
        zone: String,
        seed: Option<String>,
    ) -> Result<Node, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
        let mut command = tokio::process::Command::new(exe);
        command.args([
            "node",
            "--bind",
            "127.0.0.1:0",
            "--zone",
            &zone,
            "--preset",
            "local",
            "--json",
        ]);
        if let Some(seed) = &seed {
            command.args(["--seed", seed]);
        }
        let mut process = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start node {index}: {e}"))?;
        let stdin = process.stdin.take().ok_or("node stdin missing")?;
        let stdout = process.stdout.take().ok_or("node stdout missing")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(PHASE_DEADLINE, lines.next_line())
            .await
            .map_err(|_| format!("node {index} did not start"))?
            .map_err(|e| format!("node {index}: {e}"))?
            .ok_or(format!("node {index} exited at start"))?;
        let ready: Value =
            serde_json::from_str(&ready).map_err(|e| format!("node {index}: {e}: {ready}"))?;
        let sender = self.sender.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(value) = serde_json::from_str(&line) {
                    let _ = sender.send((index, Some(value))).await;
                }
            }
            let _ = sender.send((index, None)).await;
        });
        Ok(Node {
            zone,
            id: ready["id"].as_str().unwrap_or_default().to_owned(),
            addr: ready["addr"].as_str().unwrap_or_default().to_owned(),
            process,
            stdin: Some(stdin),
        })
    }

    /// Reads node output until `done` holds, or fails after the phase deadline.
    async fn wait_for(
        &mut self,
        what: &str,
        done: impl Fn(&Observed) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + PHASE_DEADLINE;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((index, line))) => self.seen.record(index, line, self.leaving.as_deref()),
                Ok(None) => return Err("every node's output closed".into()),
                Err(_) => {
                    return Err(format!(
                        "gave up waiting for {what} after {PHASE_DEADLINE:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    async fn send(&mut self, index: usize, text: &str) -> Result<(), String> {
        let stdin = self.nodes[index]
            .stdin
            .as_mut()
            .ok_or(format!("node {index}: stdin busy"))?;
        let line = format!("{text}\n");
        stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("node {index}: {e}"))
    }

    async fn send_all(&mut self, text: &str) -> Result<(), String> {
        for index in 0..self.nodes.len() {
            self.send(index, text).await?;
        }
        Ok(())
    }

    /// Publishes `count` keys under `prefix` from node 0, all at once or one every
    /// `pace`, and waits until every node has them (or reported a loss).
    async fn publish_phase(
        &mut self,
        prefix: &str,
        count: usize,
        pace: Option<Duration>,
    ) -> Result<(), String> {
        let lines: Vec<String> = (0..count).map(|i| format!("pub {prefix}{i}\n")).collect();
        // Written from a task so that reading the nodes' output goes on meanwhile.
        let mut stdin = self.nodes[0].stdin.take().ok_or("node 0: stdin busy")?;
        let writer = tokio::spawn(async move {
            let written = match pace {
                None => stdin.write_all(lines.concat().as_bytes()).await,
                Some(pace) => write_paced(&mut stdin, &lines, pace).await,
            };
            (stdin, written)
        });
        let total = self.nodes.len();
        // A node is done when it has everything, or reported a loss (a resync) that
        // covers what it lacks.
        let settled = |seen: &Observed, i: usize| {
            seen.received_by(i, prefix) == count || seen.resyncs.get(&i).is_some_and(|&n| n > 0)
        };
        let outcome = self
            .wait_for("every invalidation to arrive", |seen| {
                (0..total).all(|i| settled(seen, i))
            })
            .await;
        let (stdin, written) = writer.await.map_err(|e| e.to_string())?;
        self.nodes[0].stdin = Some(stdin);
        written.map_err(|e| format!("node 0: {e}"))?;
        outcome
    }

    /// Sends `AWAITED_COUNT` commands `VERB KEY` to node 0, paced, and reports how long
    /// they took to complete.
    async fn awaited_phase(&mut self, verb: &str, prefix: &str) -> Result<(), String> {
        let lines: Vec<String> = (0..AWAITED_COUNT)
            .map(|i| format!("{verb} {prefix}{i}\n"))
            .collect();
        let mut stdin = self.nodes[0].stdin.take().ok_or("node 0: stdin busy")?;
        let writer = tokio::spawn(async move {
            let written = write_paced(&mut stdin, &lines, AWAITED_INTERVAL).await;
            (stdin, written)
        });
        let done = |seen: &Observed| {
            seen.awaited
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .count()
                == AWAITED_COUNT
        };
        let outcome = self.wait_for("awaited publishes to complete", done).await;
        let (stdin, written) = writer.await.map_err(|e| e.to_string())?;
        self.nodes[0].stdin = Some(stdin);
        written.map_err(|e| format!("node 0: {e}"))?;
        outcome?;
        let results: Vec<&Result<u64, String>> = self
            .seen
            .awaited
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, result)| result)
            .collect();
        let mut latencies: Vec<u64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        latencies.sort_unstable();
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        println!(
            "completed {}/{AWAITED_COUNT}: p50 {}, p99 {}",
            latencies.len(),
            format_micros(percentile(&latencies, 0.50)),
            format_micros(percentile(&latencies, 0.99)),
        );
        if let Some(first) = failed.first() {
            println!("{} failed, for example: {first}", failed.len());
        }
        Ok(())
    }

    fn report_deliveries(&self, prefix: &str, count: usize) {
        println!(
            "{:<5} {:<7} {:>13} {:>8} {:>11} {:>11}",
            "node", "zone", "received", "resyncs", "p50", "p99"
        );
        for (index, node) in self.nodes.iter().enumerate() {
            let latencies = self.latencies(index, prefix);
            let note = if index == 0 {
                "  (publisher: local delivery)"
            } else {
                ""
            };
            println!(
                "{:<5} {:<7} {:>6}/{:<6} {:>8} {:>11} {:>11}{note}",
                index,
                node.zone,
                self.seen.received_by(index, prefix),
                count,
                self.seen.resyncs.get(&index).copied().unwrap_or(0),
                format_micros(percentile(&latencies, 0.50)),
                format_micros(percentile(&latencies, 0.99)),
            );
        }
    }

    /// Publish-to-delivery latency at node `index` for keys under `prefix`, in
    /// microseconds, sorted. Measured from when node 0's `publish` was called to when
    /// node `index` handed the event to its subscriber, on one machine's clock.
    fn latencies(&self, index: usize, prefix: &str) -> Vec<u64> {
        let Some(received) = self.seen.received.get(&index) else {
            return Vec::new();
        };
        let mut latencies: Vec<u64> = received
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .filter_map(|(key, at)| {
                Some(at.saturating_sub(*self.seen.published_at.get(key)?) / 1000)
            })
            .collect();
        latencies.sort_unstable();
        latencies
    }

    async fn stop_one_node(&mut self) -> Result<(), String> {
        let last = self.nodes.len() - 1;
        self.leaving = Some(self.nodes[last].id.clone());
        println!("stopping node {last} ({})", self.nodes[last].zone);
        let asked_at = unix_nanos();
        self.send(last, "quit").await?;
        let remaining: Vec<usize> = (0..last).collect();
        let all_saw = |seen: &Observed| remaining.iter().all(|i| seen.left_at.contains_key(i));
        self.wait_for("the departure to be seen", all_saw).await?;
        for index in 0..last {
            let seen_at = self.seen.left_at[&index];
            let millis = seen_at.saturating_sub(asked_at) as f64 / 1e6;
            println!("node {index} saw node {last} leave after {millis:.1} ms");
        }
        Ok(())
    }

    fn verdict(&self) -> Result<(), String> {
        let count = self.args.invalidations as usize;
        let complete = (0..self.nodes.len())
            .filter(|&i| {
                self.seen.received_by(i, "demo:burst:") == count
                    && self.seen.received_by(i, "demo:paced:") == PACED_COUNT
            })
            .count();
        let awaits_failed = self.seen.awaited.values().filter(|r| r.is_err()).count();
        let silent = (0..self.nodes.len())
            .filter(|&i| {
                let resynced = self.seen.resyncs.get(&i).is_some_and(|&n| n > 0);
                self.seen.received_by(i, "demo:lossy:") < LOSSY_COUNT && !resynced
            })
            .count();
        if awaits_failed > 0 {
            return Err(format!("{awaits_failed} awaited publishes failed"));
        }
        if silent > 0 {
            return Err(format!(
                "{silent} nodes lost invalidations under loss without a resync"
            ));
        }
        for error in &self.seen.errors {
            eprintln!("{error}");
        }
        if complete < self.nodes.len() {
            return Err(format!(
                "only {complete} of {} nodes received all {count} invalidations",
                self.nodes.len()
            ));
        }
        println!(
            "ok: all {} nodes received every invalidation of the burst and paced runs; every awaited \
             publish completed; nothing was lost silently under loss; all {} others saw the departure",
            self.nodes.len(),
            self.nodes.len() - 1
        );
        Ok(())
    }

    /// Asks every node to quit and waits for it; kills any that hang.
    async fn stop_all(&mut self) {
        for index in 0..self.nodes.len() {
            let _ = self.send(index, "quit").await;
        }
        for node in &mut self.nodes {
            let exited = tokio::time::timeout(Duration::from_secs(10), node.process.wait()).await;
            if exited.is_err() {
                let _ = node.process.kill().await;
            }
        }
    }
}

async fn write_paced(
    stdin: &mut ChildStdin,
    lines: &[String],
    pace: Duration,
) -> std::io::Result<()> {
    let mut tick = tokio::time::interval(pace);
    for line in lines {
        tick.tick().await;
        stdin.write_all(line.as_bytes()).await?;
    }
    Ok(())
}

fn percentile(sorted: &[u64], quantile: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() - 1) as f64 * quantile).round() as usize;
    Some(sorted[rank])
}

fn format_micros(micros: Option<u64>) -> String {
    match micros {
        None => "-".into(),
        Some(us) if us < 1000 => format!("{us} µs"),
        Some(us) => format!("{:.1} ms", us as f64 / 1000.0),
    }
}
