//! `msgnode bench`: decision latency and throughput figures (printed, never asserted).

use std::process::ExitCode;

use crate::cli::BenchArgs;

/// Runs the benchmarks `args` selects.
///
/// # Errors
/// The bundle does not load or the server cannot start.
pub fn run(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
