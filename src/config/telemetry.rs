//! `[telemetry]`: OpenTelemetry traces, off unless an OTLP endpoint is set.

use serde::{Deserialize, Serialize};

/// OpenTelemetry: one span per callback for receiving and storing it, and
/// one when its event is published, exported over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (an OpenTelemetry Collector,
    /// Jaeger, Tempo...), e.g. `http://127.0.0.1:4318`; spans go to
    /// `<otlp_endpoint>/v1/traces`. Unset (the default): no spans, no
    /// `traceparent` stored or sent, nothing exported. Credentials, if the
    /// receiver needs any, go in `OTEL_EXPORTER_OTLP_HEADERS`, never here.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute of every span.
    pub service_name: String,
    /// Share of new traces recorded, from 0.0 to 1.0. A callback that comes
    /// with a `traceparent` follows its sender's sampling decision instead.
    pub sample_ratio: f64,
    /// Longest wait for one export request, in milliseconds; also what
    /// shutdown waits at most to flush the last spans. 100 to 60000.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "hookbridge".into(),
            sample_ratio: 1.0,
            export_timeout_ms: 10_000,
        }
    }
}

impl TelemetryConfig {
    /// The endpoint, when traces are on.
    pub fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().filter(|e| !e.is_empty())
    }

    /// What a range cannot say: the endpoint's scheme, the ratio's bounds.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(endpoint) = self.endpoint() {
            let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            let uri = endpoint.parse::<axum::http::Uri>().ok();
            if !scheme_ok || uri.as_ref().and_then(|u| u.host()).is_none() {
                return Err((
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL, e.g. http://127.0.0.1:4318".into(),
                ));
            }
            // It is printed by `hookbridge check`; credentials go in
            // OTEL_EXPORTER_OTLP_HEADERS, which the exporter reads.
            if uri.and_then(|u| u.authority().map(|a| a.as_str().contains('@'))) == Some(true) {
                return Err((
                    "telemetry.otlp_endpoint",
                    "must not hold credentials: set OTEL_EXPORTER_OTLP_HEADERS instead".into(),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err((
                "telemetry.sample_ratio",
                format!("must be between 0.0 and 1.0 (is {})", self.sample_ratio),
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err(("telemetry.service_name", "must not be empty".into()));
        }
        Ok(())
    }
}
