//! The parser as it was before typed reading: a `serde_json::Value` tree taken apart member
//! by member. Kept for tests only, as the reference the typed parser must agree with on
//! every body (same event or same error).

#![allow(dead_code)]

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use super::json::{check_depth, MAX_DEPTH};
use super::{
    event_id, task_id_problem, truncate, Output, ParseError, Source, State, TaskError, TaskEvent,
    MAX_TIME_MS, SCHEMA_VERSION, TIME_RANGE, WARN_SUCCESS_WITHOUT_OUTPUT, WARN_UNKNOWN_STATE,
};

const MAX_PATH_BYTES: usize = 128;

/// Reads a whole body: valid JSON, no repeated key in any object, at most [`MAX_DEPTH`]
/// levels, nothing after the value.
pub fn read(body: &[u8]) -> Result<Value, ParseError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut fault = None;
    let result = Strict {
        depth: 0,
        fault: &mut fault,
    }
    .deserialize(&mut de)
    .and_then(|value| de.end().map(|()| value));
    match (result, fault) {
        (_, Some(fault)) => Err(fault.into_error()),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(ParseError::InvalidJson(e.to_string())),
    }
}

/// The `output` items of a body [`read`] accepted, as written. `envelope` says whether the
/// record is the body's `data` member.
pub fn verbatim_outputs(body: &[u8], envelope: bool) -> Result<Vec<Output>, ParseError> {
    #[derive(Deserialize)]
    struct Members<'a> {
        #[serde(borrow, default)]
        data: Option<&'a RawValue>,
        #[serde(borrow, default)]
        output: Option<&'a RawValue>,
    }
    let invalid = |e: serde_json::Error| ParseError::InvalidJson(e.to_string());
    let mut record: Members = serde_json::from_slice(body).map_err(invalid)?;
    if envelope {
        let data = record.data.map_or("{}", RawValue::get);
        record = serde_json::from_str(data).map_err(invalid)?;
    }
    let Some(output) = record.output else {
        return Ok(Vec::new());
    };
    let items: Vec<&RawValue> = serde_json::from_str(output.get()).map_err(invalid)?;
    items
        .into_iter()
        .map(|item| Output::from_text(item.get()).map_err(invalid))
        .collect()
}

/// A step of the path to a fault, collected while the error unwinds.
enum Step {
    Key(String),
    Index(usize),
}

enum FaultKind {
    Duplicate,
    TooDeep,
}

/// What [`Strict`] refused; `path` is innermost first.
struct Fault {
    kind: FaultKind,
    path: Vec<Step>,
}

impl Fault {
    fn into_error(self) -> ParseError {
        let mut field = String::new();
        for step in self.path.iter().rev() {
            match step {
                Step::Key(key) if field.is_empty() => field.push_str(key),
                Step::Key(key) => {
                    field.push('.');
                    field.push_str(key);
                }
                Step::Index(i) => field.push_str(&format!("[{i}]")),
            }
            if field.len() > MAX_PATH_BYTES {
                break;
            }
        }
        if field.len() > MAX_PATH_BYTES {
            let mut end = MAX_PATH_BYTES;
            while !field.is_char_boundary(end) {
                end -= 1;
            }
            field.truncate(end);
            field.push('…');
        }
        if field.is_empty() {
            field.push_str("(body)");
        }
        match self.kind {
            FaultKind::Duplicate => ParseError::DuplicateKey { field },
            FaultKind::TooDeep => ParseError::TooDeep { field },
        }
    }
}

/// Builds a [`Value`] like serde_json's own, but records a [`Fault`] and stops at a repeated
/// key or at a container deeper than [`MAX_DEPTH`].
struct Strict<'a> {
    /// Containers around the value being read.
    depth: usize,
    fault: &'a mut Option<Fault>,
}

impl Strict<'_> {
    fn enter<E: de::Error>(&mut self) -> Result<usize, E> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            *self.fault = Some(Fault {
                kind: FaultKind::TooDeep,
                path: Vec::new(),
            });
            return Err(E::custom("nested too deeply"));
        }
        Ok(depth)
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.enter()?;
        let mut items = Vec::new();
        loop {
            let child = Strict {
                depth,
                fault: &mut *self.fault,
            };
            match seq.next_element_seed(child) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(Value::Array(items)),
                Err(e) => {
                    if let Some(fault) = self.fault.as_mut() {
                        fault.path.push(Step::Index(items.len()));
                    }
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.enter()?;
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.contains_key(&key) {
                *self.fault = Some(Fault {
                    kind: FaultKind::Duplicate,
                    path: vec![Step::Key(key)],
                });
                return Err(de::Error::custom("duplicate key"));
            }
            let child = Strict {
                depth,
                fault: &mut *self.fault,
            };
            match map.next_value_seed(child) {
                Ok(value) => {
                    members.insert(key, value);
                }
                Err(e) => {
                    if let Some(fault) = self.fault.as_mut() {
                        fault.path.push(Step::Key(key));
                    }
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(members))
    }
}

/// Parses a callback body or a status-endpoint record (the provider says they are the same
/// document; both dialects are accepted either way). The preferred entry point: only here
/// are repeated keys refused and output numbers kept as written.
pub fn parse(body: &[u8], source: Source, received_at_ms: i64) -> Result<TaskEvent, ParseError> {
    let mut record = Record::of(read(body)?)?;
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
    check_depth(&value)?;
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
            return verbatim_outputs(body, !self.prefix.is_empty());
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

/// Removes the whitespace between JSON tokens. `json` must be valid JSON, whose strings
/// cannot hold a raw line break, so the result is one line.
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}
