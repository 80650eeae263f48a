//! One module per CLI verb. Each returns the process exit code; errors that stop a verb are
//! `anyhow` errors printed once by `main`.

pub mod appservice;
pub mod bench;
pub mod docs;
pub mod policy;
pub mod run;
pub mod version;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::Config;

/// The configuration file in use: the one named (`-c`), else `./msgnode.toml` when present.
fn config_file(cli: &Cli) -> Option<PathBuf> {
    cli.config.clone().or_else(|| {
        let default = Path::new("msgnode.toml");
        default.exists().then(|| default.to_path_buf())
    })
}

/// Runs the verb `cli` names. Every verb that depends on the configuration reads the same
/// one (`-c FILE`, `./msgnode.toml`, `MSGNODE_*`).
///
/// # Errors
/// Whatever stops the verb: bad configuration, an unreadable file, a port in use.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = config_file(&cli);
    let config = || Config::load(file.as_deref());
    match cli.command {
        Command::Run(args) => run::run(config()?, args, run::Parts::Node, file),
        Command::Pdp(args) => run::run(config()?, args, run::Parts::PdpOnly, file),
        Command::Policy(command) => policy::run(command, &config()?),
        Command::Bench(args) => bench::run(args),
        Command::Appservice(command) => appservice::run(command, &config()?),
        Command::Version(args) => version::run(&args),
        Command::Completions(args) => docs::completions(&args),
        Command::Man(args) => docs::man(&args),
    }
}
