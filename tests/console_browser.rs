//! The console in a real browser: headless Chromium (the distribution's package, installed
//! by `scripts/chromium`) driven over the DevTools protocol. The tail shows a decision made
//! a moment before, a filter narrows it, the playground shows a deny with its reason, and a
//! failed reload appears with its file:line:col. It writes a screenshot to
//! `target/tmp/console.png`; with `MSGNODE_UPDATE_SCREENSHOT=1` it updates `docs/console.png`,
//! the README's, instead (so a plain test run leaves the tree as it was).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::network::{Headers, SetExtraHttpHeadersParams};
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::page::{Page, ScreenshotParams};
use common::console::{ConsoleNode, TOKEN};
use futures_util::StreamExt;
use serde_json::{json, Value};

const SECRET: &str = "secret-lunch-4711";

/// The Chromium `scripts/chromium` installs (or finds), or why there is none.
fn chromium() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/chromium");
    let output = std::process::Command::new(script)
        .arg("path")
        .output()
        .map_err(|e| format!("cannot run scripts/chromium: {e}"))?;
    match output.status.success() {
        true => Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        )),
        false => Err(String::from_utf8_lossy(&output.stderr).trim().to_string()),
    }
}

/// Evaluates `expression` in the page until it is truthy; returns its value.
async fn until(page: &Page, what: &str, expression: &str) -> Value {
    let start = Instant::now();
    loop {
        let value: Value = match page.evaluate(expression).await {
            Ok(result) => result.into_value().unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let truthy = match &value {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return value;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let text = page
                .evaluate("document.body.innerText")
                .await
                .ok()
                .and_then(|r| r.into_value::<String>().ok())
                .unwrap_or_default();
            panic!("{what}: not within 30 s; the page shows:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_js(page: &Page, script: &str) {
    page.evaluate(script).await.expect("script");
}

#[tokio::test]
async fn the_console_in_headless_chromium() {
    let executable = match chromium() {
        Ok(path) => path,
        Err(why) => {
            eprintln!("SKIPPED console_browser: no Chromium could be installed ({why})");
            return;
        }
    };
    let node = ConsoleNode::start(
        false,
        Some(|data| {
            if let Some(types) = data["message"]["allowed_types"].as_array_mut() {
                types.retain(|t| t != "create");
            }
        }),
    )
    .await;
    // Decisions made before the page opens: one allowed (with a masked secret), one denied.
    let allowed = node
        .decide_fixture("message_allow_hyperty_create", |input| {
            input["message"]["body"]["value"]["name"] = json!(SECRET);
        })
        .await;
    let denied = node
        .decide_fixture("message_deny_blocked_user", |_| {})
        .await;

    let profile = tempfile::tempdir().expect("profile");
    let config = BrowserConfig::builder()
        .chrome_executable(&executable)
        .new_headless_mode()
        .no_sandbox()
        .args([
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .user_data_dir(profile.path())
        .window_size(1400, 2200)
        .viewport(None)
        .build()
        .expect("browser config");
    let (mut browser, mut handler) = Browser::launch(config).await.expect("launch Chromium");
    let driver = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let page = browser.new_page("about:blank").await.expect("page");
    page.execute(SetExtraHttpHeadersParams::new(Headers::new(
        json!({"Authorization": format!("Bearer {TOKEN}")}),
    )))
    .await
    .expect("token header");
    page.goto(format!("{}/console", node.base))
        .await
        .expect("open the console");

    // The tail shows the decisions made a moment before.
    let tail = format!(
        "(() => {{ const t = document.querySelector('#tail-rows').innerText; return t.includes('{allowed}') && t.includes('{denied}'); }})()"
    );
    until(&page, "the tail shows both decisions", &tail).await;
    // A filter narrows it: only denies.
    run_js(
        &page,
        "document.querySelector('#filters [name=result]').value = 'deny'",
    )
    .await;
    page.find_element("#filters button[type=submit]")
        .await
        .expect("filter button")
        .click()
        .await
        .expect("click");
    let narrowed = format!(
        "(() => {{ const rows = [...document.querySelectorAll('#tail-rows tr')]; const t = rows.map(r => r.innerText).join('\\n'); return rows.length > 0 && t.includes('{denied}') && !t.includes('{allowed}') && rows.every(r => r.children[1].innerText === 'deny'); }})()"
    );
    until(&page, "the deny filter keeps only denies", &narrowed).await;
    // The playground: a fixture the active bundle denies, with its reason, beside the candidate.
    until(
        &page,
        "fixtures are listed",
        "document.querySelectorAll('#pg-fixture option').length > 1",
    )
    .await;
    run_js(
        &page,
        "(() => { const s = document.querySelector('#pg-fixture'); s.value = [...s.options].find(o => o.value.endsWith('message_deny_blocked_user.json')).value; })()",
    )
    .await;
    page.find_element("#pg-run")
        .await
        .expect("run")
        .click()
        .await
        .expect("click");
    let verdict = until(
        &page,
        "the playground shows a deny with its reason",
        "(() => { const t = document.querySelector('#pg-active .verdict').innerText; return t.startsWith('deny') && t.includes('blocked') ? t : ''; })()",
    )
    .await;
    assert!(
        verdict.as_str().is_some_and(|t| t.contains("blocked")),
        "{verdict}"
    );
    until(
        &page,
        "the candidate side too",
        "document.querySelector('#pg-candidate .verdict').innerText.startsWith('deny')",
    )
    .await;
    // The shadow's difference (the candidate no longer allows `create`).
    until(
        &page,
        "the shadow difference is shown",
        &format!("document.querySelector('#shadow-recent').innerText.includes('{allowed}')"),
    )
    .await;
    // A failed reload appears, with where.
    let broken = node.policies.join("msgnode/broken.rego");
    std::fs::write(&broken, "package msgnode.broken\n\nallow if {\n").expect("break the bundle");
    let location = until(
        &page,
        "the failed reload is shown",
        "(() => { const l = document.querySelector('#reload-failed .location'); return l ? l.innerText : ''; })()",
    )
    .await;
    let location = location.as_str().unwrap_or("");
    assert!(location.contains("broken.rego:"), "{location}");
    assert_eq!(
        location
            .split(':')
            .filter(|p| p.parse::<u32>().is_ok())
            .count(),
        2,
        "file:line:col: {location}"
    );
    // Back to the whole tail for the picture; the masked value is nowhere on the page.
    page.find_element("#filters-clear")
        .await
        .expect("clear")
        .click()
        .await
        .expect("click");
    until(&page, "the tail is whole again", &tail).await;
    until(
        &page,
        "coverage is shown",
        "document.querySelectorAll('#coverage-files details').length > 0",
    )
    .await;
    until(
        &page,
        "the chart has a series",
        "document.querySelectorAll('#chart rect').length > 0",
    )
    .await;
    // Open a module with uncovered lines, for the picture.
    run_js(&page, "(() => { const d = [...document.querySelectorAll('#coverage-files details')].find(d => !d.innerText.includes('(0 lines')); if (d) d.open = true; })()").await;
    let html = page.content().await.expect("content");
    assert!(!html.contains(SECRET), "a masked field reached the page");

    let png = page
        .screenshot(
            ScreenshotParams::builder()
                .format(CaptureScreenshotFormat::Png)
                .full_page(true)
                .build(),
        )
        .await
        .expect("screenshot");
    let update = std::env::var("MSGNODE_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");
    let dir = match update {
        true => Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"),
        false => PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    };
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    let shot = dir.join("console.png");
    std::fs::write(&shot, png).expect("screenshot");
    eprintln!("console screenshot: {}", shot.display());

    browser.close().await.expect("close");
    let _ = browser.wait().await;
    driver.abort();
    node.stop().await;
}
