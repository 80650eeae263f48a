//! `msgnode policy test|check|eval` as a security team runs them: the real binary, its
//! output and exit codes — on the shipped bundle and on broken ones.

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
    let output = msgnode(&["policy", "test", "policies", "--coverage"]);
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
    assert!(out.contains("PASS data.t_test.test_ok"), "{out}");
    assert!(out.contains("FAIL data.t_test.test_bad"), "{out}");
    assert!(out.contains("1 passed, 1 failed"), "{out}");

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
        args.push("data.t.allow".into());
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
