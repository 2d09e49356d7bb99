//! `switchboard bench ...`: built-in benchmarks, one file each.

mod breaker;

use clap::Subcommand;

/// Which benchmark to run.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Circuit breaker: ns per call on the closed and open paths, one and two threads.
    Breaker(breaker::BreakerArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Breaker(args) => breaker::run(&args),
    }
}
