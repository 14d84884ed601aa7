//! One measured child process: wall time, CPU time and peak resident memory
//! of that process alone. CPU comes from the children's times this process
//! collects when it reaps one (`cutime`/`cstime` of `/proc/self/stat`, as
//! `getrusage(RUSAGE_CHILDREN)`), so only one measured child may run at a
//! time; peak RSS is the child's `VmHWM`, sampled while it runs.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Clock ticks per second of `/proc` times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;
/// How often the child's high-water mark is read.
const SAMPLE: Duration = Duration::from_millis(5);

/// What one child did.
#[derive(Debug, Clone)]
pub struct Measured {
    pub status: ExitStatus,
    pub wall: Duration,
    /// User plus system CPU time of the child.
    pub cpu: Duration,
    /// Peak resident set size of the child, KiB (0 where `/proc` has none).
    pub peak_rss_kib: u64,
    pub stdout: String,
    pub stderr: String,
}

impl Measured {
    /// An error carrying the tail of the child's stderr unless it exited 0.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.status.success() {
            return Ok(());
        }
        let tail: Vec<&str> = self.stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(Error::task_failed(what, format!("({}):\n{}", self.status, tail.join("\n"))))
    }
}

/// Runs `cmd` to its end with stdout and stderr captured.
pub fn run(mut cmd: Command) -> Result<Measured> {
    let program = cmd.get_program().to_owned();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let cpu_before = children_cpu()?;
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| Error::io(&program, e))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut peak_rss_kib = 0;
    let status = loop {
        peak_rss_kib = peak_rss_kib.max(high_water_kib(child.id()).unwrap_or(0));
        if let Some(status) = child.try_wait().map_err(|e| Error::io(&program, e))? {
            break status;
        }
        std::thread::sleep(SAMPLE);
    };
    let wall = started.elapsed();
    let cpu = children_cpu()?.saturating_sub(cpu_before);
    Ok(Measured { status, wall, cpu, peak_rss_kib, stdout: join(stdout), stderr: join(stderr) })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

fn join(reader: Option<JoinHandle<String>>) -> String {
    reader.and_then(|r| r.join().ok()).unwrap_or_default()
}

/// CPU time of every child this process has reaped so far.
pub fn children_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| Error::io("/proc/self/stat", e))?;
    children_cpu_of(&stat).ok_or_else(|| Error::invalid_data("/proc/self/stat", "unexpected format"))
}

/// `cutime + cstime` of a `/proc/<pid>/stat` line (fields 16 and 17; the
/// command name in field 2 may hold spaces, so count after its `)`).
fn children_cpu_of(stat: &str) -> Option<Duration> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let ticks: u64 = fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / TICKS_PER_SECOND))
}

/// `VmHWM` of a running process, KiB.
fn high_water_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    high_water_of(&status)
}

fn high_water_of(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_children_times_and_high_water() {
        let stat = "4242 (my prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 250 31 20 0 1 0 100 1000 200";
        assert_eq!(children_cpu_of(stat), Some(Duration::from_millis(2_810)));
        assert_eq!(children_cpu_of("garbage"), None);
        assert_eq!(high_water_of("Name:\tx\nVmPeak:\t 900 kB\nVmHWM:\t  1234 kB\nVmRSS:\t 1000 kB\n"), Some(1234));
    }

    #[test]
    fn measures_a_child_that_burns_cpu() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo done"]);
        let measured = run(cmd).unwrap();
        measured.check("sh").unwrap();
        assert_eq!(measured.stdout.trim(), "done");
        assert!(measured.cpu > Duration::ZERO && measured.cpu <= measured.wall + Duration::from_millis(20));
        assert!(measured.peak_rss_kib > 0);
    }
}
