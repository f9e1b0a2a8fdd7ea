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

    /// Compacting keeps the value (numbers and strings verbatim), leaves no whitespace
    /// between tokens, and changes nothing the second time.
    #[test]
    fn compacted_output_text_is_the_same_value_on_one_line(
        json in any_json(),
        pretty in any::<bool>(),
    ) {
        let bytes = json.to_bytes(pretty);
        let text = String::from_utf8_lossy(&bytes);
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Ok(());
        };
        let compacted = super::json::compact(&text);
        prop_assert_eq!(serde_json::from_str::<serde_json::Value>(&compacted).ok(), Some(value));
        prop_assert_eq!(super::json::compact(&compacted), compacted.clone());
        prop_assert!(!compacted.contains(['\n', '\r']), "{}", compacted);
        prop_assert!(compacted.len() <= text.len());
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
