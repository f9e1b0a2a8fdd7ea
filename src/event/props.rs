//! Property tests: no body, however odd, panics the parser or any publisher's encoder, and
//! every accepted event matches the published JSON Schema. The inputs and the property are
//! in `cases.rs`, shared with the long run (`scripts/fuzz.sh`).

#![allow(dead_code)]

use crate::{config, event, publish};

include!("cases.rs");

/// Cases per property and run (about a second each in a debug build); the long run does
/// millions.
const CASES: u32 = 1000;

static SCHEMA: std::sync::LazyLock<jsonschema::Validator> = std::sync::LazyLock::new(|| {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../schema/task-event.v1.json")).unwrap();
    jsonschema::draft202012::new(&schema).unwrap()
});

static ORACLE: std::sync::LazyLock<Oracle> = std::sync::LazyLock::new(Oracle::new);

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_body_is_refused_or_encodable_everywhere(body in body()) {
        let verdict = ORACLE.check(&body);
        prop_assert!(verdict.is_ok(), "{}: {:?}", String::from_utf8_lossy(&body), verdict);
    }

    /// The typed parser and the tree-walking one it replaced agree on every body: the same
    /// event, or the same error naming the same field.
    #[test]
    fn typed_and_tree_parsers_agree_on_any_body(body in body()) {
        let typed = event::parse(&body, event::Source::Webhook, RECEIVED_AT);
        let tree = event::legacy::parse(&body, event::Source::Webhook, RECEIVED_AT);
        prop_assert_eq!(typed, tree, "{}", String::from_utf8_lossy(&body));
    }

    #[test]
    fn typed_and_tree_parsers_agree_on_callbacks(callback in callback(), pretty in any::<bool>()) {
        let body = callback.to_bytes(pretty);
        let typed = event::parse(&body, event::Source::Webhook, RECEIVED_AT);
        let tree = event::legacy::parse(&body, event::Source::Webhook, RECEIVED_AT);
        prop_assert_eq!(&typed, &tree, "{}", String::from_utf8_lossy(&body));
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) {
            let typed = event::from_value(value.clone(), event::Source::Poll, RECEIVED_AT);
            let tree = event::legacy::from_value(value, event::Source::Poll, RECEIVED_AT);
            prop_assert_eq!(typed, tree, "{}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn output_text_is_compacted_as_by_the_char_by_char_reference(
        json in any_json(),
        pretty in any::<bool>(),
    ) {
        let bytes = json.to_bytes(pretty);
        let text = String::from_utf8_lossy(&bytes);
        prop_assert_eq!(super::json::compact(&text), super::legacy::compact(&text));
    }

    #[test]
    fn accepted_callbacks_match_the_schema(callback in callback(), pretty in any::<bool>()) {
        let body = callback.to_bytes(pretty);
        let verdict = ORACLE.check(&body);
        prop_assert!(verdict.is_ok(), "{}: {:?}", String::from_utf8_lossy(&body), verdict);
        if let Ok(event) = event::parse(&body, event::Source::Webhook, RECEIVED_AT) {
            let value = serde_json::to_value(&event).unwrap();
            let errors: Vec<String> = SCHEMA.iter_errors(&value).map(|e| e.to_string()).collect();
            prop_assert!(errors.is_empty(), "{}\n{:?}", value, errors);
        }
    }
}

/// The generators reach both outcomes often, or the property says little.
#[test]
fn generators_reach_the_encoders() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let oracle = Oracle::new();
    let mut runner = TestRunner::deterministic();
    let strategy = body();
    let mut published = 0;
    for _ in 0..500 {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        if oracle.check(&body) == Ok(Verdict::Published) {
            published += 1;
        }
    }
    assert!(
        (50..450).contains(&published),
        "{published} of 500 published"
    );
}
