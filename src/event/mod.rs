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

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Number, Value};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

mod json;
mod meta;

pub use json::{Output, MAX_DEPTH};
pub use meta::EventMeta;

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
    /// The W3C `traceparent` of the span that stored the event (telemetry
    /// on): kept with it in the outbox ([`EventMeta`]), never in its JSON.
    #[serde(skip)]
    pub traceparent: Option<String>,
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
        Some("must not contain control, format, separator or blank characters")
    } else {
        None
    }
}

/// Unicode format characters (Cf), separators other than the ASCII space
/// (Zs, Zl, Zp), and the characters that are drawn as nothing although
/// they are letters or symbols (the braille blank U+2800, the Hangul
/// fillers, variation selectors, the combining grapheme joiner...): an id
/// made of them looks empty or like another id. ASCII has none, so the
/// table look-up (a profile's 1% under load) is only made for the others.
fn is_invisible(c: char) -> bool {
    !c.is_ascii()
        && (matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::SpaceSeparator
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        ) || matches!(
            c,
            '\u{034F}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FFA0}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0100}'..='\u{E01EF}'
        ))
}

/// Parses a callback body or a status-endpoint record (the provider says they are the same
/// document; both dialects are accepted either way). The preferred entry point: only here
/// are repeated keys refused and output numbers kept as written.
///
/// Two passes over the bytes, neither building a tree: [`json::validate`] applies the bounds
/// to the whole body before anything is kept, then the record's members are read into
/// [`Member`]s (strings borrowed from the body, output items as raw text) and checked.
pub fn parse(body: &[u8], source: Source, received_at_ms: i64) -> Result<TaskEvent, ParseError> {
    json::validate(body)?;
    let top: Data = serde_json::from_slice(body)
        .map_err(|e: serde_json::Error| ParseError::InvalidJson(e.to_string()))?;
    Record::of(top)?.into_event(source, received_at_ms)
}

/// The task id of a body [`parse`] refused, when one can still be read
/// where the documented shapes put it (`taskId` or `task_id`, at the top
/// or under `data`) and is an acceptable id: for the task's trace.
pub fn task_id_hint(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Hint<'a> {
        #[serde(rename = "taskId", borrow, default)]
        camel: Option<Cow<'a, str>>,
        #[serde(rename = "task_id", borrow, default)]
        snake: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        data: Option<Inner<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(rename = "taskId", borrow, default)]
        camel: Option<Cow<'a, str>>,
        #[serde(rename = "task_id", borrow, default)]
        snake: Option<Cow<'a, str>>,
    }
    let hint: Hint<'_> = serde_json::from_slice(body).ok()?;
    let inner = hint.data.and_then(|d| d.camel.or(d.snake));
    let id = hint.camel.or(hint.snake).or(inner)?;
    task_id_problem(&id).is_none().then(|| id.into_owned())
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
    let body = serde_json::to_vec(&value).map_err(|e| ParseError::InvalidJson(e.to_string()))?;
    parse(&body, source, received_at_ms)
}

/// A member of the record as far as the checks need it: absent, null, a scalar, or only
/// the kind of a container. Strings are borrowed from the body unless they hold escapes.
#[derive(Default)]
enum Member<'a> {
    #[default]
    Absent,
    Null,
    Bool,
    Number(Number),
    String(Cow<'a, str>),
    Array,
    Object,
}

impl<'a> Member<'a> {
    /// The member, with JSON `null` meaning the same as absent.
    fn present(self) -> Option<Member<'a>> {
        match self {
            Member::Absent | Member::Null => None,
            other => Some(other),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Member::Absent | Member::Null => "null",
            Member::Bool => "a boolean",
            Member::Number(_) => "a number",
            Member::String(_) => "a string",
            Member::Array => "an array",
            Member::Object => "an object",
        }
    }
}

/// A member that is read further when it is a container of the expected kind: `Self::seq`
/// or `Self::map` read it, any other value becomes `Self::other`.
trait Shape<'de>: Sized {
    fn other(member: Member<'de>) -> Self;

    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::other(Member::Array))
    }

    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::other(Member::Object))
    }
}

struct ShapeVisitor<T>(PhantomData<T>);

impl<'de, T: Shape<'de>> Visitor<'de> for ShapeVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::other(Member::Null))
    }

    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::other(Member::Bool))
    }

    fn visit_i64<E>(self, v: i64) -> Result<T, E> {
        Ok(T::other(Member::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<T, E> {
        Ok(T::other(Member::Number(v.into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        Number::from_f64(v)
            .map(|n| T::other(Member::Number(n)))
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<T, E> {
        Ok(T::other(Member::String(Cow::Borrowed(v))))
    }

    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok(T::other(Member::String(Cow::Owned(v.to_owned()))))
    }

    fn visit_string<E>(self, v: String) -> Result<T, E> {
        Ok(T::other(Member::String(Cow::Owned(v))))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::map(map)
    }
}

/// Implements `Deserialize` through [`ShapeVisitor`].
macro_rules! deserialize_shape {
    ($($name:ident),*) => {$(
        impl<'de: 'a, 'a> Deserialize<'de> for $name<'a> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any(ShapeVisitor(PhantomData))
            }
        }
    )*};
}

deserialize_shape!(Member, OutputMember, ErrorMember, Data);

impl<'de: 'a, 'a> Shape<'de> for Member<'a> {
    fn other(member: Member<'de>) -> Self {
        member
    }
}

/// `output`: its items as written, or any other value.
enum OutputMember<'a> {
    Items(Vec<&'a RawValue>),
    Other(Member<'a>),
}

impl Default for OutputMember<'_> {
    fn default() -> Self {
        OutputMember::Other(Member::Absent)
    }
}

impl<'de: 'a, 'a> Shape<'de> for OutputMember<'a> {
    fn other(member: Member<'de>) -> Self {
        OutputMember::Other(member)
    }

    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(OutputMember::Items(items))
    }
}

/// `error`: an object's `code` and `message`, or any other value.
enum ErrorMember<'a> {
    Object(ErrorObject<'a>),
    Other(Member<'a>),
}

impl Default for ErrorMember<'_> {
    fn default() -> Self {
        ErrorMember::Other(Member::Absent)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorObject<'a> {
    /// As written: a number is kept exactly as its text (a big integer
    /// would otherwise come back as a float, `1.2345678901234568e29`).
    #[serde(borrow)]
    code: Option<&'a RawValue>,
    #[serde(borrow)]
    message: Member<'a>,
}

impl<'de: 'a, 'a> Shape<'de> for ErrorMember<'a> {
    fn other(member: Member<'de>) -> Self {
        ErrorMember::Other(member)
    }

    fn map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        ErrorObject::deserialize(MapAccessDeserializer::new(map)).map(ErrorMember::Object)
    }
}

/// The body, or an envelope's `data`: a record's members, or any other value.
enum Data<'a> {
    Record(Box<Fields<'a>>),
    Other(Member<'a>),
}

impl Default for Data<'_> {
    fn default() -> Self {
        Data::Other(Member::Absent)
    }
}

impl<'de: 'a, 'a> Shape<'de> for Data<'a> {
    fn other(member: Member<'de>) -> Self {
        Data::Other(member)
    }

    fn map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        Fields::deserialize(MapAccessDeserializer::new(map)).map(|f| Data::Record(Box::new(f)))
    }
}

/// The members of an object that a record may have; any other member is skipped. `data`
/// only counts in the body itself (an envelope).
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Fields<'a> {
    #[serde(borrow)]
    task_id: Member<'a>,
    #[serde(borrow)]
    state: Member<'a>,
    #[serde(borrow)]
    status: Member<'a>,
    #[serde(borrow)]
    order_id: Member<'a>,
    #[serde(borrow)]
    model: Member<'a>,
    #[serde(borrow)]
    credits_used: Member<'a>,
    #[serde(borrow)]
    create_time: Member<'a>,
    #[serde(borrow)]
    complete_time: Member<'a>,
    #[serde(borrow)]
    update_time: Member<'a>,
    #[serde(borrow)]
    output: OutputMember<'a>,
    #[serde(borrow)]
    error: ErrorMember<'a>,
    #[serde(borrow)]
    data: Data<'a>,
}

/// A task record being checked; `prefix` makes error messages name fields as the client
/// wrote them.
struct Record<'a> {
    fields: Box<Fields<'a>>,
    prefix: &'static str,
}

impl<'a> Record<'a> {
    /// Finds the record in a body: the body itself, or its `data` when it is an envelope.
    fn of(top: Data<'a>) -> Result<Self, ParseError> {
        let mut top = match top {
            Data::Record(top) => top,
            Data::Other(other) => return Err(ParseError::NotAnObject(other.kind())),
        };
        let bare = !matches!(top.task_id, Member::Absent | Member::Null);
        Ok(match (bare, std::mem::take(&mut top.data)) {
            (false, Data::Record(data)) => Self {
                fields: data,
                prefix: "data.",
            },
            (false, Data::Other(Member::Absent)) | (true, _) => Self {
                fields: top,
                prefix: "",
            },
            (false, Data::Other(other)) => {
                return Err(ParseError::WrongType {
                    field: "data".into(),
                    expected: "an object",
                    found: other.kind(),
                });
            }
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

        let fields = &mut *self.fields;
        let order_id = std::mem::take(&mut fields.order_id);
        let model = std::mem::take(&mut fields.model);
        let credits_used = std::mem::take(&mut fields.credits_used);
        let create_time = std::mem::take(&mut fields.create_time);
        let complete_time = std::mem::take(&mut fields.complete_time);
        let update_time = std::mem::take(&mut fields.update_time);
        Ok(TaskEvent {
            schema_version: SCHEMA_VERSION,
            event_id: event_id(&task_id, state),
            order_id: self.opt_string("orderId", order_id)?,
            model: self.opt_string("model", model)?,
            credits_used: self.opt_credits("creditsUsed", credits_used)?,
            create_time: self.opt_millis("createTime", create_time)?,
            complete_time: self.opt_millis("completeTime", complete_time)?,
            update_time: self.opt_millis("updateTime", update_time)?,
            task_id,
            state,
            provider_state,
            outputs,
            error,
            received_at,
            source,
            warnings,
            conflicts_with: None,
            traceparent: None,
        })
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn task_id(&mut self) -> Result<String, ParseError> {
        let id = match std::mem::take(&mut self.fields.task_id) {
            Member::Absent => {
                return Err(ParseError::MissingField {
                    field: self.path("taskId"),
                })
            }
            Member::String(id) => id,
            other => return Err(wrong_type(self.path("taskId"), "a string", &other)),
        };
        match task_id_problem(&id) {
            None => Ok(id.into_owned()),
            Some(problem) => Err(ParseError::InvalidValue {
                field: self.path("taskId"),
                problem,
            }),
        }
    }

    fn provider_state(&mut self) -> Result<String, ParseError> {
        let state = std::mem::take(&mut self.fields.state).present();
        let status = std::mem::take(&mut self.fields.status).present();
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
            Member::String(s) => Ok(s.into_owned()),
            other => Err(wrong_type(self.path(name), "a string", &other)),
        }
    }

    fn outputs(&mut self) -> Result<Vec<Output>, ParseError> {
        let items = match std::mem::take(&mut self.fields.output) {
            OutputMember::Items(items) => items,
            OutputMember::Other(Member::Absent | Member::Null) => return Ok(Vec::new()),
            OutputMember::Other(other) => {
                return Err(wrong_type(self.path("output"), "an array or null", &other));
            }
        };
        if let Some((i, item)) = items
            .iter()
            .enumerate()
            .find(|(_, item)| !item.get().starts_with('{'))
        {
            return Err(ParseError::WrongType {
                field: self.path(&format!("output[{i}]")),
                expected: "an object",
                found: raw_kind(item.get()),
            });
        }
        items
            .into_iter()
            .map(|item| Output::from_text(item.get()))
            .collect::<Result<_, _>>()
            .map_err(|e| ParseError::InvalidJson(e.to_string()))
    }

    fn error(&mut self) -> Result<Option<TaskError>, ParseError> {
        let object = match std::mem::take(&mut self.fields.error) {
            ErrorMember::Object(object) => object,
            ErrorMember::Other(Member::Absent | Member::Null) => return Ok(None),
            ErrorMember::Other(Member::String(message)) => {
                let message = non_blank(message);
                return Ok(message.map(|m| TaskError {
                    code: None,
                    message: Some(m),
                }));
            }
            ErrorMember::Other(other) => {
                return Err(wrong_type(
                    self.path("error"),
                    "an object, a string or null",
                    &other,
                ));
            }
        };
        let code = match object.code.map(RawValue::get) {
            None => None,
            Some(raw) if raw.starts_with('"') => {
                let code: Cow<str> = serde_json::from_str(raw)
                    .map_err(|e| ParseError::InvalidJson(e.to_string()))?;
                non_blank(code)
            }
            Some(raw) if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
                Some(raw.to_string())
            }
            Some(raw) => {
                let found = match raw.as_bytes().first() {
                    Some(b'[') => Member::Array,
                    Some(b'{') => Member::Object,
                    _ => Member::Bool,
                };
                return Err(wrong_type(
                    self.path("error.code"),
                    "a string, a number or null",
                    &found,
                ));
            }
        };
        let message = match object.message.present() {
            None => None,
            Some(Member::String(message)) => non_blank(message),
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

    fn opt_string(&self, name: &str, member: Member) -> Result<Option<String>, ParseError> {
        match member.present() {
            None => Ok(None),
            Some(Member::String(s)) => Ok(Some(s.into_owned())),
            Some(other) => Err(wrong_type(self.path(name), "a string or null", &other)),
        }
    }

    fn opt_credits(&self, name: &str, member: Member) -> Result<Option<f64>, ParseError> {
        const EXPECTED: &str = "a number, a numeric string or null";
        let credits = match member.present() {
            None => return Ok(None),
            Some(Member::Number(n)) => n.as_f64(),
            Some(Member::String(s)) => s.trim().parse::<f64>().ok(),
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

    fn opt_millis(&self, name: &str, member: Member) -> Result<Option<i64>, ParseError> {
        const EXPECTED: &str = "a number of milliseconds, a numeric string or null";
        let millis = match member.present() {
            None => return Ok(None),
            Some(Member::Number(n)) => n.as_i64().map(Ok).or_else(|| n.as_f64().map(truncate)),
            Some(Member::String(s)) => {
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

/// The kind of a JSON text from its first byte (the text is valid JSON and starts with
/// its value).
fn raw_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
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

fn non_blank(s: Cow<str>) -> Option<String> {
    (!s.trim().is_empty()).then(|| s.into_owned())
}

fn wrong_type(field: String, expected: &'static str, found: &Member) -> ParseError {
    ParseError::WrongType {
        field,
        expected,
        found: found.kind(),
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
