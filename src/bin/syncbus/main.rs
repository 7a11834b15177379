//! The `syncbus` command: run a mesh node, or a local demo cluster.

#![forbid(unsafe_code)]

mod demo;
mod node;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Cache invalidation across a cluster, over a brokerless UDP mesh.
#[derive(Debug, Parser)]
#[command(name = "syncbus", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one mesh node until interrupted; reads commands on stdin, one per line
    /// (`sub KEY`, `sub PREFIX*`, `pub KEY`, `await N KEY`, `zones M KEY`, `members`,
    /// `quit`; `help` lists all).
    Node(Box<node::NodeArgs>),
    /// Start a local cluster of node processes, publish a burst of invalidations, stop
    /// one node, and report what arrived and how fast. Needs no external service.
    Demo(demo::DemoArgs),
    /// Print a new random cluster key (64 hexadecimal digits) for `node --key-file`.
    Keygen,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr so stdout stays one record per line. RUST_LOG overrides.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("syncbus: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Node(args) => node::run(*args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Keygen => keygen(),
        }
    });
    // A read of stdin may still be blocked in a worker thread; do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("syncbus: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a key drawn from the operating system's random source.
fn keygen() -> Result<(), String> {
    let mut bytes = [0; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the OS: {e}"))?;
    println!("{}", syncbus::ClusterKey::from_bytes(bytes).to_hex());
    Ok(())
}
