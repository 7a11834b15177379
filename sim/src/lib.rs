//! A deterministic simulator of syncbus mesh clusters.
//!
//! It runs the real `syncbus-mesh` [`Node`](syncbus_mesh::Node) state machine, many
//! nodes in one thread, under virtual time in whole nanoseconds. Events are ordered by
//! (time, sequence); every source of randomness (each node's identity, each sender's
//! link decisions, the workload) is its own seeded ChaCha8 stream, so the same scenario
//! and seed give the same run, bit for bit, and the same trace hash.
//!
//! ```no_run
//! use syncbus_sim::{Scenario, Simulation};
//!
//! let text = std::fs::read_to_string("sim/scenarios/zone-partition.toml").unwrap();
//! let scenario = Scenario::parse(&text).unwrap();
//! let mut simulation = Simulation::new(scenario, 7);
//! simulation.run();
//! let summary = simulation.summary();
//! assert!(summary.passed(), "{:#?}", summary.checks);
//! ```
//!
//! # Known gaps
//!
//! A thousand-node scenario runs its ten simulated minutes within a minute of one core
//! on the last machine measured (52 to 54 s), but machines of the same kind measured
//! earlier were up to a third slower at it; see `docs/BENCHMARKS.md`.

#![forbid(unsafe_code)]

mod engine;
mod picture;
mod queue;
mod report;
pub mod scenario;

pub use engine::Simulation;
pub use report::{Awaits, Check, Deliveries, Summary, Traffic};
pub use scenario::Scenario;
