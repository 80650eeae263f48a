//! `msgnode completions SHELL` and `msgnode man`: shell completions and manual pages,
//! generated from the clap command line so they never drift from it.

use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManArgs};

/// Prints the completion script for `args.shell`.
///
/// # Errors
/// Never in practice (writing to stdout).
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "msgnode", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Prints `msgnode.1`, or writes every page into `args.out_dir`.
///
/// # Errors
/// The directory cannot be written.
pub fn man(args: &ManArgs) -> anyhow::Result<ExitCode> {
    let command = Cli::command();
    match &args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("cannot write manual pages into {}", dir.display()))?;
            eprintln!("wrote manual pages into {}", dir.display());
        }
        None => clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .context("cannot write the manual page")?,
    }
    Ok(ExitCode::SUCCESS)
}
