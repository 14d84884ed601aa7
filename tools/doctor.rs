//! `doctor`: checks that the broker, Redis and (when given) Grafana and
//! Prometheus are there and set up as the pipeline expects. One PASS or
//! FAIL line per check; exits non-zero when any check fails.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cryptopulse::cli;
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::secret;
use cryptopulse::sink::RedisTarget;
use cryptopulse::tooling::doctor::{self, DoctorConfig, Grafana};

/// Checks the services CryptoPulse needs and says what to do about each failure.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisTarget,
    /// Grafana's base URL, e.g. http://127.0.0.1:3000; not checked when absent.
    #[arg(long, env = "CRYPTOPULSE_GRAFANA_URL")]
    grafana_url: Option<String>,
    /// Grafana admin user, for the data source API.
    #[arg(long, env = "GRAFANA_ADMIN_USER", default_value = "admin")]
    grafana_user: String,
    /// Prometheus's base URL, e.g. http://127.0.0.1:9090; not checked when absent.
    #[arg(long, env = "CRYPTOPULSE_PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// Timeout of each connection and request, in seconds.
    #[arg(long, env = "CRYPTOPULSE_DOCTOR_TIMEOUT_SECS", default_value_t = 5)]
    timeout_secs: u64,
    /// Print the checks as one JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

/// Grafana's admin password: only from the environment (or a file named by
/// `GRAFANA_ADMIN_PASSWORD_FILE`), never a flag.
const GRAFANA_PASSWORD_ENV: &str = "GRAFANA_ADMIN_PASSWORD";
/// docker-compose.yml's documented default.
const GRAFANA_DEFAULT_PASSWORD: &str = "cryptopulse123";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Cli = cli::parse();
    let password = match secret::from_env(GRAFANA_PASSWORD_ENV) {
        Ok(password) => password.unwrap_or_else(|| GRAFANA_DEFAULT_PASSWORD.to_owned()),
        Err(e) => {
            eprintln!("doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let config = DoctorConfig {
        kafka: args.kafka,
        redis: args.redis,
        grafana: args.grafana_url.map(|url| Grafana { url: url.trim_end_matches('/').to_owned(), user: args.grafana_user, password }),
        prometheus_url: args.prometheus_url.map(|url| url.trim_end_matches('/').to_owned()),
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let checks = doctor::run(&config).await;
    let failed = checks.iter().filter(|c| !c.passed).count();
    if args.json {
        println!("{}", doctor::to_json(&checks));
    } else {
        for check in &checks {
            println!("{check}");
        }
        println!("doctor: {} of {} checks passed", checks.len() - failed, checks.len());
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
