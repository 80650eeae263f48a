//! One module per CLI verb. Each returns the process exit code; errors that stop a verb are
//! `anyhow` errors printed once by `main`.

pub mod appservice;
pub mod bench;
pub mod policy;
pub mod run;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::Config;

/// Runs the verb `cli` names.
///
/// # Errors
/// Whatever stops the verb: bad configuration, an unreadable file, a port in use.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) | Command::Pdp(args) => {
            let config = Config::load(cli.config.as_deref())?;
            run::run(config, args)
        }
        Command::Policy(command) => policy::run(command),
        Command::Bench(args) => bench::run(args),
        Command::Appservice(command) => appservice::run(command),
    }
}
