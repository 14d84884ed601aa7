//! What every binary shares: logging and the shutdown signal. Each argument
//! group sits beside the component it configures ([`crate::kafka::KafkaArgs`],
//! [`crate::sink::RedisArgs`], [`crate::producer::StreamArgs`],
//! [`crate::window::WindowArgs`], [`crate::telemetry::MetricsArgs`]) and is
//! flattened into each binary.

/// Logging for the binaries: `RUST_LOG` or INFO, to stderr.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
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
