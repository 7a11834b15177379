//! `syncbus-sim`: run a scenario file and report whether its checks hold.

/// `println!` that does not panic when stdout is closed early (`| head`): what is
/// no longer read is dropped, and the exit status still reports the checks.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use serde_json::json;
use syncbus_sim::{Scenario, Simulation, Summary};

// Simulated nodes allocate and free a buffer or two per datagram; see the workspace
// manifest for why this allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells the allocator to keep the memory the simulator frees, for reuse, instead of
/// handing it back to the kernel after a second or so. A run's footprint rises and
/// falls with its traffic, and every page handed back was zeroed again by the kernel
/// when faulted back in (as a 2 MiB huge page, mostly): about a twentieth of a
/// thousand-node run's CPU time (docs/BENCHMARKS.md). The footprint this keeps is the
/// run's peak, which it reached anyway.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h, the same in mimalloc 2 and 3; the Rust
    // binding names no constant for it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // A delay of -1: never purge.
    const NEVER: std::ffi::c_long = -1;
    // SAFETY: mi_option_set takes any option number and value; it is called before
    // any thread but this one exists.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, NEVER);
    }
}

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
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Run every seed in FIRST..END instead, as `sweep` does.
        #[arg(long, value_parser = parse_seeds, conflicts_with_all = ["out", "check_determinism"])]
        seeds: Option<std::ops::Range<u64>>,
        /// Write summary.json (the full report, with the run's manifest) and
        /// timeline.svg (membership and latency over time) here (default: the
        /// scenario's [output] dir, else syncbus-sim-out/<file name>-seed<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run twice with the same seed and compare the trace hashes.
        #[arg(long)]
        check_determinism: bool,
    },
    /// Run one scenario for every seed in a range; report the spread and the seeds
    /// whose checks fail (exits 1 if any).
    Sweep {
        /// The scenario file (TOML).
        file: PathBuf,
        /// Seeds to run, as FIRST..END (END excluded), for example 0..100.
        #[arg(long, value_parser = parse_seeds)]
        seeds: std::ops::Range<u64>,
    },
}

fn parse_seeds(text: &str) -> Result<std::ops::Range<u64>, String> {
    let (first, end) = text
        .split_once("..")
        .ok_or(format!("expected FIRST..END, got {text:?}"))?;
    let number = |part: &str| {
        part.trim()
            .parse::<u64>()
            .map_err(|_| format!("{part:?} is not a seed"))
    };
    let range = number(first)?..number(end)?;
    if range.is_empty() {
        return Err(format!("{text:?} holds no seed"));
    }
    Ok(range)
}

fn main() -> ExitCode {
    keep_freed_memory();
    let outcome = match Cli::parse().command {
        Command::Run {
            file,
            seeds: Some(seeds),
            ..
        } => sweep(&file, seeds),
        Command::Run {
            file,
            seed,
            out,
            check_determinism,
            seeds: None,
        } => run(&file, seed, out.as_deref(), check_determinism),
        Command::Sweep { file, seeds } => sweep(&file, seeds),
    };
    match outcome {
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
    let simulation = simulate(scenario.clone(), seed);
    let summary = simulation.summary();
    let wall = started.elapsed().as_secs_f64();
    print_summary(&summary, wall);
    let mut passed = summary.passed();
    if determinism {
        let again = simulate(scenario.clone(), seed).summary();
        let same = again.trace_hash == summary.trace_hash;
        say!(
            "determinism: second run {} ({} vs {})",
            if same { "identical" } else { "DIVERGED" },
            summary.trace_hash,
            again.trace_hash
        );
        passed &= same;
    }
    let default_dir = || {
        let stem = file
            .file_stem()
            .map_or("scenario".into(), |s| s.to_string_lossy());
        PathBuf::from("syncbus-sim-out").join(format!("{stem}-seed{seed}"))
    };
    let out = out
        .map(Path::to_path_buf)
        .or_else(|| scenario.output.dir.as_ref().map(PathBuf::from))
        .unwrap_or_else(default_dir);
    {
        let out = out.as_path();
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
        say!("wrote {}", path.display());
        let picture = out.join("timeline.svg");
        simulation
            .draw_timeline(&picture)
            .map_err(|e| format!("cannot draw {}: {e}", picture.display()))?;
        say!("wrote {}", picture.display());
    }
    // The process ends next, and takes the memory back at once; freeing a thousand
    // nodes' tables one allocation at a time would add a fifth of a second.
    std::mem::forget(simulation);
    Ok(passed)
}

fn sweep(file: &Path, seeds: std::ops::Range<u64>) -> Result<bool, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let scenario = Scenario::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let started = Instant::now();
    let mut failing = Vec::new();
    let mut p99s = Vec::new();
    let count = seeds.end - seeds.start;
    for seed in seeds {
        let summary = simulate(scenario.clone(), seed).summary();
        let failed: Vec<&str> = summary
            .checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.name)
            .collect();
        say!(
            "seed {seed}: {} (p99 {:.2} ms, {} lost, {} resynced){}",
            if failed.is_empty() { "pass" } else { "FAIL" },
            summary.latency_ms[1],
            summary.deliveries.lost,
            summary.deliveries.resynced,
            if failed.is_empty() {
                String::new()
            } else {
                format!(": {}", failed.join(", "))
            }
        );
        p99s.push(summary.latency_ms[1]);
        if !failed.is_empty() {
            failing.push(seed);
        }
    }
    p99s.sort_by(f64::total_cmp);
    let at = |q: f64| p99s[((p99s.len() - 1) as f64 * q).round() as usize];
    say!(
        "{count} seeds in {:.1} s: latency p99 over seeds min {:.2}, median {:.2}, max {:.2} ms",
        started.elapsed().as_secs_f64(),
        at(0.0),
        at(0.5),
        at(1.0)
    );
    if failing.is_empty() {
        say!("every seed passed");
    } else {
        say!(
            "failing seeds: {failing:?} (rerun one with: syncbus-sim run {} --seed N)",
            file.display()
        );
    }
    Ok(failing.is_empty())
}

fn simulate(scenario: Scenario, seed: u64) -> Simulation {
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
    simulation
}

/// Members seen at the end: every node for small clusters, the spread for large ones.
fn print_members(summary: &Summary) {
    let counts = &summary.members_at_end;
    if counts.len() <= 20 {
        say!("members seen at the end (node, count): {counts:?}");
        return;
    }
    let most = counts.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let behind: Vec<&(usize, usize)> = counts.iter().filter(|(_, n)| *n < most).collect();
    say!(
        "members seen at the end: {} nodes see {most}; {} see fewer{}",
        counts.len() - behind.len(),
        behind.len(),
        match behind.iter().min_by_key(|(_, n)| *n) {
            Some((node, n)) => format!(" (fewest: node {node} sees {n})"),
            None => String::new(),
        }
    );
}

fn print_summary(summary: &Summary, wall: f64) {
    let d = &summary.deliveries;
    say!(
        "{} nodes, {:.0} simulated s in {wall:.2} wall s ({:.0} simulated s per wall s, {} events)",
        summary.nodes,
        summary.simulated_seconds,
        summary.simulated_seconds / wall.max(1e-9),
        summary.events
    );
    say!(
        "deliveries: {} owed, {} delivered, {} resynced, {} lost, {} lost with a crashed origin",
        d.expected,
        d.delivered,
        d.resynced,
        d.lost,
        d.lost_with_crashed_origin
    );
    let [p50, p99, max] = summary.latency_ms;
    say!("latency: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    say!(
        "detection: {:?} s; convergence after windows: {:?} s",
        summary.detection_seconds,
        summary.convergence_seconds
    );
    print_members(summary);
    for check in &summary.checks {
        say!(
            "[{}] {}: {}",
            if check.pass { "pass" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    say!("trace hash {} (seed {})", summary.trace_hash, summary.seed);
}
