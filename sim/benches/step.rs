//! One simulator step: the cost of one event (a datagram delivered to a node, a timer,
//! a publish) in the 10-node zone-partition scenario, booted and in its steady state.

use criterion::{Criterion, criterion_group, criterion_main};
use syncbus_sim::{Scenario, Simulation};

const SCENARIO: &str = include_str!("../scenarios/zone-partition.toml");

/// The scenario, run past its boot.
fn booted() -> Simulation {
    let scenario = Scenario::parse(SCENARIO).expect("the shipped scenario parses");
    let mut simulation = Simulation::new(scenario, 1);
    for _ in 0..20_000 {
        simulation.step();
    }
    simulation
}

fn step(c: &mut Criterion) {
    let mut simulation = booted();
    c.bench_function("one simulator step, 10 nodes", |b| {
        b.iter(|| {
            if !simulation.step() {
                simulation = booted();
            }
        })
    });
}

criterion_group!(benches, step);
criterion_main!(benches);
