//! Process telemetry: the process's own log (`tracing`) and its Prometheus metrics about
//! itself (`process`: build info, CPU, memory, file descriptors).
//!
//! Logs go to stderr so that stdout stays free for decision logs and command output. Level
//! and format come from `[log]`; `RUST_LOG` overrides the level. Colours only when stderr is
//! a terminal. The level can change while the node runs ([`LogHandle::set_level`], on
//! SIGHUP).
//!
//! Lines are formatted on the thread that logs and written to stderr by a thread of its own
//! ([`Batched`], woken once per burst), so an HTTP request's access-log line costs no system
//! call on the request's thread. Nothing is dropped: when the queue is full the line is
//! written at once, from the logging thread; [`LogHandle::flush`] waits for what is queued
//! (the node calls it before it exits).

pub mod process;

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::batch::Batched;
use crate::config::{LogConfig, LogFormat};

/// Changes the log level of the installed subscriber, and flushes its lines.
#[derive(Clone)]
pub struct LogHandle(
    Option<reload::Handle<EnvFilter, Registry>>,
    Option<Arc<Batched<Line>>>,
);

/// What the stderr writer thread is given.
enum Line {
    /// A formatted line.
    Text(Vec<u8>),
    /// Answer once everything queued before is written.
    Flushed(std::sync::mpsc::Sender<()>),
}

/// Lines that may wait for stderr before the next ones are written at once.
const QUEUE_LINES: usize = 16 * 1024;

/// How long [`LogHandle::flush`] waits for the queued lines at most.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The `tracing` writer that queues each line for the stderr thread.
struct QueuedStderr(Arc<Batched<Line>>);

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = LineWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// One event's writer: the formatter hands it the whole line in one write.
struct LineWriter<'a>(&'a Batched<Line>);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(Line::Text(text)) = self.0.send(Line::Text(buf.to_vec())) {
            // Full (or gone): written now rather than lost.
            std::io::stderr().write_all(&text)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the stderr writer thread (`None`: it could not start; lines are then written
/// from the logging threads).
fn stderr_thread() -> Option<Arc<Batched<Line>>> {
    let mut err = std::io::BufWriter::new(std::io::stderr());
    Batched::spawn("log-writer", QUEUE_LINES, move |line| {
        let _ = match line {
            Some(Line::Text(text)) => err.write_all(&text),
            Some(Line::Flushed(done)) => {
                let _ = err.flush();
                done.send(()).map_err(std::io::Error::other)
            }
            None => err.flush(),
        };
    })
    .ok()
    .map(Arc::new)
}

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

    /// Waits (a few seconds at most) until every line logged before is written.
    pub fn flush(&self) {
        if let Some(queue) = &self.1 {
            let (done, flushed) = std::sync::mpsc::channel();
            if queue.send(Line::Flushed(done)).is_ok() {
                let _ = flushed.recv_timeout(FLUSH_WAIT);
            }
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
    let queue = stderr_thread();
    let writer = || {
        queue.clone().map_or_else(
            || BoxMakeWriter::new(std::io::stderr),
            |queue| BoxMakeWriter::new(QueuedStderr(queue)),
        )
    };
    let installed = match config.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(writer()),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer()),
            )
            .try_init(),
    };
    match installed {
        Ok(()) => LogHandle(Some(handle), queue),
        // Another subscriber was installed first: this one's thread ends with its queue.
        Err(_) => LogHandle(None, None),
    }
}
