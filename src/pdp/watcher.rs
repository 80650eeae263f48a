//! Hot reload: watches the policy directory and reloads the bundle after changes settle.
//!
//! Only events that can change what a file holds count ([`changes`]): the inotify backend
//! also reports every open and close of an unchanged file, and a reload opens every file
//! of the bundle, so counting those made each reload the cause of the next one. File
//! events are debounced (`[pdp] reload_debounce`, default 100 ms) so an editor's
//! write-rename-chmod burst causes one reload. A reload that fails leaves the previous
//! revision serving (see `Pdp::reload`). If the directory does not exist yet, or disappears,
//! the watcher says so once and looks for it again with backoff (up to every 30 s), loading
//! it when it appears.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Pdp;
use crate::retry::Backoff;

/// How often a missing policy directory is looked for: first after a second, then less
/// often, up to this.
const MISSING_DIR_RETRY_MAX: Duration = Duration::from_secs(30);

/// Whether an event of `kind` may have changed a file's content, name or presence: not a
/// read (an open, a close after reading, an access).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches `paths` (recursively) and calls `changed` for each event that may have changed a
/// file (see [`is_change`]); the watcher stops when dropped.
///
/// # Errors
/// When the watcher cannot start or a path cannot be watched (a missing directory).
pub fn changes(
    paths: &[&Path],
    changed: impl Fn() + Send + 'static,
) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| is_change(&e.kind)) {
            changed();
        }
    })?;
    for path in paths {
        watcher.watch(path, RecursiveMode::Recursive)?;
    }
    Ok(watcher)
}

/// Runs until `shutdown` is cancelled. Spawn it on a tracked task.
pub async fn watch(pdp: Pdp, dir: PathBuf, debounce: Duration, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_secs(1), MISSING_DIR_RETRY_MAX);
    loop {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        // A full queue already holds a pending reload; that one will see this change.
        let _watcher = match changes(&[&dir], move || {
            let _ = tx.try_send(());
        }) {
            Ok(watcher) => watcher,
            Err(error) => {
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
        };
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
                    // Let a burst of saves settle into one reload.
                    tokio::time::sleep(debounce).await;
                    while rx.try_recv().is_ok() {}
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
