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
//! - output items are objects kept verbatim ([`Output`]: extra fields and integers of any
//!   size kept as written, only the whitespace between tokens removed); `output` null or
//!   absent is an empty list;
//! - unknown members anywhere are ignored.
//!
//! Whatever the shape, the body is bounded before anything is stored, so that every later
//! stage (storage, the encoders of every publisher) is total:
//!
//! - at most [`MAX_DEPTH`] levels of nesting, and no object with a repeated key, anywhere in
//!   the body (serde_json alone would keep the last one: two readers could disagree);
//! - every time within `0..=`[`MAX_TIME_MS`] (up to the last millisecond of the year 9999,
//!   which RFC 3339, and so the CloudEvents `time` attribute, can still write).
//!
//! The task id is the dedup key, the Kafka message key and a NATS subject token, so it must
//! be a JSON string (a number is rejected rather than stringified: `1`, `1.0` and `1e0` would
//! be three ids for one task), non-blank, at most [`MAX_TASK_ID_BYTES`] bytes and free of
//! control characters, format characters (Unicode category Cf: bidi overrides such as U+202E,
//! zero-width joiners, the BOM) and line or paragraph separators (Zl, Zp), which would make
//! one id look like another in logs and tools. It is otherwise kept verbatim (not trimmed): it has to match what the
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
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

mod json;

pub use json::{Output, MAX_DEPTH};

/// Version of the serialized [`TaskEvent`] (`schema/task-event.v1.json`).
pub const SCHEMA_VERSION: u32 = 1;

/// Longest task id accepted, in bytes of UTF-8. Real ids are ~30 bytes; the bound keeps
/// Kafka keys, NATS subjects and outbox keys small whatever a caller posts.
pub const MAX_TASK_ID_BYTES: usize = 512;

/// Latest time accepted, in milliseconds since the epoch: 9999-12-31T23:59:59.999Z. Times
/// before the epoch are refused too.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

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
    pub outputs: Vec<Output>,
    pub error: Option<TaskError>,
    /// Milliseconds since the epoch, as the provider sent them (within `0..=MAX_TIME_MS`).
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
    /// An object with the same key twice; `field` is the repeated one.
    #[error("field `{field}` appears more than once")]
    DuplicateKey { field: String },
    /// Nesting past [`MAX_DEPTH`]; `field` is where it went too deep.
    #[error("field `{field}` is nested deeper than 64 levels")]
    TooDeep { field: String },
}

impl ParseError {
    /// The field at fault, as named in the message; `None` when the body as a whole is.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParseError::InvalidJson(_) | ParseError::NotAnObject(_) => None,
            ParseError::MissingField { field }
            | ParseError::MissingEither { field, .. }
            | ParseError::WrongType { field, .. }
            | ParseError::InvalidValue { field, .. }
            | ParseError::DuplicateKey { field }
            | ParseError::TooDeep { field } => Some(field),
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
    } else if id.chars().any(|c| c.is_control() || is_invisible(c)) {
        Some("must not contain control, format or line/paragraph separator characters")
    } else {
        None
    }
}

/// Unicode format characters (Cf) and line or paragraph separators (Zl, Zp).
/// ASCII has none, so the table look-up (a profile's 1% under load) is only
/// made for the other characters.
fn is_invisible(c: char) -> bool {
    !c.is_ascii()
        && matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        )
}

/// Parses a callback body or a status-endpoint record (the provider says they are the same
/// document; both dialects are accepted either way). The preferred entry point: only here
/// are repeated keys refused and output numbers kept as written.
pub fn parse(body: &[u8], source: Source, received_at_ms: i64) -> Result<TaskEvent, ParseError> {
    let mut record = Record::of(json::read(body)?)?;
    record.body = Some(body);
    record.into_event(source, received_at_ms)
}

/// Same as [`parse`], from an already-parsed JSON value. serde_json has then already kept
/// the last of any repeated key and turned big integers into floats, so prefer [`parse`] on
/// the bytes; the depth and every other bound still apply.
pub fn from_value(
    value: Value,
    source: Source,
    received_at_ms: i64,
) -> Result<TaskEvent, ParseError> {
    json::check_depth(&value)?;
    Record::of(value)?.into_event(source, received_at_ms)
}

/// A task record being taken apart; `prefix` makes error messages name fields as the
/// client wrote them.
struct Record<'a> {
    map: Map<String, Value>,
    prefix: &'static str,
    /// The body's bytes, when there are any: output items are then taken from them as
    /// written rather than re-serialized from `map`.
    body: Option<&'a [u8]>,
}

impl Record<'_> {
    /// Finds the record in a body: the body itself, or its `data` when it is an envelope.
    fn of(value: Value) -> Result<Self, ParseError> {
        let Value::Object(mut top) = value else {
            return Err(ParseError::NotAnObject(kind(&value)));
        };
        let bare = top.get("taskId").is_some_and(|id| !id.is_null());
        Ok(match (bare, top.remove("data")) {
            (false, Some(Value::Object(data))) => Self {
                map: data,
                prefix: "data.",
                body: None,
            },
            (false, Some(other)) => {
                return Err(wrong_type("data".into(), "an object", &other));
            }
            (_, _) => Self {
                map: top,
                prefix: "",
                body: None,
            },
        })
    }

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

    fn outputs(&mut self) -> Result<Vec<Output>, ParseError> {
        let items = match self.take("output") {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(wrong_type(self.path("output"), "an array or null", &other));
            }
        };
        if let Some((i, item)) = items.iter().enumerate().find(|(_, v)| !v.is_object()) {
            let field = self.path(&format!("output[{i}]"));
            return Err(wrong_type(field, "an object", item));
        }
        if let Some(body) = self.body {
            return json::verbatim_outputs(body, !self.prefix.is_empty());
        }
        items
            .iter()
            .map(|item| match item {
                Value::Object(object) => Output::from_map(object),
                _ => Err(serde::de::Error::custom("not an object")),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| ParseError::InvalidJson(e.to_string()))
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
            Some(Ok(ms)) if (0..=MAX_TIME_MS).contains(&ms) => Ok(Some(ms)),
            Some(_) => Err(ParseError::InvalidValue {
                field: self.path(name),
                problem: TIME_RANGE,
            }),
            None => Err(ParseError::WrongType {
                field: self.path(name),
                expected: EXPECTED,
                found: "a non-numeric string",
            }),
        }
    }
}

/// Why a time is refused; keep in step with [`MAX_TIME_MS`].
const TIME_RANGE: &str = "must be between 0 and 253402300799999 milliseconds since the epoch \
     (1970-01-01 to 9999-12-31)";

/// Float times are cut to whole milliseconds (towards zero). Values an `i64` cannot hold are
/// refused: `as` would silently saturate them into a plausible-looking but wrong time.
fn truncate(ms: f64) -> Result<i64, ()> {
    // 2^63 is exact in f64, so this is precisely the i64 range.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if ms.is_finite() && (-LIMIT..LIMIT).contains(&ms) {
        Ok(ms.trunc() as i64)
    } else {
        Err(())
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
mod props;
#[cfg(test)]
mod tests;
