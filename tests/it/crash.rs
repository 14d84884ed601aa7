//! SPEC §7 end to end: the consumer binary, SIGKILLed at random instants and
//! aborted at every named crash point, leaves Redis identical to a run that
//! never crashed. `CRYPTOPULSE_CRASH_SEED` replays a failing seed.

use std::path::PathBuf;

use cryptopulse::crash_point::CrashPoint;
use cryptopulse::tooling::crashtest::{self, Cadence, CrashConfig};

use crate::common::fixture::{ARCHIVE, BARS};
use crate::common::Lane;

const KILLS: u32 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_and_crash_points_leave_redis_identical_to_an_uncrashed_run() {
    let lane = Lane::new("crash");
    let work = tempfile::tempdir().unwrap();
    let seed = match std::env::var("CRYPTOPULSE_CRASH_SEED") {
        Ok(seed) => seed.parse().unwrap(),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    println!("crash test seed {seed} (CRYPTOPULSE_CRASH_SEED={seed} replays it)");
    let config = CrashConfig {
        consumer_bin: PathBuf::from(env!("CARGO_BIN_EXE_consumer")),
        inputs: vec![PathBuf::from(ARCHIVE)],
        kafka: lane.kafka.clone(),
        redis: lane.redis.clone(),
        work_dir: work.path().join("run"),
        kills: KILLS,
        seed,
        named_points: true,
        cadence: Cadence::default(),
        progress: false,
    };
    let report = crashtest::run(config).await.unwrap();
    println!("{report}");
    assert!(report.identical, "redis differs from the uncrashed run, seed {seed}:\n{report}");
    assert_eq!((report.missing, report.extra), (0, 0), "bars missing / extra, seed {seed}");
    assert!(report.kills_done >= KILLS, "{report}");
    assert_eq!(report.crash_points_hit, CrashPoint::ALL, "every named crash point must fire, seed {seed}");
    assert_eq!(report.bars, BARS as usize, "the reference run wrote every bar of the fixture");
    // One injected bad record per slice, each dead-lettered with its source.
    assert!(report.dead_letters > KILLS as usize, "{report}");
    assert_eq!((report.dead_letters_missing, report.dead_letters_extra), (0, 0), "dead letters missing / extra, seed {seed}");
    assert!(report.passed());
}
