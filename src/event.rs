//! The Kinovi callback parser and the normalized [`TaskEvent`] (pure: no I/O, no clock).
//!
//! Kinovi's documents disagree about the shape of a task record (see `kinovi-api.md`,
//! "The task record, and how the documents disagree"), and a callback is sent once and never
//! retried, so rejecting a body that is merely in another documented dialect loses the event
//! for good. The parser is therefore liberal about *shape* and strict about *identity*:
//!
//! - an envelope `{code, message, data: {...}}` or the bare record. A top-level object with
//!   no (or a null) `taskId` and a `data` member is an envelope, and that `data` must be an
//!   object. The envelope's `code` and `message` are ignored: the webhook page always shows
//!   200 / "success", and the record itself says how the task went;
//! - the state under `state` or `status` (`state` wins when both are non-null);
//! - `error` as `{code, message}` (code a string or a number), a plain string (the message),
//!   or null. An error with neither code nor message, or a blank string, counts as no error;
//! - `orderId`, `model`, `creditsUsed`, `createTime`, `completeTime`, `updateTime` absent or
//!   null; credits fractional or a numeric string; times integer ms, a float (truncated) or a
//!   numeric string;
//! - output items are objects kept verbatim, extra fields included; `output` null or absent
//!   is an empty list;
//! - unknown members anywhere are ignored.
//!
//! The task id is the dedup key, the Kafka message key and a NATS subject token, so it must
//! be a JSON string (a number is rejected rather than stringified: `1`, `1.0` and `1e0` would
//! be three ids for one task), non-blank, at most [`MAX_TASK_ID_BYTES`] bytes and free of
//! control characters. It is otherwise kept verbatim (not trimmed): it has to match what the
//! status endpoint knows. Escaping `.`, `*`, `>` or spaces for NATS subjects is the
//! publisher's job.
//!
//! Unknown state words never fail a callback: they become [`State::Pending`] with the warning
//! [`WARN_UNKNOWN_STATE`], and `providerState` keeps the word as sent.
//!
//! The serialized form is version [`SCHEMA_VERSION`] of `schema/task-event.v1.json`, whose top
//! level admits no other member: adding a field to [`TaskEvent`] means a new schema version.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Version of the serialized [`TaskEvent`] (`schema/task-event.v1.json`).
pub const SCHEMA_VERSION: u32 = 1;

/// Longest task id accepted, in bytes of UTF-8. Real ids are ~30 bytes; the bound keeps
/// Kafka keys, NATS subjects and outbox keys small whatever a caller posts.
pub const MAX_TASK_ID_BYTES: usize = 512;

/// A `success` with no output item: the provider's examples always carry one, and a consumer
/// that reads `output[0].url` (as the provider's own example handler does) would break.
pub const WARN_SUCCESS_WITHOUT_OUTPUT: &str = "success_without_output";
/// The provider's state word is not one this module knows; it was taken as `pending`.
pub const WARN_UNKNOWN_STATE: &str = "unknown_state";

/// Fixed namespace of [`event_id`]. Never change it: ids must stay stable across versions.
const EVENT_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("a683a2de-9150-44d2-938e-c9fa98f88515");

/// Where hookbridge learned of the state: a provider callback or its own status poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Webhook,
    Poll,
}

/// Normalized task state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Waiting,
    Generating,
    Success,
    Fail,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Waiting => "waiting",
            State::Generating => "generating",
            State::Success => "success",
            State::Fail => "fail",
        }
    }

    /// `success` and `fail` are the only states a task never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Success | State::Fail)
    }

    /// Progress order used by the per-task state guard: pending=0, waiting=1, generating=2,
    /// success=3, fail=3 (the two terminal states are equal: neither may replace the other).
    pub fn rank(self) -> u8 {
        match self {
            State::Pending => 0,
            State::Waiting => 1,
            State::Generating => 2,
            State::Success | State::Fail => 3,
        }
    }

    /// Normalizes a provider value, ignoring ASCII case and surrounding whitespace. Never
    /// fails: whatever [`State::known`] does not recognize is [`State::Pending`], because a
    /// non-terminal guess only delays a task while a wrong terminal one ends it.
    pub fn normalize(raw: &str) -> State {
        State::known(raw).unwrap_or(State::Pending)
    }

    /// The state for a word this module recognizes, `None` for any other word.
    ///
    /// Besides Kinovi's own `waiting`, `generating`, `success` and `fail`:
    /// - `succeeded`, `failed`, `failure`: inflections of the documented terminal words, with
    ///   no non-terminal reading. Taking them as pending would stall a finished task until
    ///   the stuck timeout. Broader words (`error`, `cancelled`, `done`, `completed`) are left
    ///   out: nothing documents them, and they stay visible through [`WARN_UNKNOWN_STATE`].
    /// - `pending`, `queuing`, `queueing`, `wait`, `processing`: used by look-alike APIs of the
    ///   same family; `kinovi-api.md` says to take them as pending.
    pub fn known(raw: &str) -> Option<State> {
        const WORDS: &[(&str, State)] = &[
            ("waiting", State::Waiting),
            ("generating", State::Generating),
            ("success", State::Success),
            ("succeeded", State::Success),
            ("fail", State::Fail),
            ("failed", State::Fail),
            ("failure", State::Fail),
            ("pending", State::Pending),
            ("queuing", State::Pending),
            ("queueing", State::Pending),
            ("wait", State::Pending),
            ("processing", State::Pending),
        ];
        let raw = raw.trim();
        WORDS
            .iter()
            .find(|(word, _)| raw.eq_ignore_ascii_case(word))
            .map(|&(_, state)| state)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One observed state of one task: what hookbridge publishes (`schema/task-event.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskEvent {
    /// Always [`SCHEMA_VERSION`] when built by this module.
    pub schema_version: u32,
    /// [`event_id`] of (`task_id`, `state`): the same observation always gets the same id.
    pub event_id: String,
    pub task_id: String,
    pub order_id: Option<String>,
    pub model: Option<String>,
    pub state: State,
    /// The provider's state word as sent (not trimmed, not lower-cased).
    pub provider_state: String,
    pub credits_used: Option<f64>,
    /// Provider output objects verbatim (extra fields kept); `null` or absent gives `[]`.
    pub outputs: Vec<Map<String, Value>>,
    pub error: Option<TaskError>,
    /// Milliseconds since the epoch, as the provider sent them.
    pub create_time: Option<i64>,
    pub complete_time: Option<i64>,
    pub update_time: Option<i64>,
    /// Milliseconds since the epoch at which hookbridge received the body.
    pub received_at: i64,
    pub source: Source,
    /// Oddities that did not justify rejecting the body, e.g. [`WARN_SUCCESS_WITHOUT_OUTPUT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Set by the per-task state guard, never by the parser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts_with: Option<State>,
}

/// The provider's error, with a numeric code turned into its decimal string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    pub code: Option<String>,
    pub message: Option<String>,
}

/// Deterministic id of the event (`task_id`, `state`): the same pair always yields the same
/// id, across processes and versions, so a consumer can deduplicate repeated callbacks and a
/// poll that saw what a callback already told.
///
/// UUID v5 in a fixed namespace over `"{task_id}\n{state}"`, hyphenated and lower-case. The
/// separator is unambiguous because accepted task ids contain no control characters.
pub fn event_id(task_id: &str, state: State) -> String {
    let name = format!("{task_id}\n{}", state.as_str());
    uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
        .hyphenated()
        .to_string()
}

/// Why a body was rejected. The message names the offending field (`data.`-prefixed when the
/// body is an envelope) and is meant for the HTTP client: it carries nothing internal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("missing field `{field}`")]
    MissingField { field: String },
    #[error("missing field `{field}` (or `{alternative}`)")]
    MissingEither { field: String, alternative: String },
    #[error("field `{field}` must be {expected}, got {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `{field}` {problem}")]
    InvalidValue {
        field: String,
        problem: &'static str,
    },
}

impl ParseError {
    /// The field at fault, as named in the message; `None` when the body as a whole is.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParseError::InvalidJson(_) | ParseError::NotAnObject(_) => None,
            ParseError::MissingField { field }
            | ParseError::MissingEither { field, .. }
            | ParseError::WrongType { field, .. }
            | ParseError::InvalidValue { field, .. } => Some(field),
        }
    }
}

/// Why `id` is not an acceptable task id, if it is not: the rules every
/// task id entering hookbridge follows (it becomes a Kafka key, a CloudEvents
/// subject and part of the event id).
pub fn task_id_problem(id: &str) -> Option<&'static str> {
    if id.trim().is_empty() {
        Some("must not be empty or whitespace only")
    } else if id.len() > MAX_TASK_ID_BYTES {
        Some("must be at most 512 bytes long")
    } else if id.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    }
}

/// Parses a callback body or a status-endpoint record (the provider says they are the same
/// document; both dialects are accepted either way).
pub fn parse(body: &[u8], source: Source, received_at_ms: i64) -> Result<TaskEvent, ParseError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::InvalidJson(e.to_string()))?;
    from_value(value, source, received_at_ms)
}

/// Same as [`parse`], from an already-parsed JSON value (the poller's path).
pub fn from_value(
    value: Value,
    source: Source,
    received_at_ms: i64,
) -> Result<TaskEvent, ParseError> {
    let Value::Object(mut top) = value else {
        return Err(ParseError::NotAnObject(kind(&value)));
    };
    let bare = top.get("taskId").is_some_and(|id| !id.is_null());
    let (map, prefix) = match (bare, top.remove("data")) {
        (false, Some(Value::Object(data))) => (data, "data."),
        (false, Some(other)) => {
            return Err(wrong_type("data".into(), "an object", &other));
        }
        (_, _) => (top, ""),
    };
    Record { map, prefix }.into_event(source, received_at_ms)
}

/// A task record being taken apart; `prefix` makes error messages name fields as the
/// client wrote them.
struct Record {
    map: Map<String, Value>,
    prefix: &'static str,
}

impl Record {
    fn into_event(mut self, source: Source, received_at: i64) -> Result<TaskEvent, ParseError> {
        let task_id = self.task_id()?;
        let provider_state = self.provider_state()?;
        let outputs = self.outputs()?;
        let error = self.error()?;
        let known = State::known(&provider_state);
        let state = known.unwrap_or(State::Pending);

        let mut warnings = Vec::new();
        if known.is_none() {
            warnings.push(WARN_UNKNOWN_STATE.to_owned());
        }
        if state == State::Success && outputs.is_empty() {
            warnings.push(WARN_SUCCESS_WITHOUT_OUTPUT.to_owned());
        }

        Ok(TaskEvent {
            schema_version: SCHEMA_VERSION,
            event_id: event_id(&task_id, state),
            order_id: self.opt_string("orderId")?,
            model: self.opt_string("model")?,
            credits_used: self.opt_credits("creditsUsed")?,
            create_time: self.opt_millis("createTime")?,
            complete_time: self.opt_millis("completeTime")?,
            update_time: self.opt_millis("updateTime")?,
            task_id,
            state,
            provider_state,
            outputs,
            error,
            received_at,
            source,
            warnings,
            conflicts_with: None,
        })
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Removes a member, with JSON `null` meaning the same as absent.
    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn task_id(&mut self) -> Result<String, ParseError> {
        let field = self.path("taskId");
        let id = match self.map.remove("taskId") {
            None => return Err(ParseError::MissingField { field }),
            Some(Value::String(id)) => id,
            Some(other) => return Err(wrong_type(field, "a string", &other)),
        };
        match task_id_problem(&id) {
            None => Ok(id),
            Some(problem) => Err(ParseError::InvalidValue { field, problem }),
        }
    }

    fn provider_state(&mut self) -> Result<String, ParseError> {
        // `status` is still removed when `state` wins, so that it is not mistaken for data.
        let state = self.take("state");
        let status = self.take("status");
        let (name, value) = match (state, status) {
            (Some(v), _) => ("state", v),
            (None, Some(v)) => ("status", v),
            (None, None) => {
                return Err(ParseError::MissingEither {
                    field: self.path("state"),
                    alternative: self.path("status"),
                })
            }
        };
        match value {
            Value::String(s) => Ok(s),
            other => Err(wrong_type(self.path(name), "a string", &other)),
        }
    }

    fn outputs(&mut self) -> Result<Vec<Map<String, Value>>, ParseError> {
        let items = match self.take("output") {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(wrong_type(self.path("output"), "an array or null", &other));
            }
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(object) => Ok(object),
                other => Err(wrong_type(
                    self.path(&format!("output[{i}]")),
                    "an object",
                    &other,
                )),
            })
            .collect()
    }

    fn error(&mut self) -> Result<Option<TaskError>, ParseError> {
        let mut object = match self.take("error") {
            None => return Ok(None),
            Some(Value::String(message)) => {
                let message = non_blank(message);
                return Ok(message.map(|m| TaskError {
                    code: None,
                    message: Some(m),
                }));
            }
            Some(Value::Object(object)) => object,
            Some(other) => {
                return Err(wrong_type(
                    self.path("error"),
                    "an object, a string or null",
                    &other,
                ));
            }
        };
        let code = match object.remove("code").filter(|v| !v.is_null()) {
            None => None,
            Some(Value::String(code)) => non_blank(code),
            Some(Value::Number(code)) => Some(code.to_string()),
            Some(other) => {
                return Err(wrong_type(
                    self.path("error.code"),
                    "a string, a number or null",
                    &other,
                ));
            }
        };
        let message = match object.remove("message").filter(|v| !v.is_null()) {
            None => None,
            Some(Value::String(message)) => non_blank(message),
            Some(other) => {
                return Err(wrong_type(
                    self.path("error.message"),
                    "a string or null",
                    &other,
                ));
            }
        };
        Ok((code.is_some() || message.is_some()).then_some(TaskError { code, message }))
    }

    fn opt_string(&mut self, name: &str) -> Result<Option<String>, ParseError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(self.path(name), "a string or null", &other)),
        }
    }

    fn opt_credits(&mut self, name: &str) -> Result<Option<f64>, ParseError> {
        const EXPECTED: &str = "a number, a numeric string or null";
        let credits = match self.take(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(other) => return Err(wrong_type(self.path(name), EXPECTED, &other)),
        };
        match credits {
            // Rust also parses "NaN" and "inf", which JSON cannot carry back out.
            Some(c) if c.is_finite() => Ok(Some(c)),
            Some(_) => Err(ParseError::InvalidValue {
                field: self.path(name),
                problem: "must be a finite number",
            }),
            None => Err(ParseError::WrongType {
                field: self.path(name),
                expected: EXPECTED,
                found: "a non-numeric string",
            }),
        }
    }

    fn opt_millis(&mut self, name: &str) -> Result<Option<i64>, ParseError> {
        const EXPECTED: &str = "a number of milliseconds, a numeric string or null";
        let millis = match self.take(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Ok).or_else(|| n.as_f64().map(truncate)),
            Some(Value::String(s)) => {
                let s = s.trim();
                s.parse::<i64>()
                    .ok()
                    .map(Ok)
                    .or_else(|| s.parse::<f64>().ok().map(truncate))
            }
            Some(other) => return Err(wrong_type(self.path(name), EXPECTED, &other)),
        };
        match millis {
            Some(Ok(ms)) => Ok(Some(ms)),
            Some(Err(problem)) => Err(ParseError::InvalidValue {
                field: self.path(name),
                problem,
            }),
            None => Err(ParseError::WrongType {
                field: self.path(name),
                expected: EXPECTED,
                found: "a non-numeric string",
            }),
        }
    }
}

/// Float times are cut to whole milliseconds (towards zero). Values an `i64` cannot hold are
/// refused: `as` would silently saturate them into a plausible-looking but wrong time.
fn truncate(ms: f64) -> Result<i64, &'static str> {
    // 2^63 is exact in f64, so this is precisely the i64 range.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if ms.is_finite() && (-LIMIT..LIMIT).contains(&ms) {
        Ok(ms.trunc() as i64)
    } else {
        Err("is out of range for milliseconds since the epoch")
    }
}

fn non_blank(s: String) -> Option<String> {
    (!s.trim().is_empty()).then_some(s)
}

fn wrong_type(field: String, expected: &'static str, found: &Value) -> ParseError {
    ParseError::WrongType {
        field,
        expected,
        found: kind(found),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_735_599_760_123;

    /// The "Success" example of the provider's webhook page, byte for byte.
    const DOC_SUCCESS: &str = r#"{
  "code": 200,
  "message": "success",
  "data": {
    "taskId": "task_clxxxxxx",
    "orderId": "order_clxxxxxx",
    "model": "seedance-20",
    "state": "success",
    "creditsUsed": 200,
    "output": [
      {
        "url": "https://static.kinovi.ai/generated/video.mp4",
        "width": 1280,
        "height": 720
      }
    ],
    "error": null,
    "createTime": 1735599634000,
    "completeTime": 1735599754000,
    "updateTime": 1735599754000
  }
}"#;

    /// The "Failure" example of the provider's webhook page, byte for byte.
    const DOC_FAILURE: &str = r#"{
  "code": 200,
  "message": "success",
  "data": {
    "taskId": "task_clxxxxxx",
    "orderId": "order_clxxxxxx",
    "model": "seedance-20",
    "state": "fail",
    "creditsUsed": 0,
    "output": null,
    "error": {
      "code": "2038",
      "message": "Your input text violates platform rules. Please modify and try again."
    },
    "createTime": 1735599634000,
    "completeTime": null,
    "updateTime": 1735599754000
  }
}"#;

    fn ok(value: Value) -> TaskEvent {
        from_value(value, Source::Webhook, NOW).expect("should parse")
    }

    fn err(value: Value) -> ParseError {
        from_value(value, Source::Webhook, NOW).expect_err("should be rejected")
    }

    fn message(value: Value) -> String {
        err(value).to_string()
    }

    /// A minimal bare record plus `extra` members (which may override).
    fn bare(extra: Value) -> Value {
        let mut record = json!({"taskId": "task_1", "state": "generating"});
        for (k, v) in extra.as_object().unwrap() {
            record[k] = v.clone();
        }
        record
    }

    fn envelope(data: Value) -> Value {
        json!({"code": 200, "message": "success", "data": data})
    }

    fn error(code: Option<&str>, message: Option<&str>) -> Option<TaskError> {
        Some(TaskError {
            code: code.map(str::to_owned),
            message: message.map(str::to_owned),
        })
    }

    // ---- accepted variants -------------------------------------------------------------

    #[test]
    fn documented_success_example() {
        let event = parse(DOC_SUCCESS.as_bytes(), Source::Webhook, NOW).unwrap();
        let mut output = Map::new();
        output.insert(
            "url".into(),
            json!("https://static.kinovi.ai/generated/video.mp4"),
        );
        output.insert("width".into(), json!(1280));
        output.insert("height".into(), json!(720));
        assert_eq!(
            event,
            TaskEvent {
                schema_version: 1,
                event_id: event_id("task_clxxxxxx", State::Success),
                task_id: "task_clxxxxxx".into(),
                order_id: Some("order_clxxxxxx".into()),
                model: Some("seedance-20".into()),
                state: State::Success,
                provider_state: "success".into(),
                credits_used: Some(200.0),
                outputs: vec![output],
                error: None,
                create_time: Some(1_735_599_634_000),
                complete_time: Some(1_735_599_754_000),
                update_time: Some(1_735_599_754_000),
                received_at: NOW,
                source: Source::Webhook,
                warnings: vec![],
                conflicts_with: None,
            }
        );
    }

    #[test]
    fn documented_failure_example() {
        let event = parse(DOC_FAILURE.as_bytes(), Source::Poll, NOW).unwrap();
        assert_eq!(event.state, State::Fail);
        assert_eq!(event.event_id, event_id("task_clxxxxxx", State::Fail));
        assert_eq!(event.source, Source::Poll);
        assert_eq!(event.credits_used, Some(0.0));
        assert!(event.outputs.is_empty());
        assert_eq!(
            event.error,
            error(
                Some("2038"),
                Some("Your input text violates platform rules. Please modify and try again.")
            )
        );
        assert_eq!(event.create_time, Some(1_735_599_634_000));
        assert_eq!(event.complete_time, None);
        assert_eq!(event.update_time, Some(1_735_599_754_000));
        assert!(event.warnings.is_empty());
    }

    #[test]
    fn envelope_whose_data_uses_status() {
        let event = ok(envelope(json!({
            "taskId": "task_2", "model": "seedance-20", "status": "generating",
            "creditsUsed": 0, "output": null, "error": null, "createTime": 1_735_599_634_000_i64
        })));
        assert_eq!(event.task_id, "task_2");
        assert_eq!(event.state, State::Generating);
        assert_eq!(event.provider_state, "generating");
        assert_eq!(event.order_id, None);
        assert_eq!(event.update_time, None);
        assert_eq!(event.complete_time, None);
    }

    #[test]
    fn flat_status_record_with_string_error() {
        let event = ok(json!({
            "taskId": "task_3", "model": "seedance-20", "status": "fail", "creditsUsed": 0,
            "output": null, "error": "Failed to download your reference video",
            "createTime": 1_735_599_634_000_i64, "completeTime": null
        }));
        assert_eq!(event.state, State::Fail);
        assert_eq!(
            event.error,
            error(None, Some("Failed to download your reference video"))
        );
        assert_eq!(event.order_id, None);
        assert_eq!(event.update_time, None);
    }

    #[test]
    fn state_wins_over_status_and_null_state_falls_back() {
        let both = ok(bare(json!({"state": "success", "status": "generating",
                                   "output": [{"url": "u"}]})));
        assert_eq!(both.state, State::Success);
        assert_eq!(both.provider_state, "success");
        let null_state = ok(bare(json!({"state": null, "status": "waiting"})));
        assert_eq!(null_state.state, State::Waiting);
        assert_eq!(null_state.provider_state, "waiting");
    }

    #[test]
    fn provider_state_is_kept_verbatim() {
        let event = ok(bare(json!({"state": "  Generating "})));
        assert_eq!(event.state, State::Generating);
        assert_eq!(event.provider_state, "  Generating ");
        assert!(event.warnings.is_empty());
    }

    #[test]
    fn credits_fractional_numeric_string_null_or_absent() {
        let cases = [
            (json!(2.17), Some(2.17)),
            (json!("2.17"), Some(2.17)),
            (json!(" 12 "), Some(12.0)),
            (json!(200), Some(200.0)),
            (Value::Null, None),
        ];
        for (credits, expected) in cases {
            let event = ok(bare(json!({ "creditsUsed": credits })));
            assert_eq!(event.credits_used, expected, "creditsUsed {credits}");
        }
        assert_eq!(ok(bare(json!({}))).credits_used, None);
    }

    #[test]
    fn times_integer_float_numeric_string_null_or_absent() {
        let cases = [
            (json!(1735599634000_i64), Some(1_735_599_634_000)),
            (json!(1735599634000.9), Some(1_735_599_634_000)),
            (json!(1.735599634e12), Some(1_735_599_634_000)),
            (json!("1735599634000"), Some(1_735_599_634_000)),
            (json!("1735599634000.5"), Some(1_735_599_634_000)),
            (json!(-1.5), Some(-1)),
            (Value::Null, None),
        ];
        for (time, expected) in cases {
            let event = ok(bare(json!({
                "createTime": time, "completeTime": time, "updateTime": time
            })));
            assert_eq!(event.create_time, expected, "time {time}");
            assert_eq!(event.complete_time, expected, "time {time}");
            assert_eq!(event.update_time, expected, "time {time}");
        }
        let absent = ok(bare(json!({})));
        assert_eq!(
            (absent.create_time, absent.complete_time, absent.update_time),
            (None, None, None)
        );
    }

    #[test]
    fn error_variants() {
        let cases = [
            (
                json!({"code": "asset_review_failed", "message": "Review failed"}),
                error(Some("asset_review_failed"), Some("Review failed")),
            ),
            (
                json!({"code": 2038, "message": "rules"}),
                error(Some("2038"), Some("rules")),
            ),
            (json!({"code": "500"}), error(Some("500"), None)),
            (
                json!({"code": null, "message": "m"}),
                error(None, Some("m")),
            ),
            (json!("boom"), error(None, Some("boom"))),
            (
                json!({"code": "InvalidParameter", "message": "x", "detail": [1]}),
                error(Some("InvalidParameter"), Some("x")),
            ),
            (json!({}), None),
            (json!({"code": null, "message": null}), None),
            (json!({"code": "", "message": " "}), None),
            (json!(""), None),
            (Value::Null, None),
        ];
        for (raw, expected) in cases {
            let event = ok(bare(json!({ "state": "fail", "error": raw })));
            assert_eq!(event.error, expected, "error {raw}");
        }
        assert_eq!(ok(bare(json!({"state": "fail"}))).error, None);
    }

    #[test]
    fn demo_task_id_is_accepted_verbatim() {
        let event = ok(envelope(json!({
            "taskId": "demo_task_fail_text_moderation", "state": "fail",
            "error": {"code": "2038", "message": "violates platform rules"}
        })));
        assert_eq!(event.task_id, "demo_task_fail_text_moderation");
        assert_eq!(
            event.event_id,
            event_id("demo_task_fail_text_moderation", State::Fail)
        );
    }

    #[test]
    fn task_ids_are_not_trimmed_and_may_be_long_or_unicode() {
        assert_eq!(ok(bare(json!({"taskId": " t 1 "}))).task_id, " t 1 ");
        assert_eq!(
            ok(bare(json!({"taskId": "zadanie_żółw"}))).task_id,
            "zadanie_żółw"
        );
        let longest = "x".repeat(MAX_TASK_ID_BYTES);
        assert_eq!(ok(bare(json!({ "taskId": longest }))).task_id, longest);
    }

    #[test]
    fn output_items_keep_extra_fields() {
        let item = json!({
            "url": "https://static.kinovi.ai/generated/a.mp4", "width": 1920, "height": 1080,
            "mediaType": "video/mp4", "seed": 123456789,
            "lastFrameImage": "https://static.kinovi.ai/generated/a.jpg",
            "nested": {"deep": [1, 2, {"x": null}]}
        });
        let event = ok(envelope(json!({
            "taskId": "task_4", "state": "success", "output": [item, {"url": "b"}]
        })));
        assert_eq!(event.outputs.len(), 2);
        assert_eq!(Value::Object(event.outputs[0].clone()), item);
        assert_eq!(event.outputs[1]["url"], "b");
        assert!(event.warnings.is_empty());
    }

    #[test]
    fn unknown_members_are_ignored_everywhere() {
        let event = ok(json!({
            "code": 200, "message": "success", "traceId": "abc", "extra": [1],
            "data": {
                "taskId": "task_5", "state": "success", "priority": "high",
                "inputs": {"prompt": "p"}, "output": [{"url": "u", "fps": 24}],
                "error": {"code": null, "message": null, "retryable": false}
            }
        }));
        assert_eq!(event.task_id, "task_5");
        assert_eq!(event.outputs[0]["fps"], 24);
        assert_eq!(event.error, None);
    }

    #[test]
    fn envelope_code_and_message_are_ignored() {
        let event = ok(json!({"code": 500, "message": "weird",
                              "data": {"taskId": "task_6", "state": "waiting"}}));
        assert_eq!(event.state, State::Waiting);
    }

    #[test]
    fn top_level_task_id_means_bare_record_even_with_a_data_member() {
        let event = ok(json!({"taskId": "task_7", "state": "waiting", "data": "ignored"}));
        assert_eq!(event.task_id, "task_7");
        let event = ok(json!({"taskId": "task_8", "state": "waiting",
                              "data": {"taskId": "other", "state": "fail"}}));
        assert_eq!(
            (event.task_id.as_str(), event.state),
            ("task_8", State::Waiting)
        );
    }

    #[test]
    fn null_top_level_task_id_with_data_object_is_an_envelope() {
        let event = ok(json!({"taskId": null, "data": {"taskId": "task_9", "state": "fail"}}));
        assert_eq!(event.task_id, "task_9");
    }

    #[test]
    fn success_without_output_is_flagged() {
        for output in [json!({"output": null}), json!({"output": []}), json!({})] {
            let mut record = bare(output.clone());
            record["state"] = json!("success");
            let event = ok(record);
            assert_eq!(event.state, State::Success);
            assert_eq!(
                event.warnings,
                vec![WARN_SUCCESS_WITHOUT_OUTPUT],
                "{output}"
            );
        }
        assert!(ok(bare(json!({"state": "fail", "output": null})))
            .warnings
            .is_empty());
    }

    #[test]
    fn unknown_state_is_pending_with_a_warning() {
        for word in ["cancelled", "error", "", "queued", "🚀"] {
            let event = ok(bare(json!({ "state": word })));
            assert_eq!(event.state, State::Pending, "{word:?}");
            assert_eq!(event.provider_state, word);
            assert_eq!(event.warnings, vec![WARN_UNKNOWN_STATE], "{word:?}");
            assert_eq!(event.event_id, event_id("task_1", State::Pending));
        }
        for word in ["queuing", "queueing", "wait", "pending", "processing"] {
            let event = ok(bare(json!({ "state": word })));
            assert_eq!(event.state, State::Pending, "{word}");
            assert!(event.warnings.is_empty(), "{word}");
        }
    }

    #[test]
    fn parse_and_from_value_agree_and_carry_source_and_time() {
        let from_bytes = parse(DOC_FAILURE.as_bytes(), Source::Poll, 42).unwrap();
        let value: Value = serde_json::from_str(DOC_FAILURE).unwrap();
        let from_val = from_value(value, Source::Poll, 42).unwrap();
        assert_eq!(from_bytes, from_val);
        assert_eq!(from_val.received_at, 42);
        assert_eq!(from_val.source, Source::Poll);
        assert_eq!(from_val.schema_version, SCHEMA_VERSION);
        assert_eq!(from_val.conflicts_with, None);
    }

    // ---- rejections --------------------------------------------------------------------

    #[test]
    fn rejects_bodies_that_are_not_json_objects() {
        for body in [
            &b""[..],
            b"{",
            b"not json",
            b"{\"taskId\": \"a\",}",
            b"\xff\xfe",
        ] {
            let e = parse(body, Source::Webhook, NOW).unwrap_err();
            assert!(matches!(e, ParseError::InvalidJson(_)), "{e}");
            assert!(e.to_string().starts_with("body is not valid JSON: "), "{e}");
            assert_eq!(e.field(), None);
        }
        let cases = [
            (json!([]), "body must be a JSON object, got an array"),
            (json!("s"), "body must be a JSON object, got a string"),
            (json!(1), "body must be a JSON object, got a number"),
            (Value::Null, "body must be a JSON object, got null"),
        ];
        for (value, expected) in cases {
            assert_eq!(message(value), expected);
        }
    }

    #[test]
    fn rejects_data_that_is_not_an_object() {
        assert_eq!(
            message(json!({"code": 404, "message": "not found", "data": null})),
            "field `data` must be an object, got null"
        );
        assert_eq!(
            message(json!({"data": [{"taskId": "t"}]})),
            "field `data` must be an object, got an array"
        );
        assert_eq!(err(json!({"data": "x"})).field(), Some("data"));
    }

    #[test]
    fn rejects_missing_or_malformed_task_id() {
        let cases = [
            (json!({"state": "success"}), "missing field `taskId`"),
            (
                envelope(json!({"state": "success"})),
                "missing field `data.taskId`",
            ),
            (
                bare(json!({"taskId": 123})),
                "field `taskId` must be a string, got a number",
            ),
            (
                envelope(json!({"taskId": 123, "state": "fail"})),
                "field `data.taskId` must be a string, got a number",
            ),
            (
                json!({"taskId": null, "state": "fail"}),
                "field `taskId` must be a string, got null",
            ),
            (
                bare(json!({"taskId": ""})),
                "field `taskId` must not be empty or whitespace only",
            ),
            (
                bare(json!({"taskId": " \t "})),
                "field `taskId` must not be empty or whitespace only",
            ),
            (
                bare(json!({ "taskId": "x".repeat(MAX_TASK_ID_BYTES + 1) })),
                "field `taskId` must be at most 512 bytes long",
            ),
            (
                // 171 three-byte characters: 513 bytes, far fewer chars.
                bare(json!({ "taskId": "€".repeat(171) })),
                "field `taskId` must be at most 512 bytes long",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(message(value), expected);
        }
        for id in [
            "task\n1",
            "task\u{0}",
            "a\rb",
            "del\u{7f}",
            "c1\u{85}",
            "tab\there",
        ] {
            assert_eq!(
                message(bare(json!({ "taskId": id }))),
                "field `taskId` must not contain control characters",
                "{id:?}"
            );
        }
    }

    #[test]
    fn rejects_missing_or_non_string_state() {
        let cases = [
            (
                json!({"taskId": "t"}),
                "missing field `state` (or `status`)",
            ),
            (
                envelope(json!({"taskId": "t", "state": null, "status": null})),
                "missing field `data.state` (or `data.status`)",
            ),
            (
                bare(json!({"state": 3})),
                "field `state` must be a string, got a number",
            ),
            (
                envelope(json!({"taskId": "t", "status": {"name": "success"}})),
                "field `data.status` must be a string, got an object",
            ),
            (
                bare(json!({"state": true, "status": "success"})),
                "field `state` must be a string, got a boolean",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(message(value), expected);
        }
        assert_eq!(err(json!({"taskId": "t"})).field(), Some("state"));
    }

    #[test]
    fn rejects_malformed_output() {
        let cases = [
            (
                bare(json!({"output": "https://x/video.mp4"})),
                "field `output` must be an array or null, got a string",
            ),
            (
                envelope(json!({"taskId": "t", "state": "success", "output": {"url": "u"}})),
                "field `data.output` must be an array or null, got an object",
            ),
            (
                envelope(json!({"taskId": "t", "state": "success",
                                "output": [{"url": "u"}, "v"]})),
                "field `data.output[1]` must be an object, got a string",
            ),
            (
                bare(json!({"output": [null]})),
                "field `output[0]` must be an object, got null",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(message(value), expected);
        }
    }

    #[test]
    fn rejects_malformed_error() {
        let cases = [
            (
                bare(json!({"error": 2038})),
                "field `error` must be an object, a string or null, got a number",
            ),
            (
                envelope(json!({"taskId": "t", "state": "fail", "error": ["a"]})),
                "field `data.error` must be an object, a string or null, got an array",
            ),
            (
                bare(json!({"error": {"code": true}})),
                "field `error.code` must be a string, a number or null, got a boolean",
            ),
            (
                envelope(json!({"taskId": "t", "state": "fail",
                                "error": {"code": "1", "message": 5}})),
                "field `data.error.message` must be a string or null, got a number",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(message(value), expected);
        }
    }

    #[test]
    fn rejects_non_string_order_id_and_model() {
        assert_eq!(
            message(bare(json!({"orderId": 7}))),
            "field `orderId` must be a string or null, got a number"
        );
        assert_eq!(
            message(envelope(
                json!({"taskId": "t", "state": "fail", "model": ["m"]})
            )),
            "field `data.model` must be a string or null, got an array"
        );
    }

    #[test]
    fn rejects_non_numeric_credits() {
        let cases = [
            (
                bare(json!({"creditsUsed": true})),
                "field `creditsUsed` must be a number, a numeric string or null, got a boolean",
            ),
            (
                envelope(json!({"taskId": "t", "state": "fail", "creditsUsed": "lots"})),
                "field `data.creditsUsed` must be a number, a numeric string or null, \
                 got a non-numeric string",
            ),
            (
                bare(json!({"creditsUsed": ""})),
                "field `creditsUsed` must be a number, a numeric string or null, \
                 got a non-numeric string",
            ),
            (
                bare(json!({"creditsUsed": {"amount": 1}})),
                "field `creditsUsed` must be a number, a numeric string or null, got an object",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(message(value), expected);
        }
        for raw in ["NaN", "inf", "-infinity", "1e999"] {
            assert_eq!(
                message(bare(json!({ "creditsUsed": raw }))),
                "field `creditsUsed` must be a finite number",
                "{raw}"
            );
        }
    }

    #[test]
    fn rejects_non_numeric_or_out_of_range_times() {
        const EXPECTED: &str = "a number of milliseconds, a numeric string or null";
        let cases = [
            (
                bare(json!({"createTime": "yesterday"})),
                format!("field `createTime` must be {EXPECTED}, got a non-numeric string"),
            ),
            (
                envelope(json!({"taskId": "t", "state": "fail", "completeTime": false})),
                format!("field `data.completeTime` must be {EXPECTED}, got a boolean"),
            ),
            (
                bare(json!({"updateTime": [1]})),
                format!("field `updateTime` must be {EXPECTED}, got an array"),
            ),
            (
                bare(json!({"updateTime": "2024-12-30T23:00:34Z"})),
                format!("field `updateTime` must be {EXPECTED}, got a non-numeric string"),
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(message(value), expected);
        }
        for raw in [
            json!(1e20),
            json!(u64::MAX),
            json!("-1e300"),
            json!("NaN"),
            json!("inf"),
        ] {
            assert_eq!(
                message(bare(json!({ "createTime": raw }))),
                "field `createTime` is out of range for milliseconds since the epoch",
                "{raw}"
            );
        }
    }

    #[test]
    fn error_field_names_the_culprit() {
        let e = err(envelope(
            json!({"taskId": "t", "state": "fail", "output": [1]}),
        ));
        assert_eq!(e.field(), Some("data.output[0]"));
        assert_eq!(
            err(bare(json!({"createTime": "x"}))).field(),
            Some("createTime")
        );
        assert_eq!(err(json!([])).field(), None);
    }

    // ---- event ids and states ----------------------------------------------------------

    #[test]
    fn event_id_is_pinned_deterministic_and_well_formed() {
        // Pinned: a change here breaks deduplication against already-published events.
        assert_eq!(
            event_id("task_clxxxxxx", State::Success),
            "56bee408-792d-54d3-b8d7-438f8a8f2af8"
        );
        let id = event_id("demo_task_fail_text_moderation", State::Fail);
        assert_eq!(id, event_id("demo_task_fail_text_moderation", State::Fail));
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 5);
        assert_eq!(id, parsed.hyphenated().to_string());
        assert_eq!(id, id.to_lowercase());
        assert_eq!(id.len(), 36);
    }

    #[test]
    fn event_id_differs_by_task_and_by_state() {
        let states = [
            State::Pending,
            State::Waiting,
            State::Generating,
            State::Success,
            State::Fail,
        ];
        let mut seen = std::collections::HashSet::new();
        for task in [
            "task_a",
            "task_b",
            "task_a ",
            "Task_a",
            "demo_task_fail_text_moderation",
        ] {
            for state in states {
                assert!(seen.insert(event_id(task, state)), "{task:?} {state}");
            }
        }
        assert_eq!(seen.len(), 25);
    }

    #[test]
    fn state_normalization_table() {
        let table = [
            ("waiting", State::Waiting),
            ("WAITING", State::Waiting),
            ("generating", State::Generating),
            (" Generating\n", State::Generating),
            ("success", State::Success),
            ("Success", State::Success),
            ("succeeded", State::Success),
            ("fail", State::Fail),
            ("FAIL", State::Fail),
            ("failed", State::Fail),
            ("failure", State::Fail),
            ("pending", State::Pending),
            ("queuing", State::Pending),
            ("queueing", State::Pending),
            ("wait", State::Pending),
            ("processing", State::Pending),
            ("error", State::Pending),
            ("cancelled", State::Pending),
            ("completed", State::Pending),
            ("successful_maybe", State::Pending),
            ("", State::Pending),
            ("   ", State::Pending),
        ];
        for (raw, expected) in table {
            assert_eq!(State::normalize(raw), expected, "{raw:?}");
        }
        assert_eq!(State::known("queuing"), Some(State::Pending));
        assert_eq!(State::known("error"), None);
    }

    #[test]
    fn state_names_ranks_and_terminality() {
        let table = [
            (State::Pending, "pending", 0, false),
            (State::Waiting, "waiting", 1, false),
            (State::Generating, "generating", 2, false),
            (State::Success, "success", 3, true),
            (State::Fail, "fail", 3, true),
        ];
        for (state, name, rank, terminal) in table {
            assert_eq!(state.as_str(), name);
            assert_eq!(state.to_string(), name);
            assert_eq!(serde_json::to_value(state).unwrap(), json!(name));
            assert_eq!(State::normalize(name), state);
            assert_eq!(state.rank(), rank);
            assert_eq!(state.is_terminal(), terminal);
        }
        assert_eq!(
            serde_json::to_value(Source::Webhook).unwrap(),
            json!("webhook")
        );
        assert_eq!(serde_json::to_value(Source::Poll).unwrap(), json!("poll"));
    }

    // ---- serialized form and schema ----------------------------------------------------

    const SCHEMA: &str = include_str!("../schema/task-event.v1.json");

    fn schema() -> Value {
        serde_json::from_str(SCHEMA).expect("schema file is JSON")
    }

    /// Events from several input dialects, one with every optional member set.
    fn sample_events() -> Vec<TaskEvent> {
        let mut events = vec![
            parse(DOC_SUCCESS.as_bytes(), Source::Webhook, NOW).unwrap(),
            parse(DOC_FAILURE.as_bytes(), Source::Poll, NOW).unwrap(),
            ok(envelope(json!({"taskId": "task_s", "status": "waiting"}))),
            ok(
                json!({"taskId": "demo_task_fail_text_moderation", "status": "fail",
                      "error": "plain string", "creditsUsed": "2.17"}),
            ),
            ok(bare(json!({"state": "success", "creditsUsed": 2.17,
                           "error": {"code": "asset_review_failed", "message": null},
                           "createTime": "1735599634000.7"}))),
            ok(bare(json!({"state": "success", "output": [{
                "url": "u", "mediaType": "video/mp4", "seed": 7, "lastFrameImage": "f"
            }]}))),
            ok(bare(json!({"state": "mystery", "error": {"code": 500}}))),
        ];
        let mut conflicted = ok(bare(json!({"state": "success"})));
        conflicted.conflicts_with = Some(State::Fail);
        events.push(conflicted);
        events
    }

    #[test]
    fn schema_is_valid_draft_2020_12() {
        let schema = schema();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        jsonschema::meta::validate(&schema).expect("schema is a valid draft 2020-12 schema");
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(
            schema["properties"]["schemaVersion"]["const"],
            SCHEMA_VERSION
        );
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(
                property["description"].is_string(),
                "{name} has no description"
            );
        }
    }

    #[test]
    fn serialized_events_match_the_schema() {
        let validator = jsonschema::draft202012::new(&schema()).expect("schema compiles");
        for event in sample_events() {
            let value = serde_json::to_value(&event).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{value}\n{errors:#?}");
        }
    }

    #[test]
    fn schema_lists_exactly_the_serialized_members() {
        let schema = schema();
        let events = sample_events();
        let full = serde_json::to_value(events.last().unwrap()).unwrap();
        let mut members: Vec<&String> = full.as_object().unwrap().keys().collect();
        let mut properties: Vec<&String> =
            schema["properties"].as_object().unwrap().keys().collect();
        members.sort();
        properties.sort();
        assert_eq!(members, properties);

        // Required = what is always present: everything but the two skipped when empty.
        let minimal = serde_json::to_value(&events[2]).unwrap();
        let mut always: Vec<&str> = minimal
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        always.sort();
        required.sort();
        assert_eq!(always, required);
    }

    #[test]
    fn schema_rejects_what_v1_does_not_allow() {
        let validator = jsonschema::draft202012::new(&schema()).unwrap();
        let good = serde_json::to_value(&sample_events()[1]).unwrap();
        assert!(validator.is_valid(&good));
        let mutations = [
            ("newField", json!(1)),
            ("state", json!("queued")),
            ("source", json!("sse")),
            ("schemaVersion", json!(2)),
            ("taskId", json!("")),
            ("taskId", json!("a\nb")),
            ("eventId", json!("not-a-uuid")),
            ("createTime", json!(1.5)),
            ("outputs", json!(["url"])),
            ("error", json!({"code": 2038, "message": null})),
            ("warnings", json!([])),
        ];
        for (key, value) in mutations {
            let mut bad = good.clone();
            bad[key] = value.clone();
            assert!(
                !validator.is_valid(&bad),
                "{key} = {value} should be invalid"
            );
        }
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("orderId");
        assert!(!validator.is_valid(&missing));
    }

    #[test]
    fn serialized_shape_and_round_trip() {
        for event in sample_events() {
            let json = serde_json::to_string(&event).unwrap();
            let back: TaskEvent = serde_json::from_str(&json).unwrap();
            assert_eq!(back, event, "{json}");
        }
        let plain = serde_json::to_value(&sample_events()[0]).unwrap();
        assert_eq!(plain["schemaVersion"], 1);
        assert_eq!(plain["providerState"], "success");
        assert_eq!(plain["receivedAt"], NOW);
        assert_eq!(plain["error"], Value::Null);
        assert!(plain.get("warnings").is_none());
        assert!(plain.get("conflictsWith").is_none());
        let conflicted = serde_json::to_value(sample_events().last().unwrap()).unwrap();
        assert_eq!(conflicted["conflictsWith"], "fail");
        assert_eq!(conflicted["warnings"], json!([WARN_SUCCESS_WITHOUT_OUTPUT]));
    }
}
