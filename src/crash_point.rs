//! Crash points for the crash harness: with
//! `CRYPTOPULSE_CRASH_AT=<point>:<records>` the process aborts, like a
//! kill -9, the first time it passes `<point>` once it has read at least
//! `<records>` records. Each point is passed with how far the work passing
//! it reaches, so the harness arms them by progress and production code
//! keeps no counts for it. Unset, a crash point costs one load of a
//! `OnceLock`.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable arming a crash point.
pub const CRASH_AT_ENV: &str = "CRYPTOPULSE_CRASH_AT";

/// What an armed point writes to stderr before it aborts; the harness
/// looks for it to tell a crash point from any other abort.
pub const ABORT_MESSAGE: &str = "crash point reached: aborting";

/// A place in the consumer where a crash is most likely to break exactly
/// once, in the order a batch passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CrashPoint {
    /// A poll round is decoded, before the loop sees it.
    AfterDecode,
    /// A batch changed the window state, before its bars reach Redis.
    AfterStateUpdate,
    /// Redis acknowledged bars, before their checkpoint.
    AfterRedisWrite,
    /// A checkpoint's batch is built, before RocksDB writes it.
    InsideCheckpoint,
}

impl CrashPoint {
    /// Every point, in the order a batch passes them.
    pub const ALL: [CrashPoint; 4] =
        [CrashPoint::AfterDecode, CrashPoint::AfterStateUpdate, CrashPoint::AfterRedisWrite, CrashPoint::InsideCheckpoint];

    /// The name used in [`CRASH_AT_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::AfterDecode => "after_decode",
            CrashPoint::AfterStateUpdate => "after_state_update",
            CrashPoint::AfterRedisWrite => "after_redis_write",
            CrashPoint::InsideCheckpoint => "inside_checkpoint",
        }
    }

    /// The point of a name, if there is one.
    pub fn from_name(name: &str) -> Option<CrashPoint> {
        CrashPoint::ALL.into_iter().find(|point| point.name() == name)
    }

    /// The value of [`CRASH_AT_ENV`] arming this point at `records`.
    pub fn arm_at(self, records: u64) -> String {
        format!("{}:{records}", self.name())
    }

    /// Passes the point with the work reaching `records` records read by
    /// this process: aborts if the point is armed at or below that. Built
    /// without the `crash-points` feature (the Docker image), never.
    pub fn pass(self, records: u64) {
        if !cfg!(feature = "crash-points") {
            return;
        }
        if let Some(armed) = armed() {
            if armed.point == self && records >= armed.at {
                eprintln!("{ABORT_MESSAGE} ({self} at {records} records)");
                std::process::abort();
            }
        }
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The point armed through the environment, and from how many records on.
#[derive(Debug, PartialEq, Eq)]
struct Armed {
    point: CrashPoint,
    at: u64,
}

/// `<point>:<records>`, or `<point>` alone for the first pass. Anything else
/// arms nothing, and says so.
fn parse(value: &str) -> Option<Armed> {
    let (name, at) = value.split_once(':').unwrap_or((value, "0"));
    let armed = CrashPoint::from_name(name).zip(at.parse().ok()).map(|(point, at)| Armed { point, at });
    if armed.is_none() {
        eprintln!("{CRASH_AT_ENV}={value:?} is not <point>:<records>: no crash point armed");
    }
    armed
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| std::env::var(CRASH_AT_ENV).ok().and_then(|value| parse(&value))).as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_is_armed_by_name_and_records() {
        assert_eq!(parse("after_redis_write:120"), Some(Armed { point: CrashPoint::AfterRedisWrite, at: 120 }));
        assert_eq!(parse("inside_checkpoint"), Some(Armed { point: CrashPoint::InsideCheckpoint, at: 0 }));
        assert_eq!(parse(&CrashPoint::AfterDecode.arm_at(7)), Some(Armed { point: CrashPoint::AfterDecode, at: 7 }));
        assert_eq!(parse("after_lunch:1"), None);
        assert_eq!(parse("after_decode:many"), None);
    }

    #[test]
    fn every_point_has_a_name_of_its_own() {
        for point in CrashPoint::ALL {
            assert_eq!(CrashPoint::from_name(point.name()), Some(point));
        }
    }
}
