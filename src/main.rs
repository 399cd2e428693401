//! The `chainvault` command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = chainvault::cli::Cli::parse();
    chainvault::cli::init_tracing(cli.verbose);
    match chainvault::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("chainvault: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
