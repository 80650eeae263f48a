//! The `msgnode` binary: parses the command line and runs the verb (see `msgnode::cmd`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = msgnode::cli::Cli::parse();
    match msgnode::cmd::dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
