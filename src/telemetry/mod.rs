//! Process telemetry: the process's own log (`tracing`) and its Prometheus metrics about
//! itself (`process`: build info, CPU, memory, file descriptors).
//!
//! Logs go to stderr so that stdout stays free for decision logs and command output. Level
//! and format come from `[log]`; `RUST_LOG` overrides the level. Colours only when stderr is
//! a terminal. The level can change while the node runs ([`LogHandle::set_level`], on
//! SIGHUP).

pub mod process;

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// Changes the log level of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle(Option<reload::Handle<EnvFilter, Registry>>);

impl LogHandle {
    /// Applies `[log] level` (ignored while `RUST_LOG` is set: it wins, as at start).
    ///
    /// # Errors
    /// Not a valid filter; the level in force stays.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(());
        }
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("[log] level {level:?}: {e}"))?;
        match &self.0 {
            Some(handle) => handle.reload(filter).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored,
/// and its handle changes nothing).
pub fn init(config: &LogConfig) -> LogHandle {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match config.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    LogHandle(installed.ok().map(|()| handle))
}
