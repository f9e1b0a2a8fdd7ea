//! Strict JSON reading for callback bodies, and output items kept as the provider wrote them.
//!
//! serde_json alone accepts what the outbox must not store: a repeated member silently
//! replaces the first (so two readers of the same body can disagree about it), nesting is
//! only bounded by its internal recursion limit of 128, and integers beyond 64 bits turn into
//! floats. [`read`] is one streaming pass that builds the [`Value`] while refusing repeated
//! keys and nesting deeper than [`MAX_DEPTH`], with a typed [`ParseError`] naming the place.
//! [`verbatim_outputs`] then takes the `output` items from the body's own text, so numbers of
//! any size reach the broker exactly as sent.
//!
//! serde_json's `arbitrary_precision` feature would also keep big numbers, but it is global
//! to the whole dependency graph (axum, async-nats, jsonschema) and changes how numbers
//! deserialize inside untagged and flattened types there; `raw_value`, which the graph
//! already enables, changes nothing for anyone else.

use std::fmt;
use std::ops::Deref;
use std::sync::OnceLock;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use super::ParseError;

/// Deepest nesting of arrays and objects accepted in a body; the body itself is level 1.
pub const MAX_DEPTH: usize = 64;

/// Longest field path quoted in an error message, in bytes; longer ones end in `…`.
const MAX_PATH_BYTES: usize = 128;

/// One output item, exactly as the provider wrote it, with the whitespace between tokens
/// removed (so it never holds a line break). Always a JSON object.
///
/// It dereferences to a parsed [`Map`] for reading fields (`output["url"]`); that view is
/// made on first use and, like any [`Value`], holds integers past 64 bits as floats. What is
/// stored and published is the text.
#[derive(Clone)]
pub struct Output {
    raw: Box<RawValue>,
    view: OnceLock<Map<String, Value>>,
}

impl Output {
    /// Serializes `map` (the poller's path, where the body was already read as a [`Value`]).
    pub fn from_map(map: &Map<String, Value>) -> Result<Self, serde_json::Error> {
        Ok(Self {
            raw: serde_json::value::to_raw_value(map)?,
            view: OnceLock::new(),
        })
    }

    /// Takes a JSON text that must be an object, compacting it.
    fn from_text(text: &str) -> Result<Self, serde_json::Error> {
        let compacted = compact(text);
        if !compacted.starts_with('{') {
            return Err(de::Error::custom("an output item must be a JSON object"));
        }
        Ok(Self {
            raw: RawValue::from_string(compacted)?,
            view: OnceLock::new(),
        })
    }

    /// The compact JSON text of the object.
    pub fn as_json(&self) -> &str {
        self.raw.get()
    }
}

impl Deref for Output {
    type Target = Map<String, Value>;

    fn deref(&self) -> &Self::Target {
        self.view
            .get_or_init(|| serde_json::from_str(self.raw.get()).unwrap_or_default())
    }
}

impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.raw.get())
    }
}

impl Serialize for Output {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Output {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Self::from_text(raw.get()).map_err(de::Error::custom)
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

/// Refuses a [`Value`] nested deeper than [`MAX_DEPTH`] (the poller's path, where serde_json
/// built the value). Iterative, so a value built in memory cannot exhaust the stack.
pub fn check_depth(value: &Value) -> Result<(), ParseError> {
    let mut stack = vec![(value, 1usize, "(body)")];
    while let Some((value, depth, field)) = stack.pop() {
        if !(value.is_array() || value.is_object()) {
            continue;
        }
        if depth > MAX_DEPTH {
            return Err(ParseError::TooDeep {
                field: field.to_owned(),
            });
        }
        match value {
            Value::Array(items) => {
                stack.extend(items.iter().map(|child| (child, depth + 1, field)));
            }
            Value::Object(members) => {
                for (key, child) in members {
                    // Errors name the body's member the fault is under.
                    let under = if depth == 1 { key.as_str() } else { field };
                    stack.push((child, depth + 1, under));
                }
            }
            _ => {}
        }
    }
    Ok(())
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
