//! `msgnode policy test` catches a policy that decides differently on another engine: on the
//! bytecode VM (always checked) and on the real OPA engine (`--opa`, the library
//! `scripts/opa` installs, as `scripts/synapse` installs Synapse). `scripts/test` runs the
//! shipped bundle through the same check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn opa_library() -> PathBuf {
    let output = Command::new(Path::new(REPO).join("scripts/opa"))
        .arg("path")
        .output()
        .expect("run scripts/opa");
    assert!(
        output.status.success(),
        "scripts/opa path failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// A bundle with one fixture, its schema dir, and `policy test` run on it with `extra` args.
fn policy_test(policy: &str, test: &str, fixture: &str, extra: &[&str]) -> (String, Output) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in [
        ("p/t.rego", policy),
        ("p/t_test.rego", test),
        ("p/fixtures/f.json", fixture),
        ("schemas/input.schema.json", r#"{"type": "object"}"#),
    ] {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, text).expect("write");
    }
    let (p, schemas) = (dir.path().join("p"), dir.path().join("schemas"));
    let mut args = vec![
        "policy".to_string(),
        "test".into(),
        p.display().to_string(),
        "--schemas".into(),
        schemas.display().to_string(),
        "--decision".into(),
        "data.t.decision".into(),
        "-v".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let output = Command::new(env!("CARGO_BIN_EXE_msgnode"))
        .args(&args)
        .output()
        .expect("run msgnode");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (text, output)
}

const DECISION: &str = "decision := {\"allow\": allow, \"reasons\": []}\ndefault allow := false\n";

#[test]
fn a_negated_call_on_an_undefined_value_fails_on_opa() {
    // OPA reads `not f(x)` with x undefined as undefined; regorus as true.
    let policy = format!("package t\n{DECISION}f(x) if x == 1\nallow if not f(input.x)\n");
    let test = "package t_test\ntest_absent_x_allowed if data.t.allow with input as {}\n";
    let fixture = r#"{"input": {"x": 2}, "expect": {"allow": true}}"#;
    let library = opa_library();
    let library = library.to_str().expect("utf8 path");

    let (out, output) = policy_test(&policy, test, fixture, &["--opa", library]);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL data.t_test.test_absent_x_allowed")
            && out.contains("passes here, fails on opa: undefined"),
        "{out}"
    );
    assert!(
        out.contains("PASS ") && out.contains("f.json ("),
        "the fixture agrees: {out}"
    );
    let variants = out
        .lines()
        .skip_while(|l| !l.contains("f.json variants"))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        variants.starts_with("FAIL")
            && variants.contains(r#"x: removed: opa={"allow":false,"reasons":[]}, interpreter={"allow":true,"reasons":[]}"#),
        "{out}"
    );

    // Without OPA, both regorus engines read it alike: nothing to report.
    let (out, output) = policy_test(&policy, test, fixture, &[]);
    assert!(output.status.success(), "{out}");
}

#[test]
fn an_ill_typed_field_the_vm_reads_otherwise_fails_the_variants() {
    // A builtin given the wrong type: an error on the interpreter, undefined on the VM.
    let policy = format!("package t\n{DECISION}allow if not startswith(input.x, \"a\")\n");
    let fixture = r#"{"input": {"x": "b"}, "expect": {"allow": true}}"#;
    let (out, output) = policy_test(&policy, "package t_test\n", fixture, &[]);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(
        out.contains("f.json variants") && out.contains("x: another type: vm="),
        "{out}"
    );
}

#[test]
fn a_missing_opa_library_is_a_clear_error() {
    let (out, output) = policy_test(
        &format!("package t\n{DECISION}"),
        "package t_test\n",
        r#"{"input": {}, "expect": {"allow": false}}"#,
        &["--opa", "/no/such/libopabridge.so"],
    );
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(
        out.contains("cannot load the OPA library /no/such/libopabridge.so")
            && out.contains("scripts/opa path"),
        "{out}"
    );
}
