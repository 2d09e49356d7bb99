//! `switchboard check --config FILE`: validates a gateway config; each error
//! names file, line, column and key; exit code 1 when any.

use std::path::PathBuf;

use switchboard_gateway::{Config, LoadError};

/// Arguments of `switchboard check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The gateway config (TOML).
    #[arg(long)]
    config: PathBuf,
}

/// Prints `ok` or every error (one per line) and fails on any.
pub fn run(args: &CheckArgs) -> anyhow::Result<()> {
    match Config::load(&args.config) {
        Ok(c) => {
            println!(
                "{}: ok ({} services, {} routes)",
                args.config.display(),
                c.services.len(),
                c.routes.len()
            );
            Ok(())
        }
        Err(LoadError::Invalid(errors)) => {
            let n = errors.0.len();
            for e in &errors.0 {
                eprintln!("{e}");
            }
            anyhow::bail!(
                "{} has {n} error{}",
                args.config.display(),
                if n == 1 { "" } else { "s" }
            )
        }
        Err(e) => Err(e.into()),
    }
}
