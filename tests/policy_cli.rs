//! `msgnode policy test|check|eval` as a security team runs them: the real binary, its
//! output and exit codes — on the shipped bundle and on broken ones.

mod common;

use std::process::{Command, Output};

fn msgnode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msgnode"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run msgnode")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, body) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, body).expect("write");
    }
    dir
}

#[test]
fn shipped_policies_pass_their_tests_and_fixtures() {
    let output = msgnode(&["policy", "test", "policies", "--coverage", "-v"]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    let fixtures = out
        .lines()
        .filter(|l| l.starts_with("PASS policies/fixtures/"))
        .count();
    assert!(fixtures >= 30, "only {fixtures} fixtures ran:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with("PASS data.")),
        "no rego tests ran:\n{out}"
    );
    assert!(out.contains("coverage:"), "{out}");
    assert!(out.contains("% total"), "{out}");
    assert!(out.trim_end().ends_with(", 0 failed"), "{out}");
}

#[test]
fn policy_test_reports_failures_with_exit_code_1_and_json() {
    let dir = tree(&[
        ("p/t.rego", "package t\nallow if input.user == \"alice\"\n"),
        ("p/t_test.rego", "package t_test\ntest_ok if data.t.allow with input as {\"user\": \"alice\"}\ntest_bad if data.t.allow with input as {\"user\": \"bob\"}\n"),
        ("schemas/input.schema.json", "{\"type\": \"object\"}"),
    ]);
    let p = dir.path().join("p");
    let schemas = dir.path().join("schemas");
    let args = [
        "policy",
        "test",
        p.to_str().expect("utf8"),
        "--schemas",
        schemas.to_str().expect("utf8"),
    ];
    let output = msgnode(&args);
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(!out.contains("PASS"), "quiet by default: {out}");
    assert!(out.contains("FAIL data.t_test.test_bad"), "{out}");
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    let mut verbose = args.to_vec();
    verbose.push("-v");
    let out = text(&msgnode(&verbose));
    assert!(out.contains("PASS data.t_test.test_ok"), "{out}");

    let mut json_args = args.to_vec();
    json_args.extend(["--format", "json"]);
    let output = msgnode(&json_args);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json report");
    assert_eq!(
        (report["passed"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(1))
    );
}

#[test]
fn policy_check_prints_file_line_col_and_exits_1() {
    let dir = tree(&[
        ("ok.rego", "package ok\nx := 1\n"),
        ("broken.rego", "package b\nallow if {\n  input.a ==\n}\n"),
    ]);
    let output = msgnode(&["policy", "check", dir.path().to_str().expect("utf8")]);
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(output.stdout.is_empty(), "errors go to stderr: {out}");
    let line = out
        .lines()
        .find(|l| l.contains("broken.rego:"))
        .unwrap_or_else(|| panic!("no location:\n{out}"));
    let location = line.split(": ").next().unwrap_or("");
    let parts: Vec<&str> = location.rsplitn(3, ':').collect();
    assert!(
        parts.len() == 3 && parts[0].parse::<u32>().is_ok() && parts[1].parse::<u32>().is_ok(),
        "{line}"
    );

    let output = msgnode(&["policy", "check", "policies"]);
    assert!(output.status.success(), "{}", text(&output));

    for (files, expected) in [
        (
            vec![("data.json", "{not json"), ("a.rego", "package a")],
            "data.json: invalid data file",
        ),
        (
            vec![("a.rego", "package a\nallow if { z := q }\n")],
            "var q is unsafe",
        ),
        (
            vec![("a.rego", "package a\nallow if { nope(1) }\n")],
            "could not find function nope",
        ),
    ] {
        let dir = tree(&files);
        let output = msgnode(&["policy", "check", dir.path().to_str().expect("utf8")]);
        assert_eq!(output.status.code(), Some(1));
        assert!(
            text(&output).contains(expected),
            "{expected}: {}",
            text(&output)
        );
    }
    let output = msgnode(&["policy", "check", "/no/such/dir"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("/no/such/dir does not exist"),
        "{}",
        text(&output)
    );
}

#[test]
fn policy_eval_prints_the_result() {
    let dir = tree(&[
        ("p/t.rego", "package t\nallow if input.user == \"alice\"\n"),
        ("in.json", "{\"user\": \"alice\"}"),
        ("bad.json", "{"),
    ]);
    let eval = |input: Option<&str>| {
        let p = dir.path().join("p");
        let mut args = vec![
            "policy".to_string(),
            "eval".into(),
            "-d".into(),
            p.display().to_string(),
        ];
        if let Some(file) = input {
            args.extend([
                "-i".to_string(),
                dir.path().join(file).display().to_string(),
            ]);
        }
        args.extend(["-f".to_string(), "pretty".into(), "data.t.allow".into()]);
        msgnode(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let output = eval(Some("in.json"));
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "true");
    let output = eval(None);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "undefined");
    let output = eval(Some("bad.json"));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("bad.json is not JSON"),
        "{}",
        text(&output)
    );
}

fn msgnode_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msgnode"))
        .args(args)
        .current_dir(dir)
        .env_remove("MSGNODE_CONFIG")
        .output()
        .expect("run msgnode")
}

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn policy_test_behaves_the_same_from_any_directory() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let output = msgnode_in(elsewhere.path(), &["policy", "test", &repo("policies")]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    assert!(out.trim_end().ends_with(", 0 failed"), "{out}");

    // A bundle whose fixtures have no schema anywhere says where it looked.
    let dir = tree(&[
        ("p/t.rego", POLICY_T),
        (
            "p/fixtures/a.json",
            r#"{"input": {"user": "alice"}, "expect": {"allow": true}}"#,
        ),
    ]);
    let p = dir.path().join("p");
    let output = msgnode_in(
        elsewhere.path(),
        &["policy", "test", p.to_str().expect("utf8")],
    );
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("no schema directory"), "{out}");
    assert!(
        out.contains(&format!("{}/schemas", p.display())),
        "names what it looked for: {out}"
    );
}

const POLICY_T: &str = "package t\ndefault allow := false\nallow if input.user == \"alice\"\nreasons contains \"not alice\" if not allow\ndecision := {\"allow\": allow, \"reasons\": reasons}\n";

#[test]
fn a_config_files_relative_paths_are_taken_from_its_directory() {
    let dir = tree(&[
        ("etc/bundle/t.rego", POLICY_T),
        (
            "etc/bundle/t_test.rego",
            "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\n",
        ),
        (
            "etc/msgnode.toml",
            "[pdp]\npolicies = \"bundle\"\ndecision = \"data.t.decision\"\n",
        ),
    ]);
    let config = dir.path().join("etc/msgnode.toml");
    let config = config.to_str().expect("utf8");
    // The same from the file's directory, its parent and an unrelated one.
    for cwd in [
        dir.path().join("etc"),
        dir.path().to_path_buf(),
        std::path::PathBuf::from("/"),
    ] {
        let output = msgnode_in(&cwd, &["-c", config, "policy", "test"]);
        assert!(
            output.status.success(),
            "from {}: {}",
            cwd.display(),
            text(&output)
        );
        assert!(
            text(&output).contains("1 passed, 0 failed"),
            "{}",
            text(&output)
        );
    }
}

#[test]
fn every_subcommand_reads_the_config_file() {
    let dir = tree(&[
        ("bundle/t.rego", POLICY_T),
        ("bundle/t_test.rego", "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\n"),
        (
            "msgnode.toml",
            "[pdp]\npolicies = \"bundle\"\ndecision = \"data.t.decision\"\n[pep]\nserver_name = \"chat.example\"\nlisten = \"127.0.0.1:8449\"\n",
        ),
    ]);
    let config = dir.path().join("msgnode.toml");
    let config = config.to_str().expect("utf8");
    let output = msgnode_in(dir.path(), &["-c", config, "policy", "test"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("1 passed, 0 failed"),
        "{}",
        text(&output)
    );
    let output = msgnode_in(
        dir.path(),
        &[
            "-c",
            config,
            "policy",
            "eval",
            "-f",
            "raw",
            "-i",
            "/dev/null",
        ],
    );
    assert!(text(&output).contains("is not JSON"), "{}", text(&output));
    let output = msgnode_in(dir.path(), &["-c", config, "appservice", "registration"]);
    let yaml = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        yaml.contains(":chat\\.example"),
        "[pep] server_name: {yaml}"
    );
    assert!(
        yaml.contains("http://127.0.0.1:8449"),
        "[pep] listen: {yaml}"
    );
    // The config found in the working directory counts too.
    let output = msgnode_in(dir.path(), &["policy", "check"]);
    assert!(text(&output).contains("bundle: ok"), "{}", text(&output));
}

#[test]
fn policy_eval_takes_fixtures_formats_expressions_and_fail() {
    let dir = tree(&[
        ("p/t.rego", POLICY_T),
        ("p/config/data.json", r#"{"names": ["alice", "bob"]}"#),
        (
            "ok.json",
            r#"{"input": {"user": "alice"}, "expect": {"allow": true}}"#,
        ),
        (
            "wrong.json",
            r#"{"input": {"user": "bob"}, "expect": {"allow": true}}"#,
        ),
        (
            "reason.json",
            r#"{"input": {"user": "bob"}, "expect": {"allow": false, "reasons": ["not alice"]}}"#,
        ),
    ]);
    let p = dir.path().join("p");
    let p = p.to_str().expect("utf8");
    let file = |name: &str| dir.path().join(name).display().to_string();
    let eval = |extra: &[&str]| {
        let mut args = vec!["policy", "eval", "-d", p];
        args.extend_from_slice(extra);
        msgnode(&args)
    };
    let ok = file("ok.json");
    let output = eval(&["--fixture", &ok, "data.t.decision"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("PASS"), "{}", text(&output));
    let reason = file("reason.json");
    assert!(eval(&["--fixture", &reason, "data.t.decision"])
        .status
        .success());
    let wrong = file("wrong.json");
    let output = eval(&["--fixture", &wrong, "data.t.decision"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("expected allow=true"),
        "{}",
        text(&output)
    );
    // -i with a fixture file: a note that --fixture unwraps it.
    let output = eval(&["-i", &ok, "data.t.allow"]);
    assert!(
        text(&output).contains("looks like a fixture"),
        "{}",
        text(&output)
    );

    // Formats: OPA's JSON result document, the raw value.
    let output = eval(&["data.config.names[0]"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        json["result"][0]["expressions"][0]["value"], "alice",
        "{json}"
    );
    let output = eval(&["-f", "raw", "data.config.names[1]"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "bob");
    // Any expression, not only data references.
    let output = eval(&["-f", "raw", "count(data.config.names) > 1"]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "true",
        "{}",
        text(&output)
    );
    // --fail: undefined is exit 1; --fail-defined: defined is exit 1.
    assert_eq!(eval(&["--fail", "data.t.nothing"]).status.code(), Some(1));
    assert!(eval(&["--fail", "data.config.names"]).status.success());
    assert_eq!(
        eval(&["--fail-defined", "data.config.names"]).status.code(),
        Some(1)
    );
    let output = eval(&["-f", "raw", "data.t.nope("]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output).starts_with("error:"), "{}", text(&output));
}

#[test]
fn policy_test_filters_by_regex_and_enforces_a_coverage_threshold() {
    let dir = tree(&[
        ("p/t.rego", "package t\nallow if input.user == \"alice\"\nother if input.user == \"carol\"\n"),
        ("p/t_test.rego", "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\ntest_bob_denied if not data.t.allow with input as {\"user\": \"bob\"}\n"),
    ]);
    let p = dir.path().join("p");
    let p = p.to_str().expect("utf8");
    let output = msgnode(&["policy", "test", p, "-v", "-r", "test_(alice|carol)$"]);
    let out = text(&output);
    assert!(
        out.contains("1 passed, 0 failed"),
        "a regex, not a substring: {out}"
    );
    assert!(!out.contains("test_bob_denied"), "{out}");
    let output = msgnode(&["policy", "test", p, "-r", "("]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("not a valid regular expression"),
        "{}",
        text(&output)
    );
    let output = msgnode(&["policy", "test", p, "--threshold", "100"]);
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("below the threshold of 100%"), "{out}");
    assert!(out.contains("% total"), "{out}");
    assert!(msgnode(&["policy", "test", p, "--threshold", "10"])
        .status
        .success());
    let output = msgnode(&["policy", "test", p, "--timeout", "soon"]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "a bad duration is a usage error"
    );
    let output = msgnode(&["policy", "test", p, "--format", "json", "--coverage"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert!(report["coverage_percent"].as_f64().is_some(), "{report}");
}

#[test]
fn policy_test_watch_runs_again_when_a_file_changes() {
    use std::io::{BufRead, BufReader};
    let dir = tree(&[
        ("p/t.rego", "package t\nallow if input.user == \"alice\"\n"),
        (
            "p/t_test.rego",
            "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\n",
        ),
    ]);
    let p = dir.path().join("p");
    let mut child = Command::new(env!("CARGO_BIN_EXE_msgnode"))
        .args(["policy", "test", "--watch", p.to_str().expect("utf8")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
                if line.contains(what) {
                    return true;
                }
            }
        }
        false
    };
    let first = wait_for("1 passed, 0 failed");
    // Its own reading of the files is no change: no second run until one is written.
    let idle = {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut ran = false;
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            if rx
                .recv_timeout(left)
                .is_ok_and(|line| line.contains("passed,"))
            {
                ran = true;
            }
        }
        ran
    };
    std::fs::write(
        p.join("t.rego"),
        "package t\nallow if input.user == \"bob\"\n",
    )
    .expect("write");
    let second = wait_for("0 passed, 1 failed");
    let _ = child.kill();
    let _ = child.wait();
    assert!(first, "first run");
    assert!(!idle, "no run without a change");
    assert!(second, "the run after the change");
}

#[test]
fn policy_check_reports_every_error_of_every_file_on_stderr() {
    let dir = tree(&[
        ("a/broken.rego", "package a\nallow if {\n  input.a ==\n}\n"),
        ("a/unsafe.rego", "package a2\nallow if { z := q }\n"),
        ("b/b.rego", "package b\nallow if { x := 1; x == 2; y }\n"),
    ]);
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let output = msgnode(&[
        "policy",
        "check",
        a.to_str().expect("utf8"),
        b.to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    for file in ["broken.rego:", "unsafe.rego:", "b.rego:"] {
        assert!(
            err.lines().any(|l| l.contains(file)),
            "{file} missing:\n{err}"
        );
    }
    assert!(!err.contains("scopes"), "no engine internals: {err}");
    assert!(err.contains("3 errors"), "{err}");

    let dir = tree(&[(
        "s/s.rego",
        "package s\nimport data.config.unused\nimport data.config.used\nallow if used.x\n",
    )]);
    let s = dir.path().join("s");
    let s = s.to_str().expect("utf8");
    assert!(msgnode(&["policy", "check", s]).status.success());
    let output = msgnode(&["policy", "check", "--strict", s]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("s.rego:2:1: import data.config.unused is never used"),
        "{err}"
    );
    assert!(!err.contains("config.used is never"), "{err}");
}

#[test]
fn policy_check_goes_on_after_a_parse_error_to_every_independent_error() {
    let source = [
        "package three",           // 1
        "",                        // 2
        "allow if {",              // 3
        "  input.a ==",            // 4: the expression never ends ...
        "}",                       // 5: ... which the parser sees here
        "",                        // 6
        "ok if input.b == 1",      // 7: fine
        "",                        // 8
        "f(x) := y if {",          // 9
        "  y := concat(\",\", [x", // 10: the array is never closed
        "}",                       // 11
        "",                        // 12
        "uses_f if f(1)",          // 13: f was blanked: not an error of its own
        "",                        // 14
        "g if { z := q }",         // 15: a compile error
    ]
    .join("\n");
    let dir = tree(&[
        ("three.rego", &source),
        ("other.rego", "package other\nx if {\n"),
    ]);
    let output = msgnode(&["policy", "check", dir.path().to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    let three: Vec<&str> = err.lines().filter(|l| l.contains("three.rego:")).collect();
    assert_eq!(three.len(), 3, "one line per independent error:\n{err}");
    assert!(three[0].contains("three.rego:5:"), "{err}");
    assert!(three[1].contains("three.rego:10:"), "{err}");
    assert!(
        three[2].contains("three.rego:15:13: var q is unsafe"),
        "{err}"
    );
    assert!(
        !err.contains("function f"),
        "no cascade from the blanked f: {err}"
    );
    assert!(err.lines().any(|l| l.contains("other.rego:")), "{err}");
    assert!(err.contains("4 errors"), "{err}");
}

#[test]
fn version_completions_and_man_page() {
    let output = msgnode(&["version"]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    for what in ["msgnode", "commit", "regorus", "ruma"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_default();
        let value = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(!value.is_empty() && value != "unknown", "{what}: {out}");
    }
    let output = msgnode(&["version", "-f", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    for shell in ["bash", "zsh", "fish"] {
        let output = msgnode(&["completions", shell]);
        assert!(output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("policy"),
            "{shell}"
        );
    }
    let output = msgnode(&["man"]);
    let page = String::from_utf8_lossy(&output.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH msgnode"),
        "{page}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let output = msgnode(&["man", "-o", dir.path().to_str().expect("utf8")]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(dir.path().join("msgnode-policy-test.1").exists());
}

#[test]
fn policy_build_writes_an_opa_bundle_and_signs_it() {
    let dir = tree(&[
        ("p/t.rego", POLICY_T),
        (
            "p/t_test.rego",
            "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\n",
        ),
        ("p/config/data.json", r#"{"names": ["alice"]}"#),
    ]);
    let p = dir.path().join("p");
    let out = dir.path().join("b.tar.gz");
    let build = |extra: &[&str]| {
        let mut args = vec!["policy", "build", p.to_str().expect("utf8"), "-o"];
        args.push(out.to_str().expect("utf8"));
        args.extend_from_slice(extra);
        msgnode(&args)
    };
    let listing = || {
        let listed = Command::new("tar")
            .args(["-tzf", out.to_str().expect("utf8")])
            .output()
            .expect("tar");
        String::from_utf8_lossy(&listed.stdout).into_owned()
    };
    let output = build(&["--revision", "v1"]);
    assert!(output.status.success(), "{}", text(&output));
    let names = listing();
    for name in [".manifest", "t.rego", "t_test.rego", "data.json"] {
        assert!(
            names.lines().any(|l| l.trim_start_matches('/') == name),
            "{name}: {names}"
        );
    }
    let key = dir.path().join("key.pem");
    let key = key.to_str().expect("utf8");
    let generated = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out", key])
        .output()
        .expect("openssl");
    assert!(generated.status.success());
    let output = build(&["--signing-key", key, "--key-id", "k1"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(listing().contains(".signatures.json"));
    let output = build(&["--signing-key", "/nonexistent.pem"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("/nonexistent.pem"),
        "{}",
        text(&output)
    );
}

/// The shipped fixtures as a decision log in OPA's shape: the expected decision as the
/// logged result, the `ping` one with a masked token.
fn fixture_log(dir: &std::path::Path) -> std::path::PathBuf {
    let fixtures = common::shipped_policies().join("fixtures");
    let mut lines = String::new();
    let mut names: Vec<_> = std::fs::read_dir(&fixtures)
        .expect("fixtures")
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    for path in names {
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("json");
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let mut record = serde_json::json!({
            "decision_id": name,
            "path": "msgnode/authz/decision",
            "input": fixture["input"],
            "result": fixture["expect"],
            "requested_by": "bus",
        });
        if name == "message_allow_ping_uppercase" {
            record["input"]["message"]["body"]["idToken"] = "**REDACTED**".into();
            record["erased"] = serde_json::json!(["/input/message/body/idToken"]);
        }
        lines.push_str(&record.to_string());
        lines.push('\n');
    }
    let log = dir.join("decisions.jsonl");
    std::fs::write(&log, lines).expect("write log");
    log
}

#[test]
fn policy_replay_re_decides_a_log_and_groups_what_changes() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let log = fixture_log(scratch.path());
    let log = log.to_str().expect("utf8");
    // The bundle the log was made with: nothing changes.
    let same = msgnode(&[
        "policy",
        "replay",
        "--log",
        log,
        "--bundle",
        "policies",
        "--fail-on-difference",
    ]);
    let out = text(&same);
    assert!(same.status.success(), "{out}");
    assert!(out.contains("allow → deny: 0   deny → allow: 0"), "{out}");
    assert!(
        out.contains("/input/message/body/idToken (1)"),
        "masked fields are said: {out}"
    );
    // A candidate that no longer allows `ping`: that allow becomes a deny, with its reason.
    let candidate = common::policies_with(|data| {
        let types = data["message"]["allowed_types"]
            .as_array_mut()
            .expect("types");
        types.retain(|t| t != "ping");
    });
    let bundle = candidate.path().to_str().expect("utf8");
    let changed = msgnode(&["policy", "replay", "--log", log, "--bundle", bundle]);
    let out = text(&changed);
    assert!(changed.status.success(), "{out}");
    assert!(out.contains("allow → deny: 1   deny → allow: 0"), "{out}");
    assert!(out.contains("allow → deny  kind message  reason"), "{out}");
    assert!(out.contains("e.g. message_allow_ping_uppercase"), "{out}");
    assert!(out.contains("1 of them had masked fields"), "{out}");
    let failing = msgnode(&[
        "policy",
        "replay",
        "--log",
        log,
        "--bundle",
        bundle,
        "--fail-on-difference",
        "-f",
        "json",
    ]);
    assert_eq!(failing.status.code(), Some(1), "{}", text(&failing));
    let report: serde_json::Value = serde_json::from_slice(&failing.stdout).expect("json");
    assert_eq!(report["allow_to_deny"], 1);
    assert_eq!(
        report["changed"][0]["examples"][0]["decision_id"],
        "message_allow_ping_uppercase"
    );
}
