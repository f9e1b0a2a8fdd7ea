//! Log set-up (logs go to stderr so the file sink can own stdout) and
//! OpenTelemetry traces, off unless `telemetry.otlp_endpoint` is set.
//!
//! # The spans of one callback
//!
//! ```text
//! receive   the webhook handler; continues an incoming W3C traceparent
//!   store   the outbox append; its context is the traceparent stored
//!           with the event (crate::event::EventMeta, in the log record)
//! publish   the relay, later and maybe after a restart: a child of the
//!           stored context; its own context is the `traceparent` header
//!           of the Kafka record or NATS message, so a consumer's span
//!           joins the same trace
//! ```
//!
//! Spans are `tracing` spans of target [`TARGET`], turned into OpenTelemetry
//! spans by `tracing-opentelemetry` and exported in batches over OTLP/HTTP
//! (protobuf) by the SDK's batch processor, on its own thread, with a
//! bounded queue (spans past it are dropped, never waited for). With
//! telemetry off none of these spans is created and nothing is stored or
//! sent: [`enabled`] is one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, TelemetryConfig};

/// The `tracing` target of the spans that become OpenTelemetry spans.
pub const TARGET: &str = "hookbridge::otel";

/// The log filter's directive that leaves the spans of [`TARGET`] out.
const TARGET_OFF: &str = "hookbridge::otel=off";

/// Whether spans are exported (set once by [`init_with_traces`]).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether OpenTelemetry spans are made and exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the last spans.
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    timeout: Duration,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter's thread, waiting at
    /// most `telemetry.export_timeout_ms`. Blocking: call it off the async
    /// runtime (`spawn_blocking`).
    pub fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = provider.shutdown_with_timeout(self.timeout) {
            tracing::warn!(error = %e, "cannot flush the last spans");
        }
    }
}

/// Sets up the logs only (operator commands, `check`, the simulator).
pub fn init(config: &LogConfig) {
    init_logs(config, log_filter(config));
}

/// The log lines' filter: `RUST_LOG`, else `log.level`.
fn log_filter(config: &LogConfig) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level))
}

/// Sets up the logs, and the OpenTelemetry exporter when `telemetry` has an
/// endpoint. Fails only when the exporter cannot be built.
pub fn init_with_traces(log: &LogConfig, telemetry: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let filter = || log_filter(log);
    let timeout = Duration::from_millis(telemetry.export_timeout_ms);
    let Some(endpoint) = telemetry.endpoint() else {
        init_logs(log, filter());
        return Ok(Telemetry {
            provider: None,
            timeout,
        });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(timeout)
        .build()
        .context("cannot build the OTLP exporter (telemetry.otlp_endpoint)")?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            telemetry.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(telemetry.service_name.clone())
                .build(),
        )
        .build();
    // Only this module's spans become OpenTelemetry spans; the log filter
    // (`log.level`, RUST_LOG) applies to the log lines alone.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("hookbridge"))
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        // Nothing here reads OpenTelemetry's current context: entering a
        // span need not set it (a thread-local write per poll).
        .with_context_activation(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target() == TARGET
        }));
    // The spans are not log lines: the log filter leaves them out.
    let filter = || match TARGET_OFF.parse() {
        Ok(off) => filter().add_directive(off),
        Err(_) => filter(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if log.json {
        fmt.json().with_filter(filter()).boxed()
    } else {
        fmt.with_filter(filter()).boxed()
    };
    if let Err(e) = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
    {
        // A subscriber is already set (a test): its logs stay as they are.
        tracing::debug!(error = %e, "tracing subscriber already set");
    }
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(endpoint, "exporting OpenTelemetry traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
        timeout,
    })
}

fn init_logs(config: &LogConfig, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // An error only says a subscriber is already set (a test, a second
    // init): the first one stays.
    let result = if config.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "tracing subscriber already set");
    }
}

/// The OpenTelemetry trace id (32 hex digits) of the current span, when
/// traces are exported; `None` otherwise.
pub fn current_trace_id() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Request headers as a propagator reads them.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One stored `traceparent`, as a propagator reads it.
struct Stored<'a>(&'a str);

impl Extractor for Stored<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The `receive` span of a callback with `headers`: a child of the sender's
/// span when they hold a valid W3C `traceparent` (and `tracestate`), else
/// the root of a new trace. `None` with telemetry off.
pub fn receive_span(headers: &axum::http::HeaderMap) -> Option<tracing::Span> {
    if !enabled() {
        return None;
    }
    let span = tracing::info_span!(
        target: TARGET,
        "receive",
        otel.kind = "server",
        http.request.method = "POST",
        task.id = tracing::field::Empty,
    );
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        if parent.span().span_context().is_valid() {
            set_parent(&span, parent);
        }
    }
    Some(span)
}

/// The `store` span of an event (a child of the current span, `receive`)
/// and its `traceparent`, to be stored with the event. `None` with
/// telemetry off.
pub fn store_span(task_id: &str) -> Option<(tracing::Span, Option<String>)> {
    if !enabled() {
        return None;
    }
    let span = tracing::info_span!(target: TARGET, "store", task.id = task_id);
    let traceparent = traceparent(&span);
    Some((span, traceparent))
}

/// The `publish` span of an event whose stored context is `stored` (a
/// `traceparent`), and its own `traceparent` for the message's headers.
/// `None` with telemetry off, or when `stored` does not parse.
pub fn publish_span(stored: &str, task_id: &str) -> Option<(tracing::Span, String)> {
    if !enabled() {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&Stored(stored));
    if !parent.span().span_context().is_valid() {
        return None;
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "publish",
        otel.kind = "producer",
        task.id = task_id,
        messaging.destination.name = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    set_parent(&span, parent);
    let traceparent = traceparent(&span)?;
    Some((span, traceparent))
}

fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!(error = %e, "cannot continue the trace");
    }
}

/// `span`'s W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), if it
/// has a valid context.
fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let s = cx.span();
    let sc = s.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The trace id (32 hex digits) of a stored `traceparent`, if it is one.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_, id) = (parts.next()?, parts.next()?);
    let hex = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && id != "00000000000000000000000000000000").then_some(id)
}

/// Whether `value` is a `traceparent` hookbridge would write: version 00,
/// a non-zero trace and span id in lower-case hex, the flags. What the log
/// keeps with an event is checked with it, so a header never carries
/// anything else.
pub fn is_traceparent(value: &str) -> bool {
    let b = value.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 55
        && &b[..3] == b"00-"
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && trace_id_of(value).is_some()
        && &value[36..52] != "0000000000000000"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked_and_read() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_traceparent(tp));
        assert_eq!(trace_id_of(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7\r\n1",
            "ü0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        ] {
            assert!(!is_traceparent(bad), "{bad:?}");
        }
        assert_eq!(trace_id_of("garbage"), None);
    }

    #[test]
    fn the_log_filter_can_leave_the_spans_out() {
        assert!(TARGET_OFF
            .parse::<tracing_subscriber::filter::Directive>()
            .is_ok());
    }

    #[test]
    fn nothing_is_made_with_telemetry_off() {
        assert!(!enabled());
        assert!(receive_span(&axum::http::HeaderMap::new()).is_none());
        assert!(store_span("t").is_none());
        assert!(publish_span(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "t"
        )
        .is_none());
        assert_eq!(current_trace_id(), None);
    }
}
