//! What a run found: the checks, each with its numbers, and the JSON summary.

use std::collections::BTreeMap;

use serde::Serialize;
use syncbus_mesh::NodeId;

use crate::engine::{Disagreement, Simulation};

/// One check's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it held.
    pub pass: bool,
    /// The numbers behind the verdict.
    pub detail: String,
}

/// Where every invalidation ended up, per receiving node.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Deliveries {
    /// (invalidation, receiver) pairs that had to arrive or be covered.
    pub expected: u64,
    /// Delivered to the receiver's subscribers.
    pub delivered: u64,
    /// Not delivered, but covered by a resync naming the origin.
    pub resynced: u64,
    /// Neither: silent loss.
    pub lost: u64,
    /// Neither, from an origin that crashed before anyone told the receiver (a known
    /// gap: peers do not pass entries on).
    pub lost_with_crashed_origin: u64,
    /// Delivered a second time to the same run of a node.
    pub duplicates: u64,
}

/// Traffic one node sent.
#[derive(Clone, Debug, Serialize)]
pub struct Traffic {
    /// The node's number.
    pub node: usize,
    /// Its zone.
    pub zone: String,
    /// Datagrams to its own zone.
    pub datagrams_in_zone: u64,
    /// Datagrams to other zones.
    pub datagrams_across_zones: u64,
    /// Bytes to its own zone.
    pub bytes_in_zone: u64,
    /// Bytes to other zones.
    pub bytes_across_zones: u64,
}

/// Awaited publishes and how they ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Awaits {
    /// Accepted by the origin.
    pub issued: u64,
    /// Refused at once (goal out of reach).
    pub refused: u64,
    /// Met their goal.
    pub completed: u64,
    /// Failed (deadline, members gone).
    pub failed: u64,
    /// Still waiting when the run ended.
    pub pending: u64,
    /// Claimed an acknowledgement from a node that never delivered the invalidation.
    pub dishonest: u64,
}

/// The summary of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Seed of the run.
    pub seed: u64,
    /// Nodes simulated.
    pub nodes: usize,
    /// Simulated seconds.
    pub simulated_seconds: f64,
    /// Events processed.
    pub events: u64,
    /// Where invalidations ended up.
    pub deliveries: Deliveries,
    /// Publish-to-delivery latency percentiles, in milliseconds: p50, p99, max.
    pub latency_ms: [f64; 3],
    /// Seconds from each crash until every live node saw it gone.
    pub detection_seconds: Vec<f64>,
    /// Seconds from each fault window's end until membership converged (-1: never).
    pub convergence_seconds: Vec<f64>,
    /// Nodes declared down while alive and outside every fault window.
    pub false_deaths: u64,
    /// Awaited publishes.
    pub awaits: Awaits,
    /// Traffic per node.
    pub traffic: Vec<Traffic>,
    /// How many members each live node saw at the end (node number, count).
    pub members_at_end: Vec<(usize, usize)>,
    /// Every check, pass or fail.
    pub checks: Vec<Check>,
    /// Hash of every event in order: the same seed gives the same hash.
    pub trace_hash: String,
}

impl Summary {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|check| check.pass)
    }
}

fn seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// The `quantile` of `values`, in milliseconds from nanoseconds; 0 for none. Reorders
/// `values`: a selection, not a sort, since a thousand-node run delivers ten million.
pub(crate) fn percentile(values: &mut [u64], quantile: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((values.len() - 1) as f64 * quantile).round() as usize;
    *values.select_nth_unstable(rank).1 as f64 / 1e6
}

impl Simulation {
    /// Judges the run and sums it up.
    pub fn summary(&self) -> Summary {
        let (deliveries, mut latencies) = self.deliveries();
        let detection = self.detection();
        let convergence: Vec<f64> = self
            .seen
            .convergence
            .iter()
            .map(|(end, done)| done.map_or(-1.0, |done| seconds(done - end)))
            .collect();
        let false_deaths = self.false_deaths();
        let awaits = self.awaits();
        let checks = self.checks(&deliveries, &detection, &convergence, false_deaths, &awaits);
        Summary {
            seed: self.seed,
            nodes: self.slots.len(),
            simulated_seconds: seconds(self.end),
            events: self.seen.events,
            deliveries,
            latency_ms: [
                percentile(&mut latencies, 0.5),
                percentile(&mut latencies, 0.99),
                percentile(&mut latencies, 1.0),
            ],
            detection_seconds: detection,
            convergence_seconds: convergence,
            false_deaths,
            awaits,
            traffic: self.traffic(),
            members_at_end: self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.node.as_ref()?.members().len())))
                .collect(),
            checks,
            trace_hash: format!("{:016x}", self.trace.value()),
        }
    }

    fn resynced_after(&self, receiver: usize, publication: &crate::engine::Publication) -> bool {
        let resyncs = self.seen.resyncs.get(&receiver).into_iter().flatten();
        let mut resyncs = resyncs.into_iter();
        resyncs.any(|(origin, at)| *origin == publication.origin_id && *at >= publication.at)
    }

    fn crashed_after(&self, origin: usize, id: NodeId, at: u64) -> bool {
        self.seen
            .crashes
            .iter()
            .any(|&(t, node, crashed)| node == origin && crashed == id && t >= at)
    }

    /// Classifies every (invalidation, receiver) pair that was owed a delivery: the
    /// receiver is alive at the end and ran since before the publish.
    fn deliveries(&self) -> (Deliveries, Vec<u64>) {
        let mut counts = Deliveries {
            duplicates: self.seen.duplicates,
            ..Deliveries::default()
        };
        // At most one latency per pair, and nearly every pair is delivered: sized once,
        // not doubled through a thousand-node run's ten million.
        let owed = self.seen.publications.len() * self.slots.len().saturating_sub(1);
        let mut latencies = Vec::with_capacity(owed);
        for publication in self.seen.publications.iter().filter(|p| !p.refused) {
            for (receiver, slot) in self.slots.iter().enumerate() {
                if receiver == publication.origin
                    || slot.node.is_none()
                    || slot.started_at > publication.at
                {
                    continue;
                }
                counts.expected += 1;
                if let Some(at) = publication.delivered.first(receiver) {
                    counts.delivered += 1;
                    latencies.push(at - publication.at);
                    continue;
                }
                let resyncs = self.seen.resyncs.get(&receiver).into_iter().flatten();
                if resyncs
                    .into_iter()
                    .any(|(origin, at)| *origin == publication.origin_id && *at >= publication.at)
                {
                    counts.resynced += 1;
                } else if self.crashed_after(
                    publication.origin,
                    publication.origin_id,
                    publication.at,
                ) {
                    counts.lost_with_crashed_origin += 1;
                } else {
                    counts.lost += 1;
                }
            }
        }
        (counts, latencies)
    }

    /// Seconds from each crash until every node alive at the end (and running before
    /// the crash) saw the crashed identity gone; an observer that already had it down
    /// (a partition) counts as zero.
    fn detection(&self) -> Vec<f64> {
        let mut times = Vec::new();
        for &(crashed_at, crashed, id) in &self.seen.crashes {
            let observers: Vec<usize> = (0..self.slots.len())
                .filter(|&i| i != crashed)
                .filter(|&i| self.slots[i].node.is_some() && self.slots[i].started_at <= crashed_at)
                .collect();
            // Every node that could have seen this crash restarted since: nothing to time.
            if observers.is_empty() {
                continue;
            }
            let mut latest = Some(0);
            for observer in observers {
                let seen = self
                    .seen
                    .downs
                    .iter()
                    .filter(|(_, by, subject)| *by == observer && *subject == id)
                    .map(|(t, _, _)| t.saturating_sub(crashed_at))
                    .next_back();
                latest = match (latest, seen) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            times.push(latest.map_or(-1.0, seconds));
        }
        times
    }

    /// Member-down events about a node that was running, outside every fault window
    /// (plus the grace after it) and not explained by a crash or leave.
    fn false_deaths(&self) -> u64 {
        let grace = self.scenario.checks.fault_grace.nanos();
        let crashed: BTreeMap<NodeId, u64> = self
            .seen
            .crashes
            .iter()
            .map(|(t, _, id)| (*id, *t))
            .collect();
        let left: Vec<NodeId> = self.departed();
        self.seen
            .downs
            .iter()
            .filter(|(t, _, subject)| {
                let in_window = self
                    .seen
                    .windows
                    .iter()
                    .any(|(start, end)| *t >= *start && *t <= end + grace);
                let explained =
                    crashed.get(subject).is_some_and(|at| at <= t) || left.contains(subject);
                !in_window && !explained
            })
            .count() as u64
    }

    /// Ids of nodes that left gracefully.
    fn departed(&self) -> Vec<NodeId> {
        self.scenario
            .timeline
            .iter()
            .filter_map(|fault| match fault.kind {
                crate::scenario::FaultKind::Leave { node } => Some(self.slots[node].id),
                _ => None,
            })
            .collect()
    }

    fn awaits(&self) -> Awaits {
        let mut awaits = Awaits {
            issued: self.seen.awaits.len() as u64,
            refused: self.seen.awaits_refused,
            ..Awaits::default()
        };
        let ids: BTreeMap<NodeId, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i))
            .collect();
        for record in &self.seen.awaits {
            match &record.outcome {
                None => awaits.pending += 1,
                Some((_, Err(_))) => awaits.failed += 1,
                Some((_, Ok(nodes))) => {
                    awaits.completed += 1;
                    let publication = &self.seen.publications[record.publication];
                    // An acknowledging node applied the invalidation: it delivered it, or
                    // it had given it up and told its subscribers to resync (which
                    // drops what the invalidation would have).
                    let honest = nodes.iter().all(|id| {
                        ids.get(id).is_none_or(|slot| {
                            publication.delivered.first(*slot).is_some()
                                || self.resynced_after(*slot, publication)
                        })
                    });
                    if !honest {
                        awaits.dishonest += 1;
                    }
                }
            }
        }
        awaits
    }

    fn traffic(&self) -> Vec<Traffic> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                let stats = slot.node.as_ref()?.stats();
                Some(Traffic {
                    node: index,
                    zone: slot.zone.clone(),
                    datagrams_in_zone: stats.datagrams_sent_in_zone,
                    datagrams_across_zones: stats.datagrams_sent_across_zones,
                    bytes_in_zone: stats.bytes_sent_in_zone,
                    bytes_across_zones: stats.bytes_sent_across_zones,
                })
            })
            .collect()
    }

    fn checks(
        &self,
        deliveries: &Deliveries,
        detection: &[f64],
        convergence: &[f64],
        false_deaths: u64,
        awaits: &Awaits,
    ) -> Vec<Check> {
        let bound = |span: crate::scenario::Span| span.0.as_secs_f64();
        let converge_bound = bound(self.scenario.checks.convergence_within);
        let detect_bound = bound(self.scenario.checks.detection_within);
        let members_max = self
            .slots
            .iter()
            .filter_map(|s| s.node.as_ref())
            .map(|n| n.members().len())
            .max();
        let disagreement = self.disagreement();
        vec![
            Check {
                name: "no silent loss",
                pass: deliveries.lost == 0,
                detail: format!(
                    "{} owed, {} delivered, {} covered by a resync, {} lost silently, {} lost with a crashed origin",
                    deliveries.expected,
                    deliveries.delivered,
                    deliveries.resynced,
                    deliveries.lost,
                    deliveries.lost_with_crashed_origin
                ),
            },
            Check {
                name: "no duplicate delivery",
                pass: deliveries.duplicates == 0,
                detail: format!(
                    "{} invalidations delivered twice to the same run of a node",
                    deliveries.duplicates
                ),
            },
            Check {
                name: "convergence after each fault window",
                pass: convergence
                    .iter()
                    .all(|s| (0.0..=converge_bound).contains(s)),
                detail: format!("{convergence:?} s, bound {converge_bound} s"),
            },
            Check {
                name: "crash detection",
                pass: detection.iter().all(|s| (0.0..=detect_bound).contains(s)),
                detail: format!("{detection:?} s, bound {detect_bound} s"),
            },
            Check {
                name: "no false deaths outside fault windows",
                pass: false_deaths == 0,
                detail: format!("{false_deaths} false deaths"),
            },
            Check {
                name: "member table bounded, converged at the end",
                pass: disagreement.is_none() && members_max.is_none_or(|m| m < self.slots.len()),
                detail: format!(
                    "largest member table {} peers, cluster of {} nodes{}",
                    members_max.unwrap_or(0),
                    self.slots.len(),
                    disagreement.map(describe).unwrap_or_default()
                ),
            },
            Check {
                name: "awaited publishes complete or fail honestly",
                pass: awaits.dishonest == 0 && awaits.pending == 0,
                detail: format!(
                    "{} issued, {} completed, {} failed, {} refused at once, {} pending, {} dishonest",
                    awaits.issued,
                    awaits.completed,
                    awaits.failed,
                    awaits.refused,
                    awaits.pending,
                    awaits.dishonest
                ),
            },
        ]
    }
}

/// Names one node that disagrees, so a failed convergence says where to look.
fn describe(disagreement: Disagreement) -> String {
    const SHOWN: usize = 8;
    let Disagreement { node, lacks, stale } = disagreement;
    let mut shown: Vec<String> = lacks.iter().take(SHOWN).map(usize::to_string).collect();
    if lacks.len() > SHOWN {
        shown.push(format!("and {} more", lacks.len() - SHOWN));
    }
    format!(
        "; not converged: node {node} lacks {} live nodes [{}] and holds {stale} that are not live",
        lacks.len(),
        shown.join(", ")
    )
}
