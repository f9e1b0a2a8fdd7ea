use super::config::{KafkaConfig, NatsConfig};
use super::*;
use crate::event::{parse, Source, TaskEvent};

fn event(model: &str) -> TaskEvent {
    let body = serde_json::json!({
        "taskId": "t1", "model": model, "state": "success", "updateTime": 1_735_599_754_000_i64
    });
    parse(body.to_string().as_bytes(), Source::Webhook, 1).unwrap()
}

fn outgoing(event: TaskEvent) -> Outgoing {
    let payload = serde_json::to_vec(&event).unwrap().into();
    Outgoing {
        seq: 1,
        meta: EventMeta::of(&event),
        payload,
    }
}

fn list(models: &[&str]) -> Vec<String> {
    models.iter().map(|m| m.to_string()).collect()
}

#[test]
fn templates_expand_to_safe_tokens() {
    let e = event("seedance-20");
    assert_eq!(
        render("kinovi.{model}.{state}", &EventMeta::of(&e), &[]),
        "kinovi.seedance-20.success"
    );
    let e = event("a.b c>*");
    assert_eq!(render("k.{model}", &EventMeta::of(&e), &[]), "k.a_b_c__");
    assert_eq!(render("fixed", &EventMeta::of(&e), &[]), "fixed");
    let long = event(&"x".repeat(300));
    assert_eq!(
        render("{model}", &EventMeta::of(&long), &[]),
        "x".repeat(MAX_MODEL_TOKEN)
    );
    assert_eq!(
        render("{model}", &EventMeta::of(&event("")), &[]),
        UNKNOWN_MODEL
    );
    assert_eq!(render("{model}", &EventMeta::of(&event("ü")), &[]), "_");
}

#[test]
fn the_allowlist_maps_every_other_model_to_unknown() {
    let models = list(&["seedance-20", "veo3"]);
    for (model, token) in [
        ("seedance-20", "seedance-20"),
        ("veo3", "veo3"),
        ("Seedance-20", UNKNOWN_MODEL),
        ("a.*.>", UNKNOWN_MODEL),
        ("seedance-20 ", UNKNOWN_MODEL),
        ("", UNKNOWN_MODEL),
    ] {
        assert_eq!(
            render("k.{model}", &EventMeta::of(&event(model)), &models),
            format!("k.{token}")
        );
    }
    let mut none = event("veo3");
    none.model = None;
    assert_eq!(model_token(None, &models), UNKNOWN_MODEL);
    assert_eq!(render("{model}", &EventMeta::of(&none), &[]), UNKNOWN_MODEL);
}

#[test]
fn hostile_models_never_reach_a_wildcard_or_another_topic() {
    let kafka = KafkaConfig {
        brokers: "x".into(),
        topic: "kinovi.{model}.{state}".into(),
        message_timeout_ms: 1,
        options: Default::default(),
        models: Vec::new(),
    };
    let nats = NatsConfig {
        url: "x".into(),
        subject: "kinovi.{model}.{state}".into(),
        jetstream: true,
        ack_timeout_ms: 1,
        token: None,
        stream: None,
        models: Vec::new(),
    };
    for model in [
        "a.*.>",
        ">",
        "*",
        "..",
        "a b",
        "\u{202e}x",
        "x\ny",
        &"y".repeat(500),
    ] {
        let o = outgoing(event(model));
        let record = kafka::encode(&o, &kafka).unwrap();
        let message = nats::encode(&o, &nats).unwrap();
        assert_eq!(record.topic.split('.').count(), 3, "{model:?}");
        assert_eq!(message.subject.split('.').count(), 3, "{model:?}");
        assert!(!message.subject.contains(['*', '>']), "{model:?}");
    }
    let o = outgoing(event("a.*.>"));
    assert_eq!(
        kafka::encode(&o, &kafka).unwrap().topic,
        "kinovi.a____.success"
    );
}

#[test]
fn topic_rules() {
    for good in ["a", "kinovi.task-events", "A_b-1.2", &"t".repeat(249)] {
        assert_eq!(check_topic(good), Ok(()), "{good}");
    }
    for bad in ["", ".", "..", "a b", "a/b", "ü", "a*", &"t".repeat(250)] {
        assert!(
            matches!(check_topic(bad), Err(EncodeError::Topic { .. })),
            "{bad}"
        );
    }
}

#[test]
fn subject_rules() {
    for good in ["a", "kinovi.tasks.success", "a.b-c_d.ü", "$JS.x"] {
        assert_eq!(check_subject(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        ".a",
        "a.",
        "a..b",
        "a b",
        "a\tb",
        "a\r\nb",
        "a.*",
        "a.>",
        "a*b",
        "x\u{85}",
        &"s".repeat(1025),
    ] {
        assert!(
            matches!(check_subject(bad), Err(EncodeError::Subject { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn config_check_names_the_key() {
    let kafka = |topic: &str, models: &[&str]| {
        PublisherConfig::Kafka(KafkaConfig {
            brokers: "x".into(),
            topic: topic.into(),
            message_timeout_ms: 1,
            options: Default::default(),
            models: list(models),
        })
    };
    assert_eq!(
        check_config(&kafka("kinovi.{model}.{state}", &["seedance-20"])),
        Ok(())
    );
    assert_eq!(check_config(&PublisherConfig::default()), Ok(()));
    let (key, reason) = check_config(&kafka("k", &["a.b"])).unwrap_err();
    assert_eq!(key, "publisher.models");
    assert!(reason.contains("\"a.b\""), "{reason}");
    assert_eq!(
        check_config(&kafka("k", &[""])).unwrap_err().0,
        "publisher.models"
    );
    assert_eq!(
        check_config(&kafka("a b.{model}", &["m"])).unwrap_err().0,
        "publisher.topic"
    );
    // `{model}` without an allowlist would let senders name topics.
    assert_eq!(
        check_config(&kafka("k.{model}", &[])).unwrap_err().0,
        "publisher.models"
    );
    let too_long = format!("{}.{{model}}", "t".repeat(200));
    let longest = "m".repeat(64);
    assert_eq!(
        check_config(&kafka(&too_long, &[&longest])).unwrap_err().0,
        "publisher.topic"
    );
    assert_eq!(check_config(&kafka(&too_long, &["m"])), Ok(()));
    let nats = PublisherConfig::Nats(NatsConfig {
        url: "x".into(),
        subject: "kinovi.>".into(),
        jetstream: true,
        ack_timeout_ms: 1,
        token: None,
        stream: None,
        models: Vec::new(),
    });
    assert_eq!(check_config(&nats).unwrap_err().0, "publisher.subject");
}

#[test]
fn cloud_event_time_is_rfc3339() {
    let ce = CloudEvent::of(&EventMeta::of(&event("m")));
    assert_eq!(ce.time, "2024-12-30T23:02:34.000Z");
    assert_eq!(ce.ty, "ai.kinovi.task.success");
    assert_eq!(ce.subject, "t1");
}

#[test]
fn rfc3339_is_total_and_matches_humantime() {
    use std::time::{Duration, UNIX_EPOCH};
    assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(rfc3339_millis(MAX_TIME_MS), "9999-12-31T23:59:59.999Z");
    // Clamped, never a panic or a five-digit year.
    assert_eq!(rfc3339_millis(MAX_TIME_MS + 1), "9999-12-31T23:59:59.999Z");
    assert_eq!(rfc3339_millis(i64::MAX), "9999-12-31T23:59:59.999Z");
    assert_eq!(rfc3339_millis(-1), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_millis(i64::MIN), "1970-01-01T00:00:00.000Z");
    // Every day boundary of several 400-year cycles, plus odd milliseconds.
    let mut ms = 0;
    while ms <= MAX_TIME_MS {
        for t in [ms, ms + 86_399_999, ms + 45_296_789] {
            let t = t.min(MAX_TIME_MS);
            let expected =
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(t as u64));
            assert_eq!(rfc3339_millis(t), expected.to_string(), "{t}");
        }
        ms += 86_400_000 * 29 + 1;
    }
}

#[test]
fn file_lines_are_single_lines() {
    let o = outgoing(event("m"));
    let line = file::encode(&o).unwrap();
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
    let mut broken = o.clone();
    broken.payload = bytes::Bytes::from_static(b"{\n}");
    assert_eq!(file::encode(&broken), Err(EncodeError::NotOneLine));
}

#[test]
fn nats_headers_refuse_line_breaks_without_panicking() {
    let config = NatsConfig {
        url: "x".into(),
        subject: "s".into(),
        jetstream: true,
        ack_timeout_ms: 1,
        token: None,
        stream: None,
        models: Vec::new(),
    };
    let mut o = outgoing(event("m"));
    o.meta.task_id = "a\r\nb".into();
    assert!(matches!(
        nats::encode(&o, &config),
        Err(EncodeError::Header {
            name: "ce-subject",
            ..
        })
    ));
    o.meta.task_id = "t".into();
    let message = nats::encode(&o, &config).unwrap();
    assert_eq!(
        message
            .headers
            .iter()
            .find(|(name, _)| *name == "Nats-Msg-Id")
            .map(|(_, v)| v.as_str()),
        Some(o.meta.event_id.as_str())
    );
}

#[test]
fn the_task_token_is_one_safe_subject_token_per_task() {
    let hostile = ["a.b", "*", ">", "t 1", "", "ü.>.*"];
    for id in hostile {
        let token = task_token(id);
        assert_eq!(token.len(), 32, "{id:?}");
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{id:?}");
        assert_eq!(token, task_token(id), "the same task, the same token");
    }
    assert_ne!(task_token("t-1"), task_token("t-2"));
    let mut e = event("m");
    e.task_id = "x.*.>".into();
    let subject = render("k.{state}.{task}", &EventMeta::of(&e), &[]);
    assert_eq!(
        subject,
        format!("k.{}.{}", e.state.as_str(), task_token("x.*.>"))
    );
    assert!(check_subject(&subject).is_ok());
}

#[cfg(feature = "nats")]
#[test]
fn nats_server_versions_compare_part_by_part() {
    use crate::publish::nats::Version;
    assert_eq!(Version::parse("2.15.3"), Some(Version(2, 15, 3)));
    assert_eq!(Version::parse("v2.11.0-RC.1"), Some(Version(2, 11, 0)));
    assert_eq!(Version::parse("2.9"), None);
    assert_eq!(Version::parse("nonsense"), None);
    assert!(Version(2, 9, 10) < Version(2, 11, 0));
    assert!(Version(2, 15, 3) > Version(2, 11, 0));
    assert_eq!(Version(2, 11, 0).to_string(), "2.11.0");
}

#[test]
fn subject_filters_match_as_nats_does() {
    assert!(subject_matches("a.>", "a.b.c"));
    assert!(!subject_matches("a.>", "a"));
    assert!(subject_matches("a.*.c", "a.b.c"));
    assert!(!subject_matches("a.*", "a.b.c"));
    assert!(subject_matches("a.b", "a.b"));
    assert!(!subject_matches("a.b", "a.bc"));
    assert!(!subject_matches("a.b.c", "a.b"));
}

#[test]
fn destinations_are_every_listed_model_and_unknown_in_every_state() {
    let all = destinations("t.{model}.{state}", &["m1".into()]);
    assert_eq!(all.len(), 10);
    assert!(all.contains(&"t.m1.success".to_string()));
    assert!(all.contains(&"t.unknown.fail".to_string()));
    assert_eq!(destinations("fixed", &[]), ["fixed"]);
}

#[test]
fn a_stored_traceparent_goes_out_under_both_header_names() {
    let kafka = KafkaConfig {
        brokers: "x".into(),
        topic: "kinovi.{state}".into(),
        message_timeout_ms: 1,
        options: Default::default(),
        models: Vec::new(),
    };
    let nats = NatsConfig {
        url: "x".into(),
        subject: "kinovi.{state}".into(),
        jetstream: true,
        ack_timeout_ms: 1,
        token: None,
        stream: None,
        models: Vec::new(),
    };
    let header = |headers: &[(&'static str, String)], name: &str| {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    };
    let mut o = outgoing(event("m"));
    // Telemetry off: no trace header at all.
    let record = kafka::encode(&o, &kafka).unwrap();
    let message = nats::encode(&o, &nats).unwrap();
    assert_eq!(header(&record.headers, "traceparent"), None);
    assert_eq!(header(&message.headers, "traceparent"), None);

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    o.meta.traceparent = Some(tp.into());
    let record = kafka::encode(&o, &kafka).unwrap();
    assert_eq!(header(&record.headers, "traceparent").as_deref(), Some(tp));
    assert_eq!(
        header(&record.headers, "ce_traceparent").as_deref(),
        Some(tp)
    );
    let message = nats::encode(&o, &nats).unwrap();
    assert_eq!(header(&message.headers, "traceparent").as_deref(), Some(tp));
    assert_eq!(
        header(&message.headers, "ce-traceparent").as_deref(),
        Some(tp)
    );
}
