//! Wall-clock time as AWS and Azure use it in tokens, records and TTLs: Unix seconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it, which no real host is).
pub fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}

/// `at` in seconds since the Unix epoch (0 before it).
pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
