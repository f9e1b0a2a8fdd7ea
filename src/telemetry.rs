//! Log set-up. Logs go to stderr so the file sink can own stdout.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if config.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The OpenTelemetry trace id (32 hex digits) of the current span, when
/// traces are exported; `None` otherwise.
pub fn current_trace_id() -> Option<String> {
    None
}
