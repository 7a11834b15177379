//! `syncbus-sim`: run a scenario file and report whether its checks hold.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use serde_json::json;
use syncbus_sim::{Scenario, Simulation, Summary};

/// Deterministic simulation of syncbus mesh clusters.
#[derive(Debug, Parser)]
#[command(name = "syncbus-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario and print its summary; exits 1 when a check fails.
    Run {
        /// The scenario file (TOML).
        file: PathBuf,
        /// Seed of every random stream (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Write summary.json (the full report, with the run's manifest) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run twice with the same seed and compare the trace hashes.
        #[arg(long)]
        check_determinism: bool,
    },
}

fn main() -> ExitCode {
    let Command::Run {
        file,
        seed,
        out,
        check_determinism,
    } = Cli::parse().command;
    match run(&file, seed, out.as_deref(), check_determinism) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("syncbus-sim: {message}");
            ExitCode::from(2)
        }
    }
}

/// FNV-1a of the scenario text, so a summary names exactly what was run.
fn fnv(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn run(
    file: &Path,
    seed: Option<u64>,
    out: Option<&Path>,
    determinism: bool,
) -> Result<bool, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let scenario = Scenario::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let seed = seed.unwrap_or(scenario.run.seed);
    let started = Instant::now();
    let summary = simulate(scenario.clone(), seed);
    let wall = started.elapsed().as_secs_f64();
    print_summary(&summary, wall);
    let mut passed = summary.passed();
    if determinism {
        let again = simulate(scenario.clone(), seed);
        let same = again.trace_hash == summary.trace_hash;
        println!(
            "determinism: second run {} ({} vs {})",
            if same { "identical" } else { "DIVERGED" },
            summary.trace_hash,
            again.trace_hash
        );
        passed &= same;
    }
    if let Some(out) = out {
        std::fs::create_dir_all(out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        let report = json!({
            "manifest": {
                "scenario": file.display().to_string(),
                "scenario_hash": fnv(&text),
                "seed": seed,
                "config": scenario,
                "command": format!("syncbus-sim run {} --seed {seed}", file.display()),
            },
            "wall_seconds": wall,
            "summary": summary,
        });
        let path = out.join("summary.json");
        let pretty = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, pretty)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(passed)
}

fn simulate(scenario: Scenario, seed: u64) -> Summary {
    let mut simulation = Simulation::new(scenario, seed);
    // Progress on a terminal only, so logs and pipes stay clean.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    simulation.run_with_progress(|at| {
        if terminal && at > 0 {
            eprint!("\rsimulated {:.0} s ", at as f64 / 1e9);
        }
    });
    if terminal {
        eprint!("\r");
    }
    simulation.summary()
}

fn print_summary(summary: &Summary, wall: f64) {
    let d = &summary.deliveries;
    println!(
        "{} nodes, {:.0} simulated s in {wall:.2} wall s ({:.0} simulated s per wall s, {} events)",
        summary.nodes,
        summary.simulated_seconds,
        summary.simulated_seconds / wall.max(1e-9),
        summary.events
    );
    println!(
        "deliveries: {} owed, {} delivered, {} resynced, {} lost, {} lost with a crashed origin",
        d.expected, d.delivered, d.resynced, d.lost, d.lost_with_crashed_origin
    );
    let [p50, p99, max] = summary.latency_ms;
    println!("latency: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    println!(
        "detection: {:?} s; convergence after windows: {:?} s",
        summary.detection_seconds, summary.convergence_seconds
    );
    println!(
        "members seen at the end (node, count): {:?}",
        summary.members_at_end
    );
    for check in &summary.checks {
        println!(
            "[{}] {}: {}",
            if check.pass { "pass" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    println!("trace hash {} (seed {})", summary.trace_hash, summary.seed);
}
