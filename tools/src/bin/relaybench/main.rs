//! `relaybench`: benchmarks for shmrelay.
//!
//! - `relaybench ring`: shm-ring's throughput and round trips between two processes against
//!   rtrb and crossbeam-queue (in one process) and a raw futex ping-pong, in one run of
//!   alternating rounds on the same payloads.
//! - `relaybench load`: a load generator for the length-prefixed wire protocol.
//! - `relaybench hold`: many idle long-lived connections with heartbeats, held for a while.
//!
//! `load` and `hold` are two workloads of one load engine (`engine.rs`), with the same
//! connection, process and output flags.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod engine;
mod hold;
mod load;
mod procs;
mod ring;
mod ws;

#[derive(Parser)]
#[command(name = "relaybench", version, about = "Benchmarks for shmrelay")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// shm-ring's throughput and round trips against in-process queues and a raw futex.
    Ring(ring::Args),
    /// Load generator for the length-prefixed wire protocol or WebSocket (`--codec`).
    Load(load::Args),
    /// Idle long-lived connections with heartbeats, held and counted.
    Hold(hold::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Ring(args) => ring::run(args),
        Cmd::Load(args) => load::run(args),
        Cmd::Hold(args) => hold::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relaybench: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
