// Hostile inputs and the property every one of them must satisfy, shared by the property
// tests (`src/event/props.rs`) and the long fuzz run (`benches/fuzz.rs`), which both
// `include!` this file after bringing `config`, `event` and `publish` into scope.
//
// The property: a body is either refused with a `ParseError` (a 400 naming the problem), or
// it becomes an event that round-trips through storage and that every publisher's encoder
// accepts (Kafka topic/key/headers, NATS subject/headers, the file line). Never a panic.

use proptest::prelude::*;

/// A JSON document as written, so that repeated keys, any number spelling and odd string
/// escapes can be produced (a `serde_json::Value` can hold none of them).
#[derive(Debug, Clone)]
pub enum Json {
    /// Verbatim text: numbers, and strings with hand-written escapes.
    Raw(String),
    Str(String),
    Arr(Vec<Json>),
    /// Members in order; a key may repeat.
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn to_bytes(&self, pretty: bool) -> Vec<u8> {
        let mut out = String::new();
        self.write(&mut out, pretty);
        out.into_bytes()
    }

    fn write(&self, out: &mut String, pretty: bool) {
        let gap = if pretty { "\n  " } else { "" };
        match self {
            Json::Raw(text) => out.push_str(text),
            Json::Str(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(gap);
                    item.write(out, pretty);
                }
                out.push(']');
            }
            Json::Obj(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(gap);
                    out.push_str(&serde_json::to_string(key).unwrap_or_default());
                    out.push_str(if pretty { " : " } else { ":" });
                    value.write(out, pretty);
                }
                out.push_str(gap);
                out.push('}');
            }
        }
    }
}

fn s(text: &str) -> Json {
    Json::Str(text.to_string())
}

fn raw(text: impl Into<String>) -> Json {
    Json::Raw(text.into())
}

/// Strings a sender may use to confuse a later stage.
const NASTY: &[&str] = &[
    "",
    " ",
    "a.*.>",
    ">",
    "*",
    "..",
    "kinovi.tasks.success",
    "task\u{202e}1",
    "\u{2028}",
    "\u{2029}",
    "\u{feff}",
    "\u{200b}",
    "\u{85}",
    "a\r\nb",
    "\u{0}",
    "\u{7f}",
    "ñandú",
    "タスク",
    "\u{1f600}",
    "\u{e0001}",
    "\u{10ffff}",
    "seedance-20",
];

fn odd_string() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(NASTY).prop_map(str::to_string),
        2 => prop::collection::vec(any::<char>(), 0..16).prop_map(String::from_iter),
        1 => "[a-z.*> _-]{0,12}",
        1 => (1usize..700).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// Number spellings, including those no `f64` or `i64` holds exactly.
fn number() -> BoxedStrategy<Json> {
    prop_oneof![
        any::<i64>().prop_map(|n| raw(n.to_string())),
        any::<u64>().prop_map(|n| raw(n.to_string())),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| raw(serde_json::to_string(&f).unwrap_or_default())),
        "-?[1-9][0-9]{18,60}".prop_map(raw),
        "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?".prop_map(raw),
    ]
    .boxed()
}

/// String escapes written by hand: lone surrogates, escaped controls, escaped separators.
fn escaped_string() -> BoxedStrategy<Json> {
    let part = prop_oneof![
        "[a-z]{0,3}",
        "\\\\u(d8|dc|00|20|fe|ff)[0-9a-f]{2}",
        Just("\\n".to_string()),
        Just("\\\"".to_string()),
        Just("\\\\".to_string()),
    ];
    prop::collection::vec(part, 0..5)
        .prop_map(|parts| raw(format!("\"{}\"", parts.concat())))
        .boxed()
}

fn leaf() -> BoxedStrategy<Json> {
    prop_oneof![
        Just(raw("null")),
        Just(raw("true")),
        Just(raw("false")),
        number(),
        odd_string().prop_map(Json::Str),
        escaped_string(),
    ]
    .boxed()
}

/// Keys from a small set, so that objects often repeat one.
fn key() -> BoxedStrategy<String> {
    let common = prop::sample::select(
        &[
            "a", "b", "url", "taskId", "state", "status", "data", "output", "model", "x",
            "createTime", "",
        ][..],
    );
    prop_oneof![4 => common.prop_map(str::to_string), 1 => odd_string()].boxed()
}

/// Keys that rarely repeat.
fn fresh_key() -> BoxedStrategy<String> {
    prop_oneof![8 => "[a-zA-Z_]{1,10}", 1 => odd_string()].boxed()
}

/// Any JSON value, up to 6 levels of containers, objects keyed by `keys`.
pub fn json_with(keys: fn() -> BoxedStrategy<String>) -> BoxedStrategy<Json> {
    leaf()
        .prop_recursive(6, 32, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Arr),
                prop::collection::vec((keys(), inner), 0..6).prop_map(Json::Obj),
            ]
        })
        .boxed()
}

/// Any JSON value; objects often repeat a key.
pub fn any_json() -> BoxedStrategy<Json> {
    json_with(key)
}

/// `value` inside `levels` arrays or objects.
fn nest(value: Json, levels: usize, arrays: bool) -> Json {
    (0..levels).fold(value, |inner, _| {
        if arrays {
            Json::Arr(vec![inner])
        } else {
            Json::Obj(vec![("a".to_string(), inner)])
        }
    })
}

/// Mostly one of `good`, sometimes any leaf (the wrong type, often).
fn mostly(good: BoxedStrategy<Json>) -> BoxedStrategy<Json> {
    prop_oneof![12 => good, 1 => leaf()].boxed()
}

fn time() -> BoxedStrategy<Json> {
    const MAX: i64 = 253_402_300_799_999;
    let edges = prop::sample::select(
        &[-1, 0, MAX, MAX + 1, i64::MAX, i64::MIN, 1_735_599_754_000][..],
    );
    prop_oneof![
        12 => (0..=MAX).prop_map(|n| raw(n.to_string())),
        2 => (0..=MAX).prop_map(|n| Json::Str(n.to_string())),
        2 => Just(raw("null")),
        1 => edges.prop_map(|n| raw(n.to_string())),
        1 => number(),
        1 => odd_string().prop_map(Json::Str),
    ]
    .boxed()
}

fn state() -> BoxedStrategy<Json> {
    let words = prop::sample::select(
        &["success", "fail", "waiting", "generating", "Succeeded", " FAILED ", "queuing"][..],
    );
    mostly(prop_oneof![4 => words.prop_map(s), 1 => odd_string().prop_map(Json::Str)].boxed())
}

fn task_id() -> BoxedStrategy<Json> {
    prop_oneof![
        12 => "task_[a-zA-Z0-9_.*> -]{1,24}".prop_map(Json::Str),
        3 => odd_string().prop_map(Json::Str),
        1 => escaped_string(),
        1 => leaf(),
    ]
    .boxed()
}

fn model() -> BoxedStrategy<Json> {
    let names = prop::sample::select(&["seedance-20", "a.*.>", "veo3", "", "unknown"][..]);
    mostly(
        prop_oneof![
            2 => names.prop_map(s),
            2 => odd_string().prop_map(Json::Str),
            1 => Just(raw("null")),
        ]
        .boxed(),
    )
}

fn output_item() -> BoxedStrategy<Json> {
    let extra = prop::collection::vec((fresh_key(), json_with(fresh_key)), 0..4);
    (odd_string(), extra, 0usize..3)
        .prop_map(|(url, mut extra, big)| {
            let mut members = vec![("url".to_string(), Json::Str(url))];
            if big > 0 {
                members.push(("seed".into(), raw("123456789012345678901234567890")));
            }
            members.append(&mut extra);
            Json::Obj(members)
        })
        .boxed()
}

fn outputs() -> BoxedStrategy<Json> {
    prop_oneof![
        12 => prop::collection::vec(output_item(), 0..4).prop_map(Json::Arr),
        2 => Just(raw("null")),
        1 => any_json(),
        1 => (60usize..200, any::<bool>()).prop_map(|(n, arrays)| {
            Json::Arr(vec![Json::Obj(vec![("deep".into(), nest(raw("1"), n, arrays))])])
        }),
    ]
    .boxed()
}

fn error() -> BoxedStrategy<Json> {
    let object = (mostly(number()), mostly(odd_string().prop_map(Json::Str).boxed()))
        .prop_map(|(code, message)| {
            Json::Obj(vec![("code".into(), code), ("message".into(), message)])
        });
    prop_oneof![
        6 => Just(raw("null")),
        3 => odd_string().prop_map(Json::Str),
        3 => object,
        1 => any_json(),
    ]
    .boxed()
}

/// Bodies shaped like callbacks, so many reach the encoders: every member odd in its own
/// way, sometimes in an envelope, sometimes with a member repeated or extra members.
pub fn callback() -> BoxedStrategy<Json> {
    let record = (
        task_id(),
        (state(), any::<bool>()),
        model(),
        (time(), time(), time()),
        outputs(),
        error(),
        mostly(odd_string().prop_map(Json::Str).boxed()),
        mostly(prop_oneof![number(), "[0-9]{1,4}(\\.[0-9]{1,2})?".prop_map(Json::Str)].boxed()),
    );
    let shape = (
        any::<bool>(),
        prop::option::weighted(0.05, any::<prop::sample::Index>()),
        prop::collection::vec(("x_[a-z]{1,6}", json_with(fresh_key)), 0..3),
    );
    (record, shape)
        .prop_map(|(record, (envelope, repeat, extra))| {
            let (id, (state, as_status), model, times, output, error, order, credits) = record;
            let mut members = vec![
                ("taskId".to_string(), id),
                (if as_status { "status" } else { "state" }.to_string(), state),
                ("model".to_string(), model),
                ("createTime".to_string(), times.0),
                ("completeTime".to_string(), times.1),
                ("updateTime".to_string(), times.2),
                ("output".to_string(), output),
                ("error".to_string(), error),
                ("orderId".to_string(), order),
                ("creditsUsed".to_string(), credits),
            ];
            members.extend(extra);
            if let Some(index) = repeat {
                let (k, v) = members[index.index(members.len())].clone();
                members.push((k, v));
            }
            let record = Json::Obj(members);
            if envelope {
                Json::Obj(vec![
                    ("code".into(), raw("200")),
                    ("message".into(), s("success")),
                    ("data".into(), record),
                ])
            } else {
                record
            }
        })
        .boxed()
}

/// Bodies as bytes: callbacks (compact or pretty), any JSON, deep nesting, raw bytes, and
/// callbacks with a few bytes overwritten.
pub fn body() -> BoxedStrategy<Vec<u8>> {
    let deep = (1usize..300, any::<bool>(), leaf())
        .prop_map(|(n, arrays, l)| nest(l, n, arrays).to_bytes(false));
    let flips = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4);
    let mutated = (callback(), flips).prop_map(|(c, flips)| {
        let mut bytes = c.to_bytes(false);
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        bytes
    });
    prop_oneof![
        6 => (callback(), any::<bool>()).prop_map(|(c, pretty)| c.to_bytes(pretty)),
        2 => any_json().prop_map(|j| j.to_bytes(false)),
        1 => deep,
        1 => prop::collection::vec(any::<u8>(), 0..256),
        2 => mutated,
    ]
    .boxed()
}

/// What happened to one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused with a 400.
    Refused,
    /// Accepted, stored and encoded by every publisher.
    Published,
}

/// Publisher settings the property is checked against: templates using `{model}` and
/// `{state}` in every position, with an allowlist (which `{model}` requires), and one
/// without `{model}` and without a list.
pub struct Oracle {
    #[allow(dead_code)]
    kafka: Vec<config::KafkaConfig>,
    #[allow(dead_code)]
    nats: Vec<config::NatsConfig>,
}

/// Arrival time used for every body.
pub const RECEIVED_AT: i64 = 1_735_599_760_123;

impl Oracle {
    pub fn new() -> Self {
        let listed = vec!["seedance-20".to_string(), "veo3".to_string()];
        let mut kafka = Vec::new();
        let mut nats = Vec::new();
        for (models, kafka_templates, nats_templates) in [
            (
                listed.clone(),
                &["kinovi.{model}.{state}", "{model}", "{state}-{model}"][..],
                &["kinovi.{model}.{state}", "{model}", "{state}.{model}.x"][..],
            ),
            (Vec::new(), &["kinovi.{state}"][..], &["kinovi.tasks.{state}"][..]),
        ] {
            for &template in kafka_templates {
                kafka.push(config::KafkaConfig {
                    brokers: "127.0.0.1:9".into(),
                    topic: template.into(),
                    message_timeout_ms: 1000,
                    options: Default::default(),
                    models: models.clone(),
                });
            }
            for &template in nats_templates {
                nats.push(config::NatsConfig {
                    url: "nats://127.0.0.1:9".into(),
                    subject: template.into(),
                    jetstream: true,
                    ack_timeout_ms: 1000,
                    token: None,
                    stream: None,
                    models: models.clone(),
                });
            }
        }
        Self { kafka, nats }
    }

    /// Checks the property for one body; `Err` describes how it broke.
    pub fn check(&self, body: &[u8]) -> Result<Verdict, String> {
        let event = match event::parse(body, event::Source::Webhook, RECEIVED_AT) {
            Ok(event) => event,
            Err(e) => {
                let message = e.to_string();
                let field_len = e.field().map_or(0, str::len);
                // The answer names the problem, briefly, whatever the body holds.
                if message.is_empty() || field_len > 200 || message.len() > 1000 {
                    return Err(format!("unhelpful refusal: {message:?}"));
                }
                return Ok(Verdict::Refused);
            }
        };
        for (name, time) in [
            ("createTime", event.create_time),
            ("completeTime", event.complete_time),
            ("updateTime", event.update_time),
        ] {
            if time.is_some_and(|t| !(0..=event::MAX_TIME_MS).contains(&t)) {
                return Err(format!("{name} {time:?} accepted"));
            }
        }
        if let Some(problem) = event::task_id_problem(&event.task_id) {
            return Err(format!("task id {:?} accepted: {problem}", event.task_id));
        }
        // Storage: serialized once, read back identical, one line.
        let payload = serde_json::to_vec(&event).map_err(|e| format!("serialize: {e}"))?;
        let back: event::TaskEvent =
            serde_json::from_slice(&payload).map_err(|e| format!("read back: {e}"))?;
        if back != event {
            return Err(format!("round trip changed the event: {back:?}"));
        }
        let outgoing = publish::Outgoing {
            seq: 1,
            meta: event::EventMeta::of(&event),
            payload: payload.into(),
        };
        publish::file::encode(&outgoing).map_err(|e| format!("file: {e}"))?;
        #[cfg(feature = "kafka")]
        for config in &self.kafka {
            let record = publish::kafka::encode(&outgoing, config)
                .map_err(|e| format!("kafka {}: {e}", config.topic))?;
            if record.key != outgoing.meta.task_id {
                return Err("kafka key is not the task id".into());
            }
        }
        #[cfg(feature = "nats")]
        for config in &self.nats {
            publish::nats::encode(&outgoing, config)
                .map_err(|e| format!("nats {}: {e}", config.subject))?;
        }
        let time = publish::CloudEvent::of(&outgoing.meta).time;
        if time.len() != 24 {
            return Err(format!("CloudEvents time {time:?}"));
        }
        Ok(Verdict::Published)
    }
}

impl Default for Oracle {
    fn default() -> Self {
        Self::new()
    }
}
