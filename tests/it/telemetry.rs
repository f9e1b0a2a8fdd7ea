//! OpenTelemetry: the real binary exports its spans over OTLP/HTTP to a
//! receiver this test runs, continues the caller's `traceparent`, and hands
//! the trace on to the broker's consumers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::Value;

use crate::support::app::{free_port, temp_dir, ChildApp};
use crate::support::{brokers, callbacks, eventually, kafka, ms, nats, secs, unique};

/// One exported span, ids in hex.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    service: String,
}

/// An OTLP/HTTP receiver: accepts `POST /v1/traces` (protobuf) and keeps
/// the spans. Its task ends with the test's runtime.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| receive(request, kept.clone()));
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        // The exporter may drop a connection mid-way: not a failure.
                        eprintln!("otlp receiver: connection ended: {e}");
                    }
                });
            }
        });
        Self { addr, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans_of(&self, trace_id: &str) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// One export request: decoded, its spans kept; anything else is a 404.
async fn receive(
    request: Request<hyper::body::Incoming>,
    kept: Arc<Mutex<Vec<Span>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let ok = request.method() == hyper::Method::POST
        && request.uri().path() == "/v1/traces"
        && request
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/x-protobuf");
    if !ok {
        let mut not_found = Response::new(Full::new(Bytes::new()));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return Ok(not_found);
    }
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
    let mut spans = kept.lock().unwrap();
    for resource in export.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| a.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for s in scope.spans {
                spans.push(Span {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    service: service.clone(),
                });
            }
        }
    }
    let mut answer = Response::new(Full::new(Bytes::new()));
    answer.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(answer)
}

/// A caller's trace context: (traceparent, trace id, its span id).
fn caller_context() -> (String, String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

/// The variables that turn telemetry on, with a short export delay so the
/// spans come within the test's wait.
fn telemetry_env(receiver: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        ("HOOKBRIDGE_TELEMETRY__OTLP_ENDPOINT", receiver.endpoint()),
        (
            "HOOKBRIDGE_TELEMETRY__SERVICE_NAME",
            "bridge-under-test".into(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
    ]
}

/// Posts a success callback for `task` with the caller's `traceparent`.
async fn post_traced(child: &ChildApp, task: &str, traceparent: &str) {
    let body = serde_json::to_vec(&callbacks::success(task)).unwrap();
    let answer = child
        .http
        .try_request_with(
            "POST",
            "/webhooks/kinovi",
            body,
            &[("traceparent", traceparent), ("tracestate", "caller=1")],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
}

/// Waits for the receive, store and publish spans of `trace_id`, the
/// publish span being the one `header` (a message's traceparent) names,
/// and checks they hang together: receive under the caller's span, store
/// under receive, publish under store.
async fn spans_chain(receiver: &Receiver, trace_id: &str, caller_span: &str, header: &str) {
    let publish_id = header.split('-').nth(2).unwrap().to_string();
    let spans = eventually(secs(30), "receive, store and publish spans", || {
        let spans = receiver.spans_of(trace_id);
        let has = |name: &str| spans.iter().any(|s| s.name == name);
        let all = has("receive") && has("store") && spans.iter().any(|s| s.span_id == publish_id);
        async move { all.then_some(spans) }
    })
    .await;
    let one = |name: &str| {
        let all: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(all.len(), 1, "one {name} span: {spans:#?}");
        all[0].clone()
    };
    let (receive, store) = (one("receive"), one("store"));
    let publish = spans.iter().find(|s| s.span_id == publish_id).unwrap();
    assert_eq!(publish.name, "publish");
    assert_eq!(
        receive.parent_span_id, caller_span,
        "the caller's trace goes on"
    );
    assert_eq!(store.parent_span_id, receive.span_id);
    assert_eq!(
        publish.parent_span_id, store.span_id,
        "publish is a child of store"
    );
    assert!(
        spans
            .iter()
            .all(|s| s.service.contains("bridge-under-test")),
        "service.name is telemetry.service_name: {spans:#?}"
    );
}

/// Kafka: the caller's trace continues through receive, store and publish,
/// the record's `traceparent` (and `ce_traceparent`) names the publish
/// span, and the task's trace shows the trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callbacks_trace_reaches_the_otlp_receiver_and_the_kafka_consumer() {
    let receiver = Receiver::start().await;
    let (bootstrap, topic) = kafka::new_topic("otel", 1).await;
    let mut env = telemetry_env(&receiver);
    env.extend([
        ("HOOKBRIDGE_PUBLISHER__TYPE", "kafka".to_string()),
        ("HOOKBRIDGE_PUBLISHER__BROKERS", bootstrap.clone()),
        ("HOOKBRIDGE_PUBLISHER__TOPIC", topic.clone()),
    ]);
    let dir = temp_dir();
    let child = ChildApp::start(dir.path(), free_port(), &env).await;
    let task = unique("otel");
    let (traceparent, trace_id, caller_span) = caller_context();
    post_traced(&child, &task, &traceparent).await;

    let records = kafka::consume(&bootstrap, &topic, 1, secs(60), ms(200)).await;
    let header = records[0]
        .headers
        .get("traceparent")
        .expect("traceparent header");
    assert_eq!(
        header.split('-').nth(1),
        Some(trace_id.as_str()),
        "{header}"
    );
    assert_eq!(records[0].headers.get("ce_traceparent"), Some(header));
    assert_ne!(header, &traceparent, "it names hookbridge's publish span");

    let (status, trace) = eventually(secs(30), "the publication in the task's trace", || {
        let admin = &child.admin;
        let path = format!("/admin/tasks/{task}");
        async move {
            let (status, trace) = admin.get(&path).await;
            let published = trace["published"].as_array().is_some_and(|p| !p.is_empty());
            published.then_some((status, trace))
        }
    })
    .await;
    assert_eq!(status, StatusCode::OK, "{trace}");
    assert_eq!(
        trace["callbacks"][0]["traceId"],
        Value::from(trace_id.clone()),
        "{trace}"
    );
    assert_eq!(
        trace["published"][0]["traceId"],
        Value::from(trace_id.clone()),
        "{trace}"
    );

    spans_chain(&receiver, &trace_id, &caller_span, header).await;
    assert!(child.terminate(secs(30)).await.success());
}

/// JetStream, across a restart: the event is stored while the broker is
/// away and the first process stops (flushing its spans); the second one
/// publishes it as a child of the store span the first one exported, and
/// the message's `traceparent` (and `ce-traceparent`) carries the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_trace_context_survives_a_restart_to_the_jetstream_consumer() {
    let receiver = Receiver::start().await;
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("OTEL").to_uppercase(), unique("otel"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let nats_env = |url: &str| {
        let mut env = telemetry_env(&receiver);
        env.extend([
            ("HOOKBRIDGE_PUBLISHER__TYPE", "nats".to_string()),
            ("HOOKBRIDGE_PUBLISHER__URL", url.to_string()),
            ("HOOKBRIDGE_PUBLISHER__SUBJECT", subject.clone()),
            ("HOOKBRIDGE_PUBLISHER__JETSTREAM", "true".to_string()),
            ("HOOKBRIDGE_OUTBOX__SHUTDOWN_GRACE_MS", "1000".to_string()),
        ]);
        env
    };
    let dir = temp_dir();
    let task = unique("otel");
    let (traceparent, trace_id, caller_span) = caller_context();

    // Nothing listens on port 1: the event waits in the outbox.
    let away = ChildApp::start(dir.path(), free_port(), &nats_env("nats://127.0.0.1:1")).await;
    post_traced(&away, &task, &traceparent).await;
    let (_, trace) = away.admin.get(&format!("/admin/tasks/{task}")).await;
    assert_eq!(
        trace["callbacks"][0]["traceId"],
        Value::from(trace_id.clone()),
        "{trace}"
    );
    assert!(away.terminate(secs(30)).await.success());
    let stored = receiver.spans_of(&trace_id);
    assert!(
        stored.iter().any(|s| s.name == "store"),
        "the store span is flushed at exit: {stored:#?}"
    );

    let back = ChildApp::start(dir.path(), free_port(), &nats_env(&url)).await;
    let messages = nats::read_stream(&url, &stream, 1, secs(60), ms(200)).await;
    let header = messages[0]
        .headers
        .get("traceparent")
        .expect("traceparent header");
    assert_eq!(
        header.split('-').nth(1),
        Some(trace_id.as_str()),
        "{header}"
    );
    assert_eq!(messages[0].headers.get("ce-traceparent"), Some(header));
    spans_chain(&receiver, &trace_id, &caller_span, header).await;

    let (_, trace) = eventually(secs(30), "the publication in the task's trace", || {
        let (admin, path) = (&back.admin, format!("/admin/tasks/{task}"));
        async move {
            let (status, trace) = admin.get(&path).await;
            (status == StatusCode::OK).then_some((status, trace))
        }
    })
    .await;
    assert_eq!(
        trace["published"][0]["traceId"],
        Value::from(trace_id),
        "{trace}"
    );
    assert!(back.terminate(secs(30)).await.success());
}

/// Without `telemetry.otlp_endpoint` nothing is exported and no trace
/// header is sent, whatever the caller sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_telemetry_off_no_trace_header_is_sent() {
    let (bootstrap, topic) = kafka::new_topic("otel_off", 1).await;
    let env = [
        ("HOOKBRIDGE_PUBLISHER__TYPE", "kafka".to_string()),
        ("HOOKBRIDGE_PUBLISHER__BROKERS", bootstrap.clone()),
        ("HOOKBRIDGE_PUBLISHER__TOPIC", topic.clone()),
    ];
    let dir = temp_dir();
    let child = ChildApp::start(dir.path(), free_port(), &env).await;
    let task = unique("otel_off");
    let (traceparent, _, _) = caller_context();
    post_traced(&child, &task, &traceparent).await;
    let records = kafka::consume(&bootstrap, &topic, 1, secs(60), ms(200)).await;
    let names: HashMap<_, _> = records[0].headers.clone();
    assert!(!names.contains_key("traceparent"), "{names:?}");
    assert!(!names.contains_key("ce_traceparent"), "{names:?}");
    let (_, trace) = child.admin.get(&format!("/admin/tasks/{task}")).await;
    assert!(trace["callbacks"][0].get("traceId").is_none(), "{trace}");
    assert!(child.terminate(secs(30)).await.success());
}
