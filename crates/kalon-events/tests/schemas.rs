//! The JSON Schemas in `schemas/` and the Rust types agree: what Rust
//! serializes validates, and what the schemas reject the Rust decoder
//! rejects too (and the other way round, on a corpus of wrong inputs).

use kalon_events::generate::Generator;
use kalon_events::{schema_text, Event, EventKind};
use serde_json::{json, Value};

fn validator(kind: EventKind) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(schema_text(kind)).expect("schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

fn schema_accepts(kind: EventKind, value: &Value) -> bool {
    validator(kind).is_valid(value)
}

fn rust_accepts(kind: EventKind, value: &Value) -> bool {
    Event::decode(kind, &serde_json::to_vec(value).unwrap()).is_ok()
}

#[test]
fn serialized_rust_events_validate_against_their_schema() {
    let mut generator = Generator::new(11);
    let validators = EventKind::ALL.map(validator);
    for _ in 0..3_000 {
        let event = generator.next_event();
        let value: Value = serde_json::from_slice(&event.to_json()).unwrap();
        let index = EventKind::ALL
            .iter()
            .position(|k| *k == event.kind())
            .unwrap();
        let errors: Vec<String> = validators[index]
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{value} fails its schema: {errors:?}");
    }
}

fn example(kind: EventKind) -> Value {
    let mut generator = Generator::new(5);
    serde_json::from_slice(&generator.event_of(kind).to_json()).unwrap()
}

/// Each mutation makes an event wrong; both the schema and Rust must refuse it.
fn wrong_inputs() -> Vec<(EventKind, &'static str, Value)> {
    let mut cases = Vec::new();
    let mut push = |kind: EventKind, what: &'static str, change: &dyn Fn(&mut Value)| {
        let mut value = example(kind);
        change(&mut value);
        cases.push((kind, what, value));
    };
    for kind in EventKind::ALL {
        push(kind, "missing event_id", &|v| {
            v.as_object_mut().unwrap().remove("event_id");
        });
        push(kind, "event_id not a uuid", &|v| {
            v["event_id"] = json!("not-a-uuid")
        });
        push(kind, "event_id as a number", &|v| v["event_id"] = json!(12));
        push(kind, "occurred_at not a date-time", &|v| {
            v["occurred_at"] = json!("yesterday")
        });
        push(kind, "unknown field", &|v| v["extra"] = json!(1));
        push(kind, "not an object", &|v| *v = json!([1, 2, 3]));
    }
    push(EventKind::Impression, "empty query", &|v| {
        v["query"] = json!("")
    });
    push(EventKind::Impression, "query too long", &|v| {
        v["query"] = json!("q".repeat(1025))
    });
    push(EventKind::Impression, "rank zero", &|v| {
        v["results"][0]["rank"] = json!(0)
    });
    push(EventKind::Impression, "score as text", &|v| {
        v["results"][0]["score"] = json!("high")
    });
    push(EventKind::Impression, "result without image", &|v| {
        v["results"][0].as_object_mut().unwrap().remove("image_id");
    });
    push(EventKind::Impression, "results not a list", &|v| {
        v["results"] = json!({})
    });
    push(EventKind::Impression, "missing variant", &|v| {
        v.as_object_mut().unwrap().remove("variant");
    });
    push(EventKind::Click, "negative rank", &|v| {
        v["rank"] = json!(-1)
    });
    push(EventKind::Click, "negative dwell", &|v| {
        v["dwell_ms"] = json!(-5)
    });
    push(EventKind::Click, "missing request_id", &|v| {
        v.as_object_mut().unwrap().remove("request_id");
    });
    push(EventKind::Rating, "six stars", &|v| v["stars"] = json!(6));
    push(EventKind::Rating, "zero stars", &|v| v["stars"] = json!(0));
    push(EventKind::Rating, "unknown aspect", &|v| {
        v["aspect"] = json!("vibes")
    });
    push(EventKind::Rating, "missing query", &|v| {
        v.as_object_mut().unwrap().remove("query");
    });
    cases
}

#[test]
fn schemas_and_rust_reject_the_same_wrong_inputs() {
    for (kind, what, value) in wrong_inputs() {
        assert!(
            !schema_accepts(kind, &value),
            "schema accepts {what}: {value}"
        );
        assert!(!rust_accepts(kind, &value), "rust accepts {what}: {value}");
    }
}

#[test]
fn optional_fields_may_be_absent_or_null_in_both() {
    for (kind, field) in [
        (EventKind::Impression, "user_id"),
        (EventKind::Click, "dwell_ms"),
        (EventKind::Rating, "request_id"),
    ] {
        let mut absent = example(kind);
        absent.as_object_mut().unwrap().remove(field);
        let mut null = example(kind);
        null[field] = Value::Null;
        for value in [absent, null] {
            assert!(schema_accepts(kind, &value), "schema refuses {value}");
            assert!(rust_accepts(kind, &value), "rust refuses {value}");
        }
    }
}

#[test]
fn each_schema_names_itself_and_its_topic() {
    for kind in EventKind::ALL {
        let schema: Value = serde_json::from_str(schema_text(kind)).unwrap();
        assert_eq!(schema["title"], json!(kind.topic()));
        let path = format!(
            "{}/../../schemas/{}.json",
            env!("CARGO_MANIFEST_DIR"),
            kind.topic()
        );
        assert!(std::path::Path::new(&path).is_file(), "{path} exists");
    }
}
