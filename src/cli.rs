//! What every binary shares: logging and the shutdown signal. Each argument
//! group sits beside the component it configures ([`crate::kafka::KafkaArgs`],
//! [`crate::sink::RedisArgs`], [`crate::producer::StreamArgs`],
//! [`crate::window::WindowArgs`], [`crate::telemetry::MetricsArgs`]) and is
//! flattened into each binary.

use std::io::IsTerminal;
use std::time::Duration;

/// A clap value parser for a duration (humantime: `30s`, `23h`, `500ms`)
/// between `MIN_MS` and `MAX_MS` milliseconds: zero, negative and absurd
/// values are refused with the allowed range, and clap names the flag.
pub fn duration_between<const MIN_MS: u64, const MAX_MS: u64>(text: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let (min, max) = (Duration::from_millis(MIN_MS), Duration::from_millis(MAX_MS));
    if value < min || value > max {
        return Err(format!("must be between {} and {}", humantime::format_duration(min), humantime::format_duration(max)));
    }
    Ok(value)
}

/// How log lines are written (`--log-format`, every binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; colour only on a terminal.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// The flags of `C` from the command line, with `--log-format` added to
/// every binary and logging set up by it; then a refusal of any secret
/// given as a flag ([`crate::secret`]), with where to put it instead.
pub fn parse<C: clap::Parser>() -> C {
    let matches = with_log_format(C::command()).get_matches();
    init_tracing_as(matches.get_one::<LogFormat>(LOG_FORMAT).copied().unwrap_or(LogFormat::Text));
    if let Err(message) = crate::secret::refuse_on_command_line(&matches) {
        with_log_format(C::command()).error(clap::error::ErrorKind::ArgumentConflict, message).exit();
    }
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

const LOG_FORMAT: &str = "log_format";

fn with_log_format(command: clap::Command) -> clap::Command {
    command.arg(
        clap::Arg::new(LOG_FORMAT)
            .long("log-format")
            .value_name("FORMAT")
            .env("CRYPTOPULSE_LOG_FORMAT")
            .value_parser(clap::value_parser!(LogFormat))
            .default_value("text")
            .help("Log lines as text, or as JSON objects one a line for log collectors"),
    )
}

/// Logging for the binaries: `RUST_LOG` or INFO, to stderr. Text is in
/// colour only on a terminal, and never with `NO_COLOR` set: escape codes
/// in `docker compose logs` or a log file are noise to every reader. The
/// first call wins.
pub fn init_tracing_as(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref())).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// A progress bar on stderr counting `total` `unit`s, or a hidden one when
/// not `show` (callers pass whether stderr is a terminal: bars in a log
/// file or `docker compose logs` are noise). Its message follows the counts.
pub fn progress_bar(total: u64, unit: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}  {{msg}}");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Whether to colour: a terminal, and `NO_COLOR` unset or empty (no-color.org).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Resolves when the process gets SIGINT or SIGTERM. If SIGTERM cannot be
/// listened for, Ctrl-C still stops the process.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None) && colour(true, Some(OsStr::new(""))));
        assert!(!colour(false, None) && !colour(true, Some(OsStr::new("1"))));
    }

    #[test]
    fn durations_outside_their_range_are_refused_with_it() {
        assert_eq!(duration_between::<1000, 3_600_000>("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration_between::<1000, 3_600_000>("0s"), Err("must be between 1s and 1h".into()));
        assert_eq!(duration_between::<1000, 3_600_000>("2h"), Err("must be between 1s and 1h".into()));
        assert!(duration_between::<1000, 3_600_000>("-5s").is_err());
        assert!(duration_between::<1000, 3_600_000>("soon").is_err());
    }
}
