//! Named crash points for the crash harness: with
//! `CRYPTOPULSE_CRASH_AT=<point>:<n>` the process aborts, like a kill -9,
//! the n-th time it passes `<point>`. Unset, a crash point costs one relaxed
//! atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the crash point.
pub const CRASH_AT_ENV: &str = "CRYPTOPULSE_CRASH_AT";

/// Every named point, in the order a batch passes them.
pub const POINTS: &[&str] = &["after_decode", "after_state_update", "after_redis_write", "inside_checkpoint"];

struct Armed {
    point: String,
    remaining: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(CRASH_AT_ENV).ok()?;
            let (point, n) = value.split_once(':').unwrap_or((&value, "1"));
            Some(Armed { point: point.to_owned(), remaining: AtomicU64::new(n.parse().unwrap_or(1)) })
        })
        .as_ref()
}

/// Aborts the process if this point is armed and its count is reached.
pub fn crash_point(point: &str) {
    crash_points(point, 1);
}

/// `passes` passes of `point` at once (work that was merged passes it once
/// per piece, as the harness counts): aborts if the armed count is among them.
pub fn crash_points(point: &str, passes: u64) {
    let Some(armed) = armed() else { return };
    if armed.point != point || passes == 0 {
        return;
    }
    let before = armed.remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| Some(left.saturating_sub(passes)));
    if before.is_ok_and(|left| (1..=passes).contains(&left)) {
        eprintln!("crash point {point} reached: aborting");
        std::process::abort();
    }
}
