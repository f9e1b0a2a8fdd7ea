//! Start-up checks of the publisher settings this module interprets. Each
//! returns the key at fault and why; the central config only maps them.
//!
//! The destinations are a closed set: `{model}` may only become a listed
//! model or `unknown`, `{state}` one of five words. So every topic or
//! subject an event can reach is known at start ([`destinations`]): each is
//! checked here, the Kafka publisher creates them, and a JetStream stream
//! must capture each of them. No sender can name a new one.

use std::collections::BTreeMap;

use super::config::{
    librdkafka_key, reserved_kafka_option, PublisherConfig, KAFKA_DEFAULT_MESSAGE_MAX_BYTES,
    KAFKA_MESSAGE_OVERHEAD,
};
use super::names::{check_subject, check_template, check_topic, is_model_token, UNKNOWN_MODEL};
use super::EncodeError;
use crate::event::State;
use crate::secret::Secret;

/// A setting refused: its key, and why.
pub type Refusal = (&'static str, String);

const STATES: [State; 5] = [
    State::Pending,
    State::Waiting,
    State::Generating,
    State::Success,
    State::Fail,
];

/// Every topic or subject `template` can render to: `{model}` as each listed
/// model and as `unknown`, `{state}` as each state, `{task}` as one sample
/// token (all tokens have the same shape). Sorted, without repeats.
pub fn destinations(template: &str, models: &[String]) -> Vec<String> {
    let mut tokens: Vec<&str> = models.iter().map(String::as_str).collect();
    tokens.push(UNKNOWN_MODEL);
    let mut out: Vec<String> = tokens
        .iter()
        .flat_map(|model| {
            STATES.iter().map(move |state| {
                template
                    .replace("{model}", model)
                    .replace("{state}", state.as_str())
                    .replace("{task}", &super::names::task_token(""))
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The whole check: `publisher.models` entries, the `{model}` rule, every
/// destination, and the backend's own options.
pub fn check_config(config: &PublisherConfig) -> Result<(), Refusal> {
    type Check = fn(&str) -> Result<(), EncodeError>;
    let (key, template, models, check): (_, _, _, Check) = match config {
        PublisherConfig::File(_) => return Ok(()),
        PublisherConfig::Kafka(k) => ("publisher.topic", &k.topic, &k.models, check_topic),
        PublisherConfig::Nats(n) => ("publisher.subject", &n.subject, &n.models, check_subject),
    };
    if let Some(bad) = models.iter().find(|m| !is_model_token(m)) {
        return Err((
            "publisher.models",
            format!("{bad:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'"),
        ));
    }
    if matches!(config, PublisherConfig::Kafka(_)) && template.contains("{task}") {
        return Err((
            key,
            "may not use {task}: that would make a topic per task (it is for NATS subjects)".into(),
        ));
    }
    if template.contains("{model}") && models.is_empty() {
        return Err((
            "publisher.models",
            format!(
                "must list the models `{{model}}` may become, since {key} uses it: \
                 without a list, every sender could name a new destination"
            ),
        ));
    }
    for destination in destinations(template, models) {
        check(&destination).map_err(|e| (key, e.to_string()))?;
    }
    match config {
        PublisherConfig::Kafka(k) => check_kafka_options(&k.options),
        PublisherConfig::Nats(n) => match &n.stream {
            Some(stream) => check_stream_covers(&stream.subjects, &destinations(template, models)),
            None => Ok(()),
        },
        PublisherConfig::File(_) => Ok(()),
    }
}

/// Every check of the `[publisher]` section, in order: [`check_config`],
/// then the backend's own settings, `body_limit` (`server.body_limit_bytes`)
/// against the Kafka producer's message limit included.
pub fn check_settings(config: &PublisherConfig, body_limit: usize) -> Result<(), Refusal> {
    check_config(config)?;
    let invalid = |key, reason: &str| Err((key, reason.to_string()));
    match config {
        PublisherConfig::File(f) if f.path.is_empty() => {
            invalid("publisher.path", "must be a file path or `-`")
        }
        PublisherConfig::Kafka(k) => {
            if k.brokers.trim().is_empty() {
                return invalid("publisher.brokers", "must list at least one broker");
            }
            check_template("publisher.topic", &k.topic)?;
            if let Some(key) = k.options.keys().find_map(|k| reserved_kafka_option(k)) {
                return Err((
                    "publisher.options",
                    format!("`{key}` is set by hookbridge and may not be overridden"),
                ));
            }
            // The producer refuses a larger message itself; the broker's
            // own limit is checked when the publisher starts.
            let producer_max = kafka_message_max_bytes(&k.options).unwrap_or(
                KAFKA_DEFAULT_MESSAGE_MAX_BYTES.max(body_limit as u64 + KAFKA_MESSAGE_OVERHEAD),
            );
            if body_limit as u64 > producer_max {
                return Err((
                    "server.body_limit_bytes",
                    format!(
                        "is larger than the Kafka producer's message.max.bytes ({producer_max}): \
                         such events could be accepted but never published"
                    ),
                ));
            }
            Ok(())
        }
        PublisherConfig::Nats(n) => {
            if n.url.trim().is_empty() {
                return invalid("publisher.url", "must name at least one server");
            }
            check_template("publisher.subject", &n.subject)?;
            if let Some(s) = &n.stream {
                if s.name.is_empty() || s.subjects.is_empty() {
                    return invalid("publisher.stream", "needs a name and at least one subject");
                }
                if !n.jetstream {
                    return invalid("publisher.stream", "needs `jetstream = true`");
                }
            }
            Ok(())
        }
        PublisherConfig::File(_) => Ok(()),
    }
}

/// Whether the subject filter `pattern` (with NATS wildcards `*` and `>`)
/// matches the concrete `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for want in pattern.split('.') {
        match (want, tokens.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (want, Some(token)) if want == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// Each subject hookbridge may publish to must be captured by the stream it
/// creates; otherwise those events would be refused ("no stream") forever.
fn check_stream_covers(patterns: &[String], subjects: &[String]) -> Result<(), Refusal> {
    match subjects
        .iter()
        .find(|s| !patterns.iter().any(|p| subject_matches(p, s)))
    {
        Some(missing) => Err((
            "publisher.stream.subjects",
            format!("must capture every subject publisher.subject can become; {missing:?} is not"),
        )),
        None => Ok(()),
    }
}

/// librdkafka options that would break what hookbridge promises, or that
/// librdkafka would only refuse later.
fn check_kafka_options(options: &BTreeMap<String, Secret>) -> Result<(), Refusal> {
    for (key, value) in options {
        let name = librdkafka_key(key.trim()).to_ascii_lowercase();
        let name = name.strip_prefix("topic.").unwrap_or(&name);
        let value = value.expose().trim();
        let reason = match name {
            "transactional.id" => Some(
                "would make the producer transactional; cluster mode sets its own \
                 (cluster.transactional_id)"
                    .to_string(),
            ),
            "delivery.report.only.error" => {
                Some("hookbridge needs every delivery report to know what was acknowledged".into())
            }
            "security.protocol"
                if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
                    .contains(&value.to_ascii_lowercase().as_str()) =>
            {
                Some(format!(
                    "{value:?} is not one of plaintext, ssl, sasl_plaintext, sasl_ssl"
                ))
            }
            "message.max.bytes"
                if !value
                    .parse::<u64>()
                    .is_ok_and(|n| (1000..=1_000_000_000).contains(&n)) =>
            {
                Some(format!("{value:?} is not a number from 1000 to 1000000000"))
            }
            _ => None,
        };
        if let Some(reason) = reason {
            return Err(("publisher.options", format!("`{name}`: {reason}")));
        }
    }
    Ok(())
}

/// The producer's `message.max.bytes` from the options, when set.
pub fn kafka_message_max_bytes(options: &BTreeMap<String, Secret>) -> Option<u64> {
    options.iter().find_map(|(key, value)| {
        librdkafka_key(key.trim())
            .eq_ignore_ascii_case("message.max.bytes")
            .then(|| value.expose().trim().parse().ok())
            .flatten()
    })
}
