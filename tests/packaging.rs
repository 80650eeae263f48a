//! The packaging in `contrib/`, linted where it cannot run: the systemd unit (with
//! `systemd-analyze verify` where it is installed), the Dockerfile and the compose stack
//! (msgnode + Synapse + PostgreSQL), checked against each other and against msgnode's own
//! configuration parser.

use std::path::{Path, PathBuf};
use std::process::Command;

use msgnode::config::Config;

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> yaml_serde::Value {
    yaml_serde::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_systemd_unit_verifies_and_reloads_with_sighup() {
    let unit = read(&contrib("systemd/msgnode.service"));
    for needed in [
        "[Unit]",
        "[Service]",
        "[Install]",
        "ExecStart=/usr/local/bin/msgnode --config /etc/msgnode/msgnode.toml run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "User=msgnode",
    ] {
        assert!(unit.lines().any(|l| l == needed), "{needed} missing");
    }
    let verify = Command::new("systemd-analyze").arg("--version").output();
    if verify.is_err() {
        eprintln!("systemd-analyze not installed: structural checks only");
        return;
    }
    // verify wants the binary where ExecStart says: point it at the one just built.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("msgnode.service");
    let unit = unit.replace("/usr/local/bin/msgnode", env!("CARGO_BIN_EXE_msgnode"));
    std::fs::write(&copy, unit).expect("write");
    let output = Command::new("systemd-analyze")
        // The man page is installed with the binary (`msgnode man -o`), not here.
        .args(["verify", "--man=no", copy.to_str().expect("utf8")])
        .output()
        .expect("systemd-analyze");
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    let own: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("msgnode.service"))
        .collect();
    assert!(
        own.is_empty(),
        "systemd-analyze complains:\n{}",
        own.join("\n")
    );
}

#[test]
fn the_compose_stack_hangs_together() {
    let compose_file = contrib("docker/compose.yaml");
    let compose = yaml(&compose_file);
    let services = &compose["services"];
    for name in ["postgres", "synapse", "msgnode", "registration"] {
        assert!(services[name].is_mapping(), "service {name} missing");
    }
    let depends = |service: &str, on: &str| {
        services[service]["depends_on"][on]["condition"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(
        depends("msgnode", "synapse").as_deref(),
        Some("service_healthy")
    );
    assert_eq!(
        depends("synapse", "postgres").as_deref(),
        Some("service_healthy")
    );
    assert_eq!(
        depends("synapse-keys", "registration").as_deref(),
        Some("service_completed_successfully")
    );
    // Every build and bind mount names a file that exists.
    let base = compose_file.parent().expect("dir");
    let build = &services["msgnode"]["build"];
    let context = base.join(build["context"].as_str().expect("context"));
    assert!(context
        .join(build["dockerfile"].as_str().expect("dockerfile"))
        .is_file());
    for (name, service) in services.as_mapping().expect("services") {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume
                .as_str()
                .expect("short volume syntax")
                .split(':')
                .next()
                .expect("source");
            if source.starts_with('.') {
                assert!(base.join(source).exists(), "{name:?}: {source} missing");
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{name:?}: volume {source} undeclared"
                );
            }
        }
    }

    // msgnode's config parses, and agrees with Synapse's and the registration's.
    let config = Config::load(Some(&contrib("docker/msgnode.toml"))).expect("msgnode.toml");
    assert!(config.pep.enabled && config.bus.enabled);
    assert_eq!(config.pep.homeserver, "http://synapse:8008");
    let homeserver = yaml(&contrib("docker/synapse/homeserver.yaml"));
    assert_eq!(
        homeserver["server_name"].as_str(),
        Some(config.pep.server_name.as_str())
    );
    let registration = config
        .pep
        .registration
        .as_ref()
        .expect("registration")
        .display()
        .to_string();
    assert_eq!(
        homeserver["app_service_config_files"][0].as_str(),
        Some(registration.as_str())
    );
    assert_eq!(homeserver["database"]["name"].as_str(), Some("psycopg2"));
    assert_eq!(
        homeserver["database"]["args"]["host"].as_str(),
        Some("postgres")
    );
    assert_eq!(homeserver["listeners"][0]["port"].as_u64(), Some(8008));
    let command = services["registration"]["command"][0]
        .as_str()
        .expect("command");
    assert!(command.contains(&format!("-o {registration}")), "{command}");
    assert!(command.contains("--url http://msgnode:8009"), "{command}");
    let ports: Vec<&str> = services["msgnode"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for listen in [config.pdp.listen, config.pep.listen, config.bus.listen] {
        assert!(
            ports
                .iter()
                .any(|p| p.ends_with(&format!(":{}", listen.port()))),
            "{listen} not published: {ports:?}"
        );
    }
    yaml(&contrib("docker/synapse/log.yaml"));
}

#[test]
fn the_dockerfile_builds_msgnode_and_runs_it_unprivileged() {
    let dockerfile = read(&contrib("docker/Dockerfile"));
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(instructions
        .first()
        .is_some_and(|l| l.starts_with("FROM ") && l.ends_with(" AS build")));
    assert_eq!(
        instructions
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2,
        "a build stage and a runtime stage"
    );
    assert!(instructions
        .iter()
        .any(|l| l.contains("cargo build --release --locked")));
    assert!(instructions.contains(&"USER msgnode"), "runs unprivileged");
    let config = Config::load(Some(&contrib("docker/msgnode.toml"))).expect("msgnode.toml");
    let expose = instructions
        .iter()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    for listen in [config.pdp.listen, config.pep.listen, config.bus.listen] {
        assert!(
            expose
                .split_whitespace()
                .any(|p| p == listen.port().to_string()),
            "{listen}: {expose}"
        );
    }
    // What the runtime stage copies from the repository exists; the config it reads is the
    // one compose mounts.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for line in instructions
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let source = line.split_whitespace().nth(1).expect("source");
        assert!(source == "." || repo.join(source).exists(), "{line}");
    }
    assert!(dockerfile.contains("\"/etc/msgnode/msgnode.toml\""));
    assert!(read(&contrib("docker/compose.yaml"))
        .contains("./msgnode.toml:/etc/msgnode/msgnode.toml:ro"));
}
