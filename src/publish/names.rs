//! How topics and subjects are named: a template's placeholders, what
//! [`render`] makes of them for one event, and the rules every rendered
//! name must follow ([`check_topic`], [`check_subject`]).

use super::{EncodeError, EventMeta};

/// Longest `{model}` value put into a topic or subject, in bytes.
pub const MAX_MODEL_TOKEN: usize = 64;
/// What `{model}` becomes for an event without a model, or with one the allowlist lacks.
pub const UNKNOWN_MODEL: &str = "unknown";
/// Longest Kafka topic name (the broker's own limit).
const MAX_TOPIC: usize = 249;
/// Longest subject hookbridge publishes to; NATS itself only bounds the protocol line.
const MAX_SUBJECT: usize = 1024;

/// Names the `{task}` token of subjects: UUIDv5s of task ids.
const TASK_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b1c_52a8_4c1e_4a3c_9d0e_5f2b_7a61_c0de);

/// What `{task}` becomes for `task_id`: the UUIDv5 of the task id, as 32 hex digits, so
/// that any task id (dots, wildcards, any length) makes one legal subject token, and the
/// same task always the same one.
pub fn task_token(task_id: &str) -> String {
    uuid::Uuid::new_v5(&TASK_NAMESPACE, task_id.as_bytes())
        .simple()
        .to_string()
}

/// Expands `{model}`, `{state}` and `{task}` (NATS subjects only, see [`task_token`]) in a
/// topic or subject template.
///
/// `{state}` is one of five fixed words. `{model}` is the event's model when `models` (the
/// `publisher.models` allowlist) lists it exactly; any other model, and a missing one, is
/// [`UNKNOWN_MODEL`]. With an empty allowlist the model is reduced to `[A-Za-z0-9_-]` (other
/// characters become `_`) and cut to [`MAX_MODEL_TOKEN`] bytes. Either way the value is one
/// token that can be neither a NATS wildcard nor a separator; the result is still checked
/// by [`check_topic`] / [`check_subject`], since the template's fixed text counts too.
pub fn render(template: &str, event: &EventMeta, models: &[String]) -> String {
    if !template.contains('{') {
        return template.to_string();
    }
    template
        .replace("{model}", &model_token(event.model.as_deref(), models))
        .replace("{state}", event.state.as_str())
        .replace("{task}", &task_token(&event.task_id))
}

/// The `{model}` value of [`render`].
pub fn model_token(model: Option<&str>, models: &[String]) -> String {
    let Some(model) = model else {
        return UNKNOWN_MODEL.into();
    };
    if !models.is_empty() {
        return match models.iter().find(|m| *m == model) {
            Some(listed) => listed.clone(),
            None => UNKNOWN_MODEL.into(),
        };
    }
    let cleaned: String = model
        .chars()
        .map(|c| if is_token_char(c) { c } else { '_' })
        .take(MAX_MODEL_TOKEN)
        .collect();
    if cleaned.is_empty() {
        UNKNOWN_MODEL.into()
    } else {
        cleaned
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Whether `name` may be listed in `publisher.models`: 1 to [`MAX_MODEL_TOKEN`] characters
/// of `[A-Za-z0-9_-]`, so that it is used in topics and subjects as it is.
pub fn is_model_token(name: &str) -> bool {
    (1..=MAX_MODEL_TOKEN).contains(&name.len()) && name.chars().all(is_token_char)
}

/// A legal Kafka topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check_topic(topic: &str) -> Result<(), EncodeError> {
    let problem = if topic.is_empty() || topic.len() > MAX_TOPIC {
        Some("must be 1 to 249 characters long")
    } else if !topic.chars().all(|c| is_token_char(c) || c == '.') {
        Some("may only contain A-Z, a-z, 0-9, '.', '_' and '-'")
    } else if topic == "." || topic == ".." {
        Some("must not be '.' or '..'")
    } else if topic.starts_with("__") {
        Some("must not start with '__' (Kafka's internal topics, such as __consumer_offsets)")
    } else {
        None
    };
    problem.map_or(Ok(()), |problem| Err(EncodeError::topic(topic, problem)))
}

/// A subject a message may be published to: non-empty tokens separated by `.`, no
/// whitespace or control characters, no wildcard (`*`, `>`), at most 1024 bytes.
pub fn check_subject(subject: &str) -> Result<(), EncodeError> {
    let problem = if subject.is_empty() || subject.len() > MAX_SUBJECT {
        Some("must be 1 to 1024 bytes long")
    } else if subject.split('.').any(str::is_empty) {
        Some("must not have an empty token (leading, trailing or double '.')")
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else if subject.contains(['*', '>']) {
        Some("must not contain the wildcards '*' or '>'")
    } else {
        None
    };
    problem.map_or(Ok(()), |problem| {
        Err(EncodeError::subject(subject, problem))
    })
}

/// Where one event goes: `template` rendered for it (see [`render`]), then
/// held to the backend's name rule `check` ([`check_topic`],
/// [`check_subject`]).
pub fn destination(
    template: &str,
    event: &EventMeta,
    models: &[String],
    check: fn(&str) -> Result<(), EncodeError>,
) -> Result<String, EncodeError> {
    let name = render(template, event, models);
    check(&name)?;
    Ok(name)
}

/// A topic or subject template: non-empty, with no placeholder but
/// `{model}`, `{state}` and `{task}`.
pub fn check_template(key: &'static str, template: &str) -> Result<(), (&'static str, String)> {
    let stripped = template
        .replace("{model}", "")
        .replace("{state}", "")
        .replace("{task}", "");
    if template.is_empty() || stripped.contains(['{', '}']) {
        return Err((
            key,
            "must be non-empty and may only use the placeholders {model}, {state} \
             and (subjects only) {task}"
                .into(),
        ));
    }
    Ok(())
}

/// Whether `subject` has `{task}` as one of its tokens and uses `{model}`,
/// `{state}` and `{task}` only as whole tokens, so that one subject filter
/// selects every state of a task (JetStream cluster mode).
pub fn has_whole_task_token(subject: &str) -> bool {
    let whole_tokens = subject
        .split('.')
        .all(|token| !token.contains('{') || ["{model}", "{state}", "{task}"].contains(&token));
    subject.split('.').any(|t| t == "{task}") && whole_tokens
}
