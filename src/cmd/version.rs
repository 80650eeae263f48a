//! `msgnode version`: what is running, for bug reports and inventories.

use std::process::ExitCode;

use crate::cli::{Format, VersionArgs};
use crate::version::{GIT_COMMIT, REGORUS, RUMA, VERSION};

/// Prints the versions (text or JSON).
///
/// # Errors
/// Never in practice (writing to stdout).
pub fn run(args: &VersionArgs) -> anyhow::Result<ExitCode> {
    match args.format {
        Format::Text => {
            println!("msgnode {VERSION}");
            println!("commit  {GIT_COMMIT}");
            println!("regorus {REGORUS}");
            println!("ruma    {RUMA}");
        }
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "version": VERSION,
                "commit": GIT_COMMIT,
                "regorus": REGORUS,
                "ruma": RUMA,
            })
        ),
    }
    Ok(ExitCode::SUCCESS)
}
