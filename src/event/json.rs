//! Strict JSON reading for callback bodies, and output items kept as the provider wrote them.
//!
//! serde_json alone accepts what the outbox must not store: a repeated member silently
//! replaces the first (so two readers of the same body can disagree about it), nesting is
//! only bounded by its internal recursion limit of 128, and integers beyond 64 bits turn into
//! floats. [`validate`] is one streaming pass over the body that keeps nothing but refuses
//! repeated keys and nesting deeper than [`MAX_DEPTH`], with a typed [`ParseError`] naming
//! the place. Only then is the record read into typed members (the parent module), with the
//! `output` items taken from the body's own text as [`RawValue`]s, so numbers of any size
//! reach the broker exactly as sent.
//!
//! serde_json's `arbitrary_precision` feature would also keep big numbers, but it is global
//! to the whole dependency graph (axum, async-nats, jsonschema) and changes how numbers
//! deserialize inside untagged and flattened types there; `raw_value`, which the graph
//! already enables, changes nothing for anyone else.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::OnceLock;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

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
    /// Takes a JSON text that must be an object, compacting it.
    pub(super) fn from_text(text: &str) -> Result<Self, serde_json::Error> {
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
    // Start of the run of bytes not yet copied. Every byte looked at is ASCII or part of a
    // string, and only ASCII bytes end a run, so runs are always whole characters.
    let mut run = 0;
    for (i, b) in json.bytes().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push_str(&json[run..i]);
            run = i + 1;
        }
    }
    out.push_str(&json[run..]);
    out
}

/// Checks a whole body without keeping any of it: valid JSON, no repeated key in any
/// object, at most [`MAX_DEPTH`] levels, nothing after the value. The first fault in the
/// order of the text wins, as a [`ParseError`] naming its place.
pub fn validate(body: &[u8]) -> Result<(), ParseError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut fault = None;
    let mut keys = Vec::new();
    let result = Strict {
        depth: 0,
        fault: &mut fault,
        keys: &mut keys,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match (result, fault) {
        (_, Some(fault)) => Err(fault.into_error()),
        (Ok(()), None) => Ok(()),
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

/// Objects with more members than this look repeated keys up in a hash set rather than
/// by a scan of the members before, so a body of many keys costs linear time.
const SCAN_KEYS: usize = 16;

/// Walks a value like serde_json's own [`Value`] reader, keeping nothing, but records a
/// [`Fault`] and stops at a repeated key or at a container deeper than [`MAX_DEPTH`].
struct Strict<'a, 'de> {
    /// Containers around the value being read.
    depth: usize,
    fault: &'a mut Option<Fault>,
    /// The keys of the objects being read, innermost last (one stack for the whole body,
    /// so small objects allocate nothing of their own).
    keys: &'a mut Vec<Cow<'de, str>>,
}

impl Strict<'_, '_> {
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

impl<'de> DeserializeSeed<'de> for Strict<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("number out of range"))
        }
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.enter()?;
        let mut index = 0;
        loop {
            let child = Strict {
                depth,
                fault: &mut *self.fault,
                keys: &mut *self.keys,
            };
            match seq.next_element_seed(child) {
                Ok(Some(())) => index += 1,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if let Some(fault) = self.fault.as_mut() {
                        fault.path.push(Step::Index(index));
                    }
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let depth = self.enter()?;
        let start = self.keys.len();
        let mut many: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(Key)? {
            let repeated = match &many {
                Some(set) => set.contains(&key),
                None => self.keys[start..].contains(&key),
            };
            if repeated {
                *self.fault = Some(Fault {
                    kind: FaultKind::Duplicate,
                    path: vec![Step::Key(key.into_owned())],
                });
                return Err(de::Error::custom("duplicate key"));
            }
            let child = Strict {
                depth,
                fault: &mut *self.fault,
                keys: &mut *self.keys,
            };
            if let Err(e) = map.next_value_seed(child) {
                if let Some(fault) = self.fault.as_mut() {
                    fault.path.push(Step::Key(key.into_owned()));
                }
                return Err(e);
            }
            match &mut many {
                Some(set) => {
                    set.insert(key);
                }
                None => {
                    self.keys.push(key);
                    if self.keys.len() - start > SCAN_KEYS {
                        many = Some(self.keys.drain(start..).collect());
                    }
                }
            }
        }
        self.keys.truncate(start);
        Ok(())
    }
}

/// An object key, borrowed from the body unless it holds escapes.
pub struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}
