//! `msgnode policy test|eval|check|build|replay`: what a security team runs while writing policies.
//!
//! Every verb reads the same configuration as `run` (`-c FILE`, `./msgnode.toml`,
//! `MSGNODE_*`): the bundle defaults to `[pdp] policies`, the decision rule to `[pdp]
//! decision`. Paths given on the command line are the user's (relative to the working
//! directory); what a bundle needs besides itself (the schemas of its fixtures) is looked
//! for next to it, so the verbs behave the same from any directory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::{
    BuildArgs, CheckArgs, EvalArgs, EvalFormat, Format, PolicyCommand, ReplayArgs, TestArgs,
};
use crate::config::Config;
use crate::pdp::bundle::signing::{self, SigningKey};
use crate::pdp::bundle::{tarball, Bundle, BundleFile, FixtureFile, Manifest};
use crate::pdp::engine::{CompiledBundle, DataPath};
use crate::pdp::replay;
use crate::pdp::schema::Schemas;
use crate::pdp::testing::{self, line_ranges, Fixture, FixtureSchema, TestOptions, TestReport};

/// Runs one `policy` verb with the configuration `config`.
///
/// # Errors
/// Unreadable inputs; failing tests and compile errors are exit code 1, not errors.
pub fn run(command: PolicyCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let bundle_dir = |dir: Option<PathBuf>| dir.unwrap_or_else(|| config.pdp.policies.clone());
    match command {
        PolicyCommand::Test(args) => {
            let dir = bundle_dir(args.dir.clone());
            test(&args, &dir, config)
        }
        PolicyCommand::Eval(args) => {
            let dir = bundle_dir(args.dir.clone());
            eval(&args, &dir, config)
        }
        PolicyCommand::Check(args) => Ok(check(&args, config)),
        PolicyCommand::Build(args) => {
            let dir = bundle_dir(args.dir.clone());
            build(&args, &dir)
        }
        PolicyCommand::Replay(args) => replay(&args, config),
    }
}

/// Largest candidate tarball `policy replay` reads.
const MAX_TARBALL_BYTES: u64 = 256 * 1024 * 1024;

fn replay(args: &ReplayArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let source = args.bundle.display().to_string();
    let bundle = match args.bundle.is_dir() {
        true => Bundle::read(&args.bundle)?,
        false => {
            let bytes = std::fs::read(&args.bundle)
                .with_context(|| format!("cannot read the candidate {source}"))?;
            tarball::read(&bytes, &source, MAX_TARBALL_BYTES)?.into_bundle(&source)?
        }
    };
    let rule = DataPath::from_ref(&config.pdp.decision)
        .map_err(|e| anyhow::anyhow!("[pdp] decision: {e}"))?;
    let candidate = CompiledBundle::compile(bundle, args.timeout)?
        .with_fast_path(&rule, config.pdp.max_instructions)
        .0;
    let log_name = args.log.display().to_string();
    let report = match log_name.as_str() {
        "-" => replay::replay(std::io::stdin().lock(), &candidate),
        _ => std::fs::File::open(&args.log)
            .and_then(|f| replay::replay(std::io::BufReader::new(f), &candidate)),
    }
    .with_context(|| format!("cannot read the decision log {log_name}"))?;
    match args.format {
        Format::Text => print!("{}", report.to_text(&log_name)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    let changed = report.allow_to_deny + report.deny_to_allow > 0;
    Ok(match args.fail_on_difference && changed {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    })
}

fn test(args: &TestArgs, dir: &Path, config: &Config) -> anyhow::Result<ExitCode> {
    let filter = args
        .filter
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("-r/--run is not a valid regular expression")?;
    let decision = args.decision.as_deref().unwrap_or(&config.pdp.decision);
    let options = TestOptions {
        decision: DataPath::from_ref(decision)?,
        filter,
        coverage: args.coverage || args.threshold.is_some(),
        timeout: args.timeout,
        variants: true,
        opa: args.opa.clone(),
    };
    if !args.watch {
        return test_once(args, dir, &options, config);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watched = vec![dir.to_path_buf()];
    watched.extend(args.fixtures.clone());
    let paths: Vec<&Path> = watched.iter().map(PathBuf::as_path).collect();
    let _watcher = crate::pdp::watcher::changes(&paths, move || {
        let _ = tx.send(());
    })
    .with_context(|| format!("cannot watch {}", dir.display()))?;
    loop {
        if let Err(error) = test_once(args, dir, &options, config) {
            println!("error: {error:#}");
        }
        println!("-- watching {} for changes (Ctrl-C stops)", dir.display());
        // Wait for a change, then let a burst of saves settle into one run.
        if rx.recv().is_err() {
            return Ok(ExitCode::FAILURE);
        }
        while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
    }
}

fn test_once(
    args: &TestArgs,
    dir: &Path,
    options: &TestOptions,
    config: &Config,
) -> anyhow::Result<ExitCode> {
    let mut bundle = Bundle::read(dir)?;
    if let Some(fixtures) = &args.fixtures {
        bundle.fixtures = read_fixtures(fixtures)?;
    }
    let schemas = match bundle.fixtures.is_empty() {
        true => Schemas::load(Path::new("/nonexistent"), std::iter::empty())?,
        false => {
            let schema_dir = schema_dir(args.schemas.as_deref(), dir, config)?;
            Schemas::load(&schema_dir, std::iter::empty())?
        }
    };
    let report = testing::run(
        &bundle,
        options,
        FixtureSchema::Named(&schemas, &args.input_schema),
    )?;
    let below = match (args.threshold, report.coverage_percent) {
        (Some(threshold), Some(total)) if total < threshold => Some((total, threshold)),
        _ => None,
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print_report(&report, args.verbose),
    }
    if let Some((total, threshold)) = below {
        eprintln!("coverage {total:.1}% is below the threshold of {threshold}%");
    }
    if report.results.is_empty() {
        eprintln!("no tests found in {}", dir.display());
    }
    let ok = report.failed == 0 && !report.results.is_empty() && below.is_none();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(report: &TestReport, verbose: bool) {
    for result in &report.results {
        if result.passed && !verbose {
            continue;
        }
        let status = if result.passed { "PASS" } else { "FAIL" };
        let micros = result.duration_ns / 1000;
        match &result.message {
            None => println!("{status} {} ({micros} µs)", result.name),
            Some(message) => println!("{status} {} ({micros} µs)\n     {message}", result.name),
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
    if let Some(total) = report.coverage_percent {
        println!("coverage: {total:.1}% total");
    }
    println!("{} passed, {} failed", report.passed, report.failed);
}

/// The `*.json` files of `dir` as fixtures.
fn read_fixtures(dir: &Path) -> anyhow::Result<Vec<FixtureFile>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("fixture directory {} cannot be read", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(FixtureFile {
                path: path.display().to_string(),
                text: text.into(),
            })
        })
        .collect()
}

/// Where the schemas of the fixtures' inputs are: `--schemas` when given; else the first of
/// `<bundle>/schemas`, `<bundle>/../schemas` (the repository's layout) and `[pdp]
/// schema_dir` (a file's relative path is taken from the file's directory) that exists.
fn schema_dir(flag: Option<&Path>, bundle: &Path, config: &Config) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        if !dir.is_dir() {
            bail!(
                "schema directory {} does not exist (--schemas)",
                dir.display()
            );
        }
        return Ok(dir.to_path_buf());
    }
    let candidates = [
        bundle.join("schemas"),
        bundle.join("..").join("schemas"),
        config.pdp.schema_dir.clone(),
    ];
    match candidates.iter().find(|dir| dir.is_dir()) {
        Some(dir) => Ok(dir.clone()),
        None => bail!(
            "no schema directory for the fixtures' inputs: looked for {} (give one with --schemas)",
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading input from stdin")?;
        text
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn eval(args: &EvalArgs, dir: &Path, config: &Config) -> anyhow::Result<ExitCode> {
    let fixture = match &args.fixture {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let fixture =
                Fixture::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some(fixture)
        }
        None => None,
    };
    let input = match (&fixture, &args.input) {
        (Some(fixture), _) => Some(fixture.input.clone()),
        (None, Some(path)) => {
            let input = read_json(path)?;
            if input.get("input").is_some() && input.get("expect").is_some() {
                eprintln!(
                    "note: {} looks like a fixture; its `input` is evaluated only with --fixture",
                    path.display()
                );
            }
            Some(input)
        }
        (None, None) => None,
    };
    let query = fixture
        .as_ref()
        .and_then(|f| f.query.clone())
        .or_else(|| args.query.clone())
        .unwrap_or_else(|| config.pdp.decision.clone());
    let bundle = CompiledBundle::compile(Bundle::read(dir)?, args.timeout)?;
    let (value, document) = evaluate(&bundle, &query, input)?;
    match args.format {
        EvalFormat::Json => println!("{}", serde_json::to_string_pretty(&document)?),
        EvalFormat::Pretty => match &value {
            Some(value) => println!("{}", serde_json::to_string_pretty(value)?),
            None => println!("undefined"),
        },
        EvalFormat::Raw => match &value {
            Some(Value::String(text)) => println!("{text}"),
            Some(value) => println!("{value}"),
            None => {}
        },
    }
    if let Some(fixture) = &fixture {
        let outcome = match &value {
            Some(value) => fixture.compare(value),
            None => Err(format!("{query} is undefined")),
        };
        return Ok(match outcome {
            Ok(()) => {
                eprintln!("PASS: the result is what the fixture expects");
                ExitCode::SUCCESS
            }
            Err(why) => {
                eprintln!("FAIL: {why}");
                ExitCode::FAILURE
            }
        });
    }
    let failed = (args.fail && value.is_none()) || (args.fail_defined && value.is_some());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Evaluates `query` — a data reference (evaluated as the server does) or any expression —
/// into its value (`None`: undefined) and OPA's result document.
fn evaluate(
    bundle: &CompiledBundle,
    query: &str,
    input: Option<Value>,
) -> anyhow::Result<(Option<Value>, Value)> {
    if let Ok(path) = DataPath::from_ref(query) {
        let value = bundle.evaluate(&path, input.map(regorus::Value::from))?;
        let document = match &value {
            Some(value) => json!({"result": [{"expressions": [{"value": value, "text": query}]}]}),
            None => json!({}),
        };
        return Ok((value, document));
    }
    let mut engine = bundle.engine();
    engine.set_input(input.map_or(regorus::Value::Undefined, regorus::Value::from));
    let results = engine.eval_query(query.to_string(), false).map_err(|e| {
        anyhow::anyhow!("{query}: {}", crate::pdp::engine::one_line(&e.to_string()))
    })?;
    let document = serde_json::to_value(&results)?;
    // One result with one expression has a value of its own; anything else is shown whole.
    let value = match results.result.as_slice() {
        [] => None,
        [only]
            if only.expressions.len() == 1
                && matches!(&only.bindings, regorus::Value::Object(m) if m.is_empty()) =>
        {
            Some(serde_json::to_value(&only.expressions[0].value)?)
        }
        _ => document.get("result").cloned(),
    };
    Ok((value, document))
}

fn check(args: &CheckArgs, config: &Config) -> ExitCode {
    let dirs = match args.dirs.is_empty() {
        true => vec![config.pdp.policies.clone()],
        false => args.dirs.clone(),
    };
    let decision = DataPath::from_ref(&config.pdp.decision).ok();
    let mut errors = 0;
    for dir in &dirs {
        let bundle = match Bundle::read(dir) {
            Ok(bundle) => bundle,
            Err(error) => {
                eprintln!("{error}");
                errors += 1;
                continue;
            }
        };
        let found = CompiledBundle::diagnose(bundle.with_tests(), Duration::from_secs(5));
        for error in &found {
            eprintln!("{error}");
        }
        errors += found.len();
        let mut warnings = Vec::new();
        if args.strict && found.is_empty() {
            warnings.extend(unused_imports(&bundle));
            if let (Some(decision), Ok(compiled)) = (
                &decision,
                CompiledBundle::compile(bundle.clone(), Duration::from_secs(5)),
            ) {
                if let (_, Some(why)) = compiled.with_fast_path(decision, usize::MAX) {
                    warnings.push(format!(
                        "{}: {decision} does not run on the bytecode VM: {why}",
                        bundle.source
                    ));
                }
            }
        }
        for warning in &warnings {
            eprintln!("{warning}");
        }
        errors += warnings.len();
        if found.is_empty() && warnings.is_empty() {
            println!(
                "{}: ok ({} modules, {} tests, revision {})",
                dir.display(),
                bundle.modules.len(),
                bundle.tests.len(),
                bundle.revision
            );
        }
    }
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{errors} error{}", if errors == 1 { "" } else { "s" });
        ExitCode::FAILURE
    }
}

/// `--strict`: imports whose name is never used in their module, as `file:line:col: …`.
/// (regorus reports neither unused imports nor unused variables; this reads the source.)
fn unused_imports(bundle: &Bundle) -> Vec<String> {
    let mut found = Vec::new();
    for module in bundle.modules.iter().chain(&bundle.tests) {
        for (index, line) in module.raw.lines().enumerate() {
            let Some(import) = line.trim_start().strip_prefix("import ") else {
                continue;
            };
            let import = import.split('#').next().unwrap_or("").trim();
            if import == "rego.v1" || import.starts_with("future.") {
                continue;
            }
            let name = match import.split_once(" as ") {
                Some((_, alias)) => alias.trim(),
                None => import.rsplit('.').next().unwrap_or(import),
            };
            let Ok(word) = regex::Regex::new(&format!(r"\b{}\b", regex::escape(name))) else {
                continue;
            };
            let used = module
                .raw
                .lines()
                .enumerate()
                .any(|(i, l)| i != index && word.is_match(l.split('#').next().unwrap_or("")));
            if !used {
                let col = line.len() - line.trim_start().len() + 1;
                found.push(format!(
                    "{}:{}:{col}: import {import} is never used",
                    module.path,
                    index + 1
                ));
            }
        }
    }
    found
}

fn build(args: &BuildArgs, dir: &Path) -> anyhow::Result<ExitCode> {
    let mut bundle = Bundle::read(dir)?;
    // What does not compile is not shipped: replicas would refuse it anyway.
    CompiledBundle::compile(bundle.with_tests(), Duration::from_secs(5))?;
    if args.no_tests {
        bundle.tests.clear();
        bundle.fixtures.clear();
    }
    let roots = match args.roots.is_empty() {
        true => default_roots(&bundle),
        false => args.roots.clone(),
    };
    let manifest = Manifest {
        revision: args
            .revision
            .clone()
            .unwrap_or_else(|| bundle.revision.clone()),
        roots,
        metadata: None,
    };
    let mut files = tarball::files_of(&bundle, &manifest)?;
    let signed = match &args.signing_key {
        None => String::new(),
        Some(key_file) => {
            let alg = signing::algorithm(&args.signing_alg)?;
            let pem = std::fs::read(key_file)
                .with_context(|| format!("reading the signing key {}", key_file.display()))?;
            let key = SigningKey::new(
                alg,
                &pem,
                &key_file.display().to_string(),
                args.key_id.clone(),
            )?;
            let signatures = key.sign(&files, args.scope.as_deref())?;
            files.push(BundleFile {
                id: tarball::SIGNATURES.to_string(),
                shown: tarball::SIGNATURES.to_string(),
                bytes: signatures,
            });
            format!(", signed ({})", args.signing_alg)
        }
    };
    let bytes = tarball::write(&files)?;
    let partial = args.output.with_extension("partial");
    std::fs::write(&partial, &bytes)
        .and_then(|()| std::fs::rename(&partial, &args.output))
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "wrote {} (revision {}, {} modules, {} tests, {} fixtures{signed})",
        args.output.display(),
        manifest.revision,
        bundle.modules.len(),
        bundle.tests.len(),
        bundle.fixtures.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The top-level names the bundle defines: its packages' first segments and its data's keys.
fn default_roots(bundle: &Bundle) -> Vec<String> {
    let mut roots: Vec<String> = bundle
        .modules
        .iter()
        .chain(&bundle.tests)
        .filter_map(|m| {
            m.raw.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("package ")
                    .and_then(|p| p.trim().split('.').next())
                    .map(str::to_string)
            })
        })
        .collect();
    if let Value::Object(data) = &bundle.data {
        roots.extend(data.keys().cloned());
    }
    roots.sort();
    roots.dedup();
    roots
}
