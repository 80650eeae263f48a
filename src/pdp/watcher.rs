//! Hot reload: watches the policy directory and reloads the bundle after changes settle.
//!
//! File events are debounced (`[pdp] reload_debounce`, default 100 ms) so an editor's
//! write-rename-chmod burst causes one reload. A reload that fails leaves the previous
//! revision serving (see `Pdp::reload`). If the directory does not exist yet, or disappears,
//! the watcher says so once and looks for it again with backoff (up to every 30 s), loading
//! it when it appears.

use std::path::PathBuf;
use std::time::Duration;

use notify_debouncer_mini::{new_debouncer, DebounceEventResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Pdp;
use crate::retry::Backoff;

/// How often a missing policy directory is looked for: first after a second, then less
/// often, up to this.
const MISSING_DIR_RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs until `shutdown` is cancelled. Spawn it on a tracked task.
pub async fn watch(pdp: Pdp, dir: PathBuf, debounce: Duration, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_secs(1), MISSING_DIR_RETRY_MAX);
    loop {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let debouncer = new_debouncer(debounce, move |result: DebounceEventResult| {
            if result.is_ok() {
                // A full queue already holds a pending reload; that one will see this change.
                let _ = tx.try_send(());
            }
        });
        let mut debouncer = match debouncer {
            Ok(d) => d,
            Err(error) => {
                tracing::error!(%error, "cannot start the policy file watcher; hot reload is off");
                return;
            }
        };
        if let Err(error) = debouncer
            .watcher()
            .watch(&dir, notify::RecursiveMode::Recursive)
        {
            let (delay, first) = backoff.failure();
            match first {
                true => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot watch the policy directory; looking for it again with backoff")
                }
                false => {
                    tracing::debug!(dir = %dir.display(), %error, retry_in = ?delay, "policy directory still missing")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            if dir.is_dir() {
                reload(&pdp).await;
            }
            continue;
        }
        if backoff.success() {
            tracing::info!(dir = %dir.display(), "policy directory found; watching it");
            reload(&pdp).await;
        }
        tracing::debug!(dir = %dir.display(), "watching policy directory");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = rx.recv() => {
                    if event.is_none() {
                        break;
                    }
                    reload(&pdp).await;
                    if !dir.is_dir() {
                        // The watched directory is gone: start over and wait for it.
                        break;
                    }
                }
            }
        }
    }
}

async fn reload(pdp: &Pdp) {
    let pdp = pdp.clone();
    // Errors are recorded in the PDP's status and logged by `reload` itself.
    let _ = tokio::task::spawn_blocking(move || pdp.reload()).await;
}
