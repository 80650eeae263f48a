//! `msgnode policy test|eval|check`: what a security team runs while writing policies.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::cli::{CheckArgs, EvalArgs, Format, PolicyCommand, TestArgs};
use crate::pdp::bundle::Bundle;
use crate::pdp::engine::{CompiledBundle, DataPath};
use crate::pdp::testing::{self, line_ranges, TestOptions};

/// Runs one `policy` verb.
///
/// # Errors
/// Unreadable inputs; failing tests and compile errors are exit code 1, not errors.
pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Test(args) => test(args),
        PolicyCommand::Eval(args) => eval(args),
        PolicyCommand::Check(args) => Ok(check(args)),
    }
}

fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let report = testing::run(&TestOptions {
        dir: args.dir,
        fixtures: args.fixtures,
        schemas: args.schemas,
        input_schema: args.input_schema,
        decision: args.decision,
        filter: args.filter,
        coverage: args.coverage,
    })?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => {
            for result in &report.results {
                let status = if result.passed { "PASS" } else { "FAIL" };
                let micros = result.duration_ns / 1000;
                match &result.message {
                    None => println!("{status} {} ({micros} µs)", result.name),
                    Some(message) => {
                        println!("{status} {} ({micros} µs)\n     {message}", result.name)
                    }
                }
            }
            if let Some(coverage) = &report.coverage {
                println!("coverage:");
                for file in coverage {
                    let uncovered = if file.not_covered.is_empty() {
                        String::new()
                    } else {
                        format!("; uncovered lines: {}", line_ranges(&file.not_covered))
                    };
                    println!(
                        "  {}: {:.1}% ({}/{} lines){uncovered}",
                        file.file,
                        file.percent(),
                        file.covered.len(),
                        file.covered.len() + file.not_covered.len()
                    );
                }
            }
            println!("{} passed, {} failed", report.passed, report.failed);
        }
    }
    Ok(if report.failed == 0 && !report.results.is_empty() {
        ExitCode::SUCCESS
    } else {
        if report.results.is_empty() {
            eprintln!("no tests found");
        }
        ExitCode::FAILURE
    })
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let bundle = CompiledBundle::compile(Bundle::read(&args.dir)?, Duration::from_secs(5))?;
    let input = match args.input.as_deref() {
        None => None,
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading input from stdin")?;
                text
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
            };
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            Some(regorus::Value::from(value))
        }
    };
    let query = DataPath::from_ref(&args.query)?;
    match bundle.evaluate(&query, input)? {
        Some(value) => println!("{}", serde_json::to_string_pretty(&value)?),
        None => println!("undefined"),
    }
    Ok(ExitCode::SUCCESS)
}

fn check(args: CheckArgs) -> ExitCode {
    match Bundle::read_with_tests(&args.dir)
        .and_then(|b| CompiledBundle::compile(b, Duration::from_secs(5)))
    {
        Ok(bundle) => {
            println!(
                "{}: ok ({} modules, revision {})",
                args.dir.display(),
                bundle.bundle().modules.len(),
                bundle.revision()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("{error}");
            ExitCode::FAILURE
        }
    }
}
