//! The node's wall clock, read in the two forms it is written down in: milliseconds since the
//! Unix epoch (stored records, registry entries) and RFC 3339 seconds (policy inputs'
//! `context.time`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now as RFC 3339 in UTC, to the second (`2026-11-25T09:00:00Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}
