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
    // Verbatim: members in the order sent, only the whitespace between tokens removed.
    assert_eq!(event.outputs.len(), 1);
    assert_eq!(
        event.outputs[0].as_json(),
        r#"{"url":"https://static.kinovi.ai/generated/video.mp4","width":1280,"height":720}"#
    );
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
            outputs: event.outputs.clone(),
            error: None,
            create_time: Some(1_735_599_634_000),
            complete_time: Some(1_735_599_754_000),
            update_time: Some(1_735_599_754_000),
            received_at: NOW,
            source: Source::Webhook,
            warnings: vec![],
            conflicts_with: None,
            traceparent: None,
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
        (json!(-0.9), Some(0)),
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

/// A code is kept as written: a big integer is never rewritten as a float.
#[test]
fn error_codes_are_kept_exactly_as_written() {
    for (code, expected) in [
        (
            "123456789012345678901234567890",
            "123456789012345678901234567890",
        ),
        ("-18446744073709551617", "-18446744073709551617"),
        ("1.50", "1.50"),
        ("2038", "2038"),
    ] {
        let body =
            format!(r#"{{"taskId":"t","state":"fail","error":{{"code":{code},"message":"m"}}}}"#);
        let event = parse(body.as_bytes(), Source::Webhook, NOW).unwrap();
        assert_eq!(event.error, error(Some(expected), Some("m")), "{code}");
    }
    for (code, found) in [
        ("[1]", "an array"),
        ("{}", "an object"),
        ("false", "a boolean"),
    ] {
        let body = format!(r#"{{"taskId":"t","state":"fail","error":{{"code":{code}}}}}"#);
        let err = parse(body.as_bytes(), Source::Webhook, NOW).unwrap_err();
        assert!(err.to_string().contains(found), "{code}: {err}");
    }
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
    assert_eq!(Value::Object((*event.outputs[0]).clone()), item);
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
        "\u{2800}",
        "a\u{3164}b",
        "\u{115F}\u{1160}",
        "x\u{FE0F}",
        "nb\u{a0}sp",
        "ideo\u{3000}graphic",
        "zw\u{200b}sp",
    ] {
        assert_eq!(
            message(bare(json!({ "taskId": id }))),
            "field `taskId` must not contain control, format, separator or blank characters",
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
            "field `createTime` must be between 0 and 253402300799999 milliseconds since the \
             epoch (1970-01-01 to 9999-12-31)",
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

const SCHEMA: &str = include_str!("../../schema/task-event.v1.json");

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
    let mut properties: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
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
        ("taskId", json!("a\u{202e}b")),
        ("taskId", json!("a\u{2028}b")),
        ("createTime", json!(-1)),
        ("updateTime", json!(MAX_TIME_MS + 1)),
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

// ---- bounds ----------------------------------------------------------------------------

fn parse_err(body: &str) -> ParseError {
    parse(body.as_bytes(), Source::Webhook, NOW).expect_err("should be rejected")
}

#[test]
fn times_must_fit_years_1970_to_9999() {
    for field in ["createTime", "completeTime", "updateTime"] {
        for good in [
            json!(0),
            json!(MAX_TIME_MS),
            json!("253402300799999"),
            json!(-0.5),
        ] {
            ok(bare(json!({ field: good })));
        }
        for bad in [
            json!(MAX_TIME_MS + 1),
            json!(-1),
            json!(i64::MAX),
            json!(i64::MIN),
            json!("-1"),
            json!(2.6e14),
        ] {
            let e = err(bare(json!({ field: bad.clone() })));
            assert!(
                matches!(&e, ParseError::InvalidValue { field: f, .. } if f == field),
                "{field} = {bad}: {e}"
            );
        }
        let e = err(envelope(json!({"taskId": "t", "state": "fail", field: -5})));
        assert_eq!(e.field(), Some(format!("data.{field}").as_str()));
    }
}

#[test]
fn nesting_is_capped_at_64_levels() {
    fn nested(levels: usize) -> String {
        // The body is level 1, `output` level 2, each item one more.
        let inner = "[".repeat(levels - 1) + &"]".repeat(levels - 1);
        format!(r#"{{"taskId":"t","state":"success","output":{inner}}}"#)
    }
    // 64 levels parse (and fail only on shape: the items are arrays).
    let at_cap = parse_err(&nested(MAX_DEPTH));
    assert!(matches!(at_cap, ParseError::WrongType { .. }), "{at_cap}");
    let e = parse_err(&nested(MAX_DEPTH + 1));
    assert!(matches!(e, ParseError::TooDeep { .. }), "{e}");
    assert!(e.field().unwrap().starts_with("output[0][0]"), "{e}");
    // 200 levels: refused by the same rule, not by serde_json's own limit.
    let e = parse_err(&nested(200));
    assert!(matches!(e, ParseError::TooDeep { .. }), "{e}");
    assert!(
        e.to_string().contains("nested deeper than 64 levels"),
        "{e}"
    );
    assert!(e.field().unwrap().len() <= 128 + "…".len(), "{e}");

    // Deep under an unknown member counts too: nothing deeper is ever stored.
    let deep = "{\"a\":".repeat(100) + "1" + &"}".repeat(100);
    let e = parse_err(&format!(r#"{{"taskId":"t","state":"success","x":{deep}}}"#));
    assert!(e.field().unwrap().starts_with("x.a.a"), "{e}");

    // The poller's entry point applies the same cap.
    let value: Value = serde_json::from_str(&nested(100)).unwrap();
    let e = from_value(value, Source::Poll, NOW).unwrap_err();
    assert_eq!(
        e,
        ParseError::TooDeep {
            field: "output".into()
        }
    );
}

#[test]
fn repeated_keys_are_refused_anywhere() {
    let cases = [
        (r#"{"taskId":"a","taskId":"b","state":"success"}"#, "taskId"),
        (
            r#"{"code":200,"data":{"taskId":"t","state":"fail","state":"success"}}"#,
            "data.state",
        ),
        (
            r#"{"data":{"taskId":"t","state":"fail"},"data":{}}"#,
            "data",
        ),
        (
            r#"{"taskId":"t","state":"success","output":[{"url":"a"},{"url":"b","url":"c"}]}"#,
            "output[1].url",
        ),
        (
            r#"{"taskId":"t","state":"fail","error":{"code":"1","message":"m","code":2}}"#,
            "error.code",
        ),
        // Keys compare after unescaping, as every JSON reader sees them.
        (r#"{"taskId":"t","state":"fail","x":1,"\u0078":2}"#, "x"),
    ];
    for (body, field) in cases {
        let e = parse_err(body);
        assert_eq!(
            e,
            ParseError::DuplicateKey {
                field: field.into()
            },
            "{body}"
        );
        assert_eq!(
            e.to_string(),
            format!("field `{field}` appears more than once")
        );
    }
}

#[test]
fn repeated_keys_are_refused_in_objects_of_many_members() {
    // Past a few members the keys are looked up in a set: a repeat is found either side of
    // that switch, and the keys of nested objects do not count against their parent's.
    for members in [3, 16, 17, 40, 5000] {
        let keys: Vec<String> = (0..members)
            .map(|i| format!(r#""k{i}":{{"k{i}":1}}"#))
            .collect();
        let unique = format!(
            r#"{{"taskId":"t","state":"success","x":{{{}}}}}"#,
            keys.join(",")
        );
        assert_eq!(
            parse(unique.as_bytes(), Source::Webhook, NOW)
                .unwrap()
                .task_id,
            "t"
        );
        for repeat in [0, members / 2, members - 1] {
            let body = format!(
                r#"{{"taskId":"t","state":"success","x":{{{},"k{repeat}":2}}}}"#,
                keys.join(",")
            );
            assert_eq!(
                parse_err(&body),
                ParseError::DuplicateKey {
                    field: format!("x.k{repeat}")
                },
                "{members} members"
            );
        }
    }
}

#[test]
fn bounds_of_the_whole_body_come_before_the_record_s_checks() {
    // A wrong type early in the record does not hide a repeated key or a depth fault later
    // in the body: nothing of a body with one is read.
    let deep = "[".repeat(70) + &"]".repeat(70);
    let cases = [
        (
            r#"{"taskId":1,"state":"success","x":{"a":1,"a":2}}"#.to_string(),
            ParseError::DuplicateKey {
                field: "x.a".into(),
            },
        ),
        (
            format!(r#"{{"data":{{"taskId":null,"output":7}},"extra":{deep}}}"#),
            ParseError::TooDeep {
                // The path is cut at 128 bytes.
                field: format!("extra{}", "[0]".repeat(41)) + "…",
            },
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(parse_err(&body), expected, "{body}");
    }
}

#[test]
fn invisible_characters_are_refused_in_task_ids() {
    for id in [
        "task\u{202e}1",  // right-to-left override (Cf)
        "task\u{200b}1",  // zero width space (Cf)
        "\u{feff}task",   // byte order mark (Cf)
        "task\u{2028}1",  // line separator (Zl)
        "task\u{2029}1",  // paragraph separator (Zp)
        "task\u{e0001}1", // language tag (Cf)
    ] {
        let e = err(bare(json!({ "taskId": id })));
        assert_eq!(e.field(), Some("taskId"), "{id:?}");
        assert!(task_id_problem(id).is_some(), "{id:?}");
    }
    for id in ["täsk_ñ", "タスク", "task 1", "a.b*c>"] {
        assert_eq!(ok(bare(json!({ "taskId": id }))).task_id, id);
    }
}

#[test]
fn outputs_keep_numbers_as_written() {
    let body = r#"{"code":200,"data":{"taskId":"t","state":"success","output":[
        {"url": "u",
         "seed": 123456789012345678901234567890, "ratio": 0.1000000000000000055511151231257827,
         "exp": 1E+2, "text": "a \"quoted\"\n line", "n": -0}
    ]}}"#;
    let event = parse(body.as_bytes(), Source::Webhook, NOW).unwrap();
    assert_eq!(
        event.outputs[0].as_json(),
        r#"{"url":"u","seed":123456789012345678901234567890,"ratio":0.1000000000000000055511151231257827,"exp":1E+2,"text":"a \"quoted\"\n line","n":-0}"#
    );
    // Stored and published as written, and read back the same.
    let stored = serde_json::to_string(&event).unwrap();
    assert!(
        stored.contains(r#""seed":123456789012345678901234567890"#),
        "{stored}"
    );
    assert!(!stored.contains('\n'));
    let back: TaskEvent = serde_json::from_str(&stored).unwrap();
    assert_eq!(back, event);
    // The map view still reads fields.
    assert_eq!(event.outputs[0]["url"], "u");
}

#[test]
fn strict_reading_keeps_the_invalid_json_answer() {
    for body in ["", "{", "{} x", "[1,]", r#"{"a":1e999}"#, "\u{feff}{}"] {
        assert!(
            matches!(parse_err(body), ParseError::InvalidJson(_)),
            "{body:?}"
        );
    }
}

#[test]
fn verbatim_outputs_come_from_the_record_itself() {
    let envelope = r#"{"output":[{"top":1}],"data":{"taskId":"t","state":"success",
        "output":[{"inner": 1}]}}"#;
    let event = parse(envelope.as_bytes(), Source::Webhook, NOW).unwrap();
    assert_eq!(event.outputs.len(), 1);
    assert_eq!(event.outputs[0].as_json(), r#"{"inner":1}"#);
    let bare = r#"{"taskId":"t","state":"success","data":{"output":[{"inner":1}]},
        "output":[{"top": 1}]}"#;
    let event = parse(bare.as_bytes(), Source::Webhook, NOW).unwrap();
    assert_eq!(event.outputs[0].as_json(), r#"{"top":1}"#);
    // Both entry points agree on ordinary values.
    let body = DOC_SUCCESS.as_bytes();
    let from_bytes = parse(body, Source::Webhook, NOW).unwrap();
    let value: Value = serde_json::from_slice(body).unwrap();
    let from_value = from_value(value, Source::Webhook, NOW).unwrap();
    assert_eq!(*from_bytes.outputs[0], *from_value.outputs[0]);
}
