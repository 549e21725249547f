//! Every topic's payload type against its schema in `schemas/`: a payload
//! serializes to JSON the schema accepts and decodes back equal; a payload
//! missing a required field, with a wrong type or an unknown field is
//! refused by the schema and by the Rust decoder alike. The enricher's and
//! the search service's payloads are also pinned to the bytes those
//! services wrote before they were typed.

use std::collections::BTreeMap;
use std::fmt::Debug;

use chrono::{DateTime, TimeZone, Utc};
use kalon_events::generate::Generator;
use kalon_events::*;
use serde_json::{json, Value};
use uuid::Uuid;

fn validator(topic: &str) -> jsonschema::Validator {
    let text = topic_schema(topic).unwrap_or_else(|| panic!("{topic} has no schema"));
    let schema: Value = serde_json::from_str(text).expect("schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

fn schema_errors(topic: &str, value: &Value) -> Vec<String> {
    validator(topic)
        .iter_errors(value)
        .map(|e| e.to_string())
        .collect()
}

fn rust_accepts<P: TopicPayload>(value: &Value) -> bool {
    P::decode(&serde_json::to_vec(value).unwrap()).is_ok()
}

/// payload -> JSON -> valid against the schema -> decoded -> equal.
fn round_trip<P: TopicPayload + PartialEq + Debug>(payload: &P) -> Value {
    payload.validate().expect("the example is valid");
    let bytes = payload.to_json();
    let value: Value = serde_json::from_slice(&bytes).unwrap();
    let errors = schema_errors(P::TOPIC, &value);
    assert!(errors.is_empty(), "{value} fails {}: {errors:?}", P::TOPIC);
    let back = P::decode(&bytes).unwrap_or_else(|e| panic!("{value} does not decode: {e}"));
    assert_eq!(&back, payload);
    value
}

/// A named change of an example payload.
type Change<'a> = (&'a str, &'a dyn Fn(&mut Value));

/// Each change makes `example` wrong; the schema and Rust must both refuse.
fn refused<P: TopicPayload>(example: &Value, cases: &[Change<'_>]) {
    let object = example.as_object().unwrap();
    let mut all: Vec<(String, Value)> = Vec::new();
    for field in schema_required(P::TOPIC) {
        let mut value = example.clone();
        value.as_object_mut().unwrap().remove(&field);
        all.push((format!("missing {field}"), value));
    }
    for (field, current) in object {
        // a value of the wrong JSON type for every field
        let wrong = match current {
            Value::String(_) => json!(12),
            Value::Number(_) => json!("12"),
            Value::Bool(_) => json!("true"),
            _ => json!(true),
        };
        let mut value = example.clone();
        value[field] = wrong;
        all.push((format!("{field} of a wrong type"), value));
    }
    let mut value = example.clone();
    value["unexpected"] = json!(1);
    all.push(("unknown field".into(), value));
    all.push(("not an object".into(), json!([example.clone()])));
    for (what, change) in cases {
        let mut value = example.clone();
        change(&mut value);
        all.push((what.to_string(), value));
    }
    for (what, value) in all {
        assert!(
            !schema_errors(P::TOPIC, &value).is_empty(),
            "{} schema accepts {what}: {value}",
            P::TOPIC
        );
        assert!(
            !rust_accepts::<P>(&value),
            "{} rust accepts {what}: {value}",
            P::TOPIC
        );
    }
}

/// Both accept each of these changes of `example`.
fn accepted<P: TopicPayload>(example: &Value, cases: &[Change<'_>]) {
    for (what, change) in cases {
        let mut value = example.clone();
        change(&mut value);
        let errors = schema_errors(P::TOPIC, &value);
        assert!(
            errors.is_empty(),
            "{} schema refuses {what}: {errors:?}",
            P::TOPIC
        );
        let decoded = P::decode(&serde_json::to_vec(&value).unwrap());
        assert!(
            decoded.is_ok(),
            "{} rust refuses {what}: {:?}",
            P::TOPIC,
            decoded.err()
        );
    }
}

fn schema_required(topic: &str) -> Vec<String> {
    let schema: Value = serde_json::from_str(topic_schema(topic).unwrap()).unwrap();
    schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

fn remove(field: &'static str) -> impl Fn(&mut Value) {
    move |v: &mut Value| {
        v.as_object_mut().unwrap().remove(field);
    }
}

fn set(field: &'static str, to: Value) -> impl Fn(&mut Value) {
    move |v: &mut Value| v[field] = to.clone()
}

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap() + chrono::Duration::microseconds(123_456)
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

// --- search.impression.v1, search.click.v1, search.rating.v1 -------------

fn search_example<P: TopicPayload + PartialEq + Debug>(
    pick: impl Fn(Event) -> Option<P>,
    kind: EventKind,
) -> P {
    let mut generator = Generator::new(3);
    loop {
        if let Some(p) = pick(generator.event_of(kind)) {
            return p;
        }
    }
}

#[test]
fn search_impression_round_trips_and_refuses_wrong_payloads() {
    let impression = search_example(
        |e| match e {
            Event::Impression(i) => Some(i),
            _ => None,
        },
        EventKind::Impression,
    );
    let value = round_trip(&impression);
    refused::<Impression>(
        &value,
        &[
            ("rank zero", &|v| v["results"][0]["rank"] = json!(0)),
            ("model_rank zero", &|v| {
                v["results"][0]["model_rank"] = json!(0)
            }),
            ("model_rank as text", &|v| {
                v["results"][0]["model_rank"] = json!("2")
            }),
        ],
    );
    accepted::<Impression>(
        &value,
        &[
            ("model_rank null", &|v| {
                v["results"][0]["model_rank"] = Value::Null
            }),
            ("model_rank 2", &|v| {
                v["results"][0]["model_rank"] = json!(2)
            }),
        ],
    );
    // an explored impression: one adjacent pair swapped, both model ranks kept
    let mut explored = impression.clone();
    let ranked = explored
        .results
        .iter()
        .map(|r| (r.image_id.clone(), r.score))
        .collect();
    explored.results = kalon_events::explore::shown_items(ranked, Some(1));
    assert_eq!(explored.results[0].model_rank, Some(2));
    assert_eq!(explored.results[1].model_rank, Some(1));
    let value = round_trip(&explored);
    assert_eq!(value["results"][0]["model_rank"], json!(2));
    assert!(value["results"][2].get("model_rank").is_none());
}

#[test]
fn search_click_round_trips_and_refuses_wrong_payloads() {
    let click = search_example(
        |e| match e {
            Event::Click(c) => Some(c),
            _ => None,
        },
        EventKind::Click,
    );
    let value = round_trip(&click);
    refused::<Click>(&value, &[("negative dwell", &set("dwell_ms", json!(-5)))]);
}

#[test]
fn search_rating_round_trips_and_refuses_wrong_payloads() {
    for aspect in Aspect::ALL {
        let mut rating = search_example(
            |e| match e {
                Event::Rating(r) => Some(r),
                _ => None,
            },
            EventKind::Rating,
        );
        rating.aspect = aspect;
        let value = round_trip(&rating);
        assert_eq!(value["aspect"], aspect.as_str());
        refused::<Rating>(
            &value,
            &[
                ("six stars", &set("stars", json!(6))),
                // the public contract: HPIR's name is not a rating aspect
                ("aspect accuracy", &set("aspect", json!("accuracy"))),
            ],
        );
    }
}

// --- kalon.deadletter.v1 --------------------------------------------------

fn dead_letter() -> DeadLetterHeaders {
    DeadLetterHeaders::new(
        DeadLetterReason::SchemaViolation,
        "event does not match its schema: missing field `event_id`",
        "t-1234.search.click.v1",
        3,
        1_234_567,
    )
}

#[test]
fn dead_letter_headers_round_trip_and_refuse_wrong_payloads() {
    for reason in DeadLetterReason::ALL {
        let mut headers = dead_letter();
        headers.reason = reason;
        let value = round_trip(&headers);
        assert_eq!(value[dead_letter_headers::REASON], reason.as_str());
    }
    let value = round_trip(&dead_letter());
    assert_eq!(
        value,
        json!({
            "kalon-dlq-reason": "schema_violation",
            "kalon-dlq-detail": "event does not match its schema: missing field `event_id`",
            "kalon-source-topic": "t-1234.search.click.v1",
            "kalon-source-partition": "3",
            "kalon-source-offset": "1234567",
        })
    );
    refused::<DeadLetterHeaders>(
        &value,
        &[
            ("unknown reason", &set("kalon-dlq-reason", json!("vibes"))),
            (
                "partition as a number",
                &set("kalon-source-partition", json!(3)),
            ),
            (
                "negative partition",
                &set("kalon-source-partition", json!("-1")),
            ),
            (
                "partition with a leading zero",
                &set("kalon-source-partition", json!("03")),
            ),
            (
                "partition of ten digits",
                &set("kalon-source-partition", json!("1500000000")),
            ),
            (
                "offset not a number",
                &set("kalon-source-offset", json!("12a")),
            ),
            ("empty offset", &set("kalon-source-offset", json!(""))),
            (
                "offset of nineteen digits",
                &set("kalon-source-offset", json!("1000000000000000000")),
            ),
            ("empty topic", &set("kalon-source-topic", json!(""))),
            (
                "topic with a space",
                &set("kalon-source-topic", json!("a b")),
            ),
            (
                "detail too long",
                &set("kalon-dlq-detail", json!("d".repeat(1001))),
            ),
        ],
    );
    accepted::<DeadLetterHeaders>(
        &value,
        &[
            ("offset zero", &set("kalon-source-offset", json!("0"))),
            ("empty detail", &set("kalon-dlq-detail", json!(""))),
            (
                "largest partition",
                &set("kalon-source-partition", json!("999999999")),
            ),
        ],
    );
}

#[test]
fn dead_letter_headers_read_from_message_headers() {
    let headers = dead_letter();
    let pairs = headers.to_headers();
    let names: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
    assert_eq!(names, dead_letter_headers::ALL);
    let mut message: Vec<(&str, Option<&[u8]>)> = pairs
        .iter()
        .map(|(k, v)| (*k, Some(v.as_bytes())))
        .collect();
    // trace context travels beside the contract
    message.insert(0, ("traceparent", Some(b"00-abc-def-01".as_slice())));
    assert_eq!(
        DeadLetterHeaders::from_headers(message.clone()).unwrap(),
        headers
    );
    let without_offset: Vec<_> = message
        .iter()
        .copied()
        .filter(|(k, _)| *k != dead_letter_headers::SOURCE_OFFSET)
        .collect();
    assert!(DeadLetterHeaders::from_headers(without_offset).is_err());
    let mut twice = message.clone();
    twice.push((dead_letter_headers::REASON, Some(b"bad_json".as_slice())));
    assert!(DeadLetterHeaders::from_headers(twice).is_err());
    let mut no_value = message.clone();
    no_value[1].1 = None;
    assert!(DeadLetterHeaders::from_headers(no_value).is_err());
    let mut not_utf8 = message;
    not_utf8[2].1 = Some(b"\xff".as_slice());
    assert!(DeadLetterHeaders::from_headers(not_utf8).is_err());
}

#[test]
fn dead_letter_detail_is_cut_to_its_limit() {
    let long = "é".repeat(MAX_DETAIL_CHARS + 10);
    let headers = DeadLetterHeaders::new(DeadLetterReason::BadJson, &long, "t", 0, 0);
    assert_eq!(headers.detail.chars().count(), MAX_DETAIL_CHARS);
    round_trip(&headers);
}

#[test]
fn decode_errors_name_their_dead_letter_reason() {
    let error = Event::decode(EventKind::Click, b"{").unwrap_err();
    assert_eq!(error.class(), DeadLetterReason::BadJson);
    assert_eq!(error.reason(), "bad_json");
    for reason in DeadLetterReason::ALL {
        assert_eq!(reason.as_str().parse::<DeadLetterReason>(), Ok(reason));
        assert_eq!(serde_json::to_value(reason).unwrap(), reason.as_str());
    }
}

// --- query.rephrased.v1 ---------------------------------------------------

fn rephrased() -> QueryRephrased {
    QueryRephrased {
        event_id: id(1),
        model: "gpt-4o-mini".into(),
        occurred_at: at(),
        query: "red cat".into(),
        rephrasings: BTreeMap::from([
            (
                "detail".to_owned(),
                "a red cat sitting on a sofa".to_owned(),
            ),
            ("reorg".to_owned(), "cat, red".to_owned()),
        ]),
    }
}

#[test]
fn query_rephrased_round_trips_and_refuses_wrong_payloads() {
    let value = round_trip(&rephrased());
    refused::<QueryRephrased>(
        &value,
        &[
            ("empty query", &set("query", json!(""))),
            ("event_id not a uuid", &set("event_id", json!("not-a-uuid"))),
            (
                "occurred_at not a date-time",
                &set("occurred_at", json!("yesterday")),
            ),
            ("empty rephrasing", &|v| {
                v["rephrasings"]["detail"] = json!("")
            }),
            ("rephrasing as a number", &|v| {
                v["rephrasings"]["detail"] = json!(3)
            }),
            ("rephrasing too long", &|v| {
                v["rephrasings"]["detail"] = json!("r".repeat(501))
            }),
            ("rephrasings a list", &set("rephrasings", json!(["a"]))),
        ],
    );
    accepted::<QueryRephrased>(
        &value,
        &[
            // every variant dead-lettered: no rephrasing, no model
            ("nothing answered", &|v| {
                v["rephrasings"] = json!({});
                v["model"] = json!("");
            }),
            (
                "nanoseconds",
                &set("occurred_at", json!("2026-11-30T12:00:00.123456789Z")),
            ),
        ],
    );
}

#[test]
fn query_rephrased_is_the_json_the_enricher_wrote() {
    let event = rephrased();
    // what services/enricher built before the type existed
    let before = json!({
        "event_id": event.event_id,
        "occurred_at": event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "query": event.query,
        "model": event.model,
        "rephrasings": event.rephrasings,
    });
    assert_eq!(event.to_json(), before.to_string().into_bytes());
    let now = QueryRephrased::now("red cat", String::new(), BTreeMap::new());
    assert_eq!(QueryRephrased::decode(&now.to_json()).unwrap(), now);
}

// --- lmm.judgment.v1 ------------------------------------------------------

fn rows() -> (Vec<String>, Vec<String>) {
    (
        vec!["img-000001".into(), "img-000002".into()],
        vec!["img-000003".into()],
    )
}

fn compared() -> LmmJudgment {
    let (a, b) = rows();
    LmmJudgment {
        occurred_at: at(),
        ..LmmJudgment::now(
            id(2),
            "a photo of a cat",
            Aspect::Relevance,
            (&a, &b),
            JudgmentOutcome::Compared(JudgmentVerdict::Win),
            "judge-1".into(),
        )
    }
}

fn scored() -> LmmJudgment {
    let (a, b) = rows();
    LmmJudgment {
        occurred_at: at(),
        ..LmmJudgment::now(
            id(3),
            "a photo of a cat",
            Aspect::Aesthetic,
            (&a, &b),
            JudgmentOutcome::Scored(4.5, 2.0),
            "judge-1".into(),
        )
    }
}

#[test]
fn lmm_judgment_round_trips_and_refuses_wrong_payloads() {
    for verdict in [
        JudgmentVerdict::Win,
        JudgmentVerdict::Loss,
        JudgmentVerdict::Similar,
    ] {
        let judgment = LmmJudgment {
            verdict: Some(verdict),
            ..compared()
        };
        let value = round_trip(&judgment);
        assert_eq!(value["verdict"], verdict.as_str());
        assert_eq!(value["score_a"], Value::Null, "written as null");
    }
    let compare = round_trip(&compared());
    let score = round_trip(&scored());
    assert_eq!(score["verdict"], Value::Null, "written as null");
    refused::<LmmJudgment>(
        &compare,
        &[
            ("unknown aspect", &set("aspect", json!("vibes"))),
            ("unknown kind", &set("kind", json!("rank"))),
            ("unknown verdict", &set("verdict", json!("draw"))),
            ("compare without a verdict", &set("verdict", Value::Null)),
            ("compare without the verdict field", &remove("verdict")),
            ("compare with a score", &set("score_a", json!(3.0))),
            ("empty image id", &|v| v["row_a"][0] = json!("")),
            ("row not a list", &set("row_b", json!("img-1"))),
            ("empty model", &set("model", json!(""))),
            ("judgment_id not a uuid", &set("judgment_id", json!("x"))),
        ],
    );
    refused::<LmmJudgment>(
        &score,
        &[
            ("score above 5", &set("score_a", json!(5.5))),
            ("score below 1", &set("score_b", json!(0.5))),
            ("score as text", &set("score_a", json!("4"))),
            ("score without score_b", &remove("score_b")),
            ("score with a verdict", &set("verdict", json!("win"))),
        ],
    );
    accepted::<LmmJudgment>(
        &compare,
        &[
            ("scores absent", &|v| {
                remove("score_a")(v);
                remove("score_b")(v);
            }),
            ("empty rows", &|v| {
                v["row_a"] = json!([]);
                v["row_b"] = json!([]);
            }),
        ],
    );
    accepted::<LmmJudgment>(&score, &[("verdict absent", &remove("verdict"))]);
}

#[test]
fn lmm_judgments_read_hpir_accuracy_as_relevance() {
    let mut value: Value = serde_json::from_slice(&compared().to_json()).unwrap();
    assert_eq!(value["aspect"], "relevance");
    value["aspect"] = json!("accuracy");
    assert!(schema_errors(LmmJudgment::TOPIC, &value).is_empty());
    let judgment = LmmJudgment::decode(&serde_json::to_vec(&value).unwrap()).unwrap();
    assert_eq!(judgment, compared());
    // only judgments: the aspect itself (ratings, the feedback API) is exact
    assert!(serde_json::from_value::<Aspect>(json!("accuracy")).is_err());
    for aspect in Aspect::ALL {
        assert_eq!(serde_json::to_value(aspect).unwrap(), aspect.as_str());
        assert_eq!(
            serde_json::from_value::<Aspect>(json!(aspect.as_str())).unwrap(),
            aspect
        );
    }
}

#[test]
fn lmm_judgment_is_the_json_the_enricher_wrote() {
    for event in [compared(), scored()] {
        // what services/enricher built before the type existed (with the
        // aspect's one name)
        let before = json!({
            "judgment_id": event.judgment_id,
            "occurred_at": event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "query": event.query,
            "aspect": event.aspect.as_str(),
            "kind": event.kind.as_str(),
            "row_a": event.row_a,
            "row_b": event.row_b,
            "verdict": event.verdict.map(|v| v.as_str()),
            "score_a": event.score_a,
            "score_b": event.score_b,
            "model": event.model,
        });
        assert_eq!(event.to_json(), before.to_string().into_bytes());
    }
}

// --- enrich.deadletter.v1 -------------------------------------------------

fn enrich_dead_letter() -> EnrichDeadLetter {
    EnrichDeadLetter {
        errors: vec!["no JSON object".into(), "a refusal: \"sorry\"".into()],
        query: "neon dog".into(),
        raw_responses: vec!["sorry, I can't".into(), "sorry".into()],
        task: EnrichTask::Rephrase,
        variant: "detail".into(),
    }
}

#[test]
fn enrich_dead_letter_round_trips_and_refuses_wrong_payloads() {
    let value = round_trip(&enrich_dead_letter());
    refused::<EnrichDeadLetter>(
        &value,
        &[
            ("unknown task", &set("task", json!("judge"))),
            ("no errors", &set("errors", json!([]))),
            ("no raw responses", &set("raw_responses", json!([]))),
            ("an error as a number", &|v| v["errors"][0] = json!(1)),
            ("empty variant", &set("variant", json!(""))),
            ("empty query", &set("query", json!(""))),
        ],
    );
}

#[test]
fn enrich_dead_letter_is_the_json_and_headers_the_enricher_wrote() {
    let dead = enrich_dead_letter();
    let before = json!({
        "task": "rephrase",
        "query": dead.query,
        "variant": dead.variant,
        "errors": dead.errors,
        "raw_responses": dead.raw_responses,
    });
    assert_eq!(dead.to_json(), before.to_string().into_bytes());
    assert_eq!(
        dead.headers(),
        [
            ("kalon-dlq-reason", "malformed_llm_output".to_owned()),
            ("kalon-dlq-detail", "a refusal: \"sorry\"".to_owned()),
        ]
    );
}

// --- model.deployment.v1 --------------------------------------------------

fn deployment() -> DeploymentChanged {
    DeploymentChanged {
        event_id: id(4),
        occurred_at: at() + chrono::Duration::nanoseconds(789),
        model_version: "aligned-v2".into(),
        variant: Some("canary".into()),
        weight: 0.1,
    }
}

#[test]
fn model_deployment_round_trips_and_refuses_wrong_payloads() {
    let value = round_trip(&deployment());
    let withdrawn = DeploymentChanged {
        variant: None,
        weight: 0.0,
        ..deployment()
    };
    assert_eq!(
        round_trip(&withdrawn)["variant"],
        Value::Null,
        "written as null"
    );
    refused::<DeploymentChanged>(
        &value,
        &[
            ("negative weight", &set("weight", json!(-1.0))),
            ("weight over a million", &set("weight", json!(1_000_001))),
            ("version with a slash", &set("model_version", json!("a/b"))),
            (
                "version of 65 characters",
                &set("model_version", json!("v".repeat(65))),
            ),
            ("empty variant", &set("variant", json!(""))),
            (
                "occurred_at not a date-time",
                &set("occurred_at", json!("2026-11-30")),
            ),
        ],
    );
    accepted::<DeploymentChanged>(
        &value,
        &[
            ("variant absent", &remove("variant")),
            ("integer weight", &set("weight", json!(3))),
        ],
    );
}

// --- canary.decision.v1 ---------------------------------------------------

fn canary_decision() -> CanaryDecision {
    CanaryDecision {
        event_id: id(9),
        occurred_at: at(),
        canary_id: 3,
        candidate: "m-20261209-101500-abcdef12".into(),
        stable: Some("pretrained".into()),
        action: CanaryAction::Advance,
        step_from: 0,
        step_to: 1,
        share: 0.05,
        automatic: true,
        actor: "kalon-canary".into(),
        reason: "non-inferior on ctr".into(),
        evidence: vec![MetricEvidence {
            metric: "ctr".into(),
            kind: EvidenceKind::Ab,
            decision: "non_inferior".into(),
            estimate: Some(0.01),
            lower: Some(-0.02),
            upper: Some(0.04),
            statistic: Some(0.3),
            threshold: 3.0,
            p_value: 0.7,
            alpha: 0.05,
            margin: 0.05,
            n_stable: 9000,
            n_candidate: 500,
            stable_mean: Some(0.41),
            candidate_mean: Some(0.42),
            enough_data: true,
        }],
    }
}

#[test]
fn canary_decision_round_trips_and_refuses_wrong_payloads() {
    let value = round_trip(&canary_decision());
    let hold = CanaryDecision {
        action: CanaryAction::Hold,
        stable: None,
        evidence: vec![],
        ..canary_decision()
    };
    round_trip(&hold);
    for action in CanaryAction::ALL {
        assert_eq!(CanaryAction::parse(action.as_str()), Some(action));
    }
    let evidence =
        |field: &'static str, to: Value| move |v: &mut Value| v["evidence"][0][field] = to.clone();
    refused::<CanaryDecision>(
        &value,
        &[
            ("unknown action", &set("action", json!("explode"))),
            ("share over 1", &set("share", json!(1.5))),
            ("canary id 0", &set("canary_id", json!(0))),
            ("empty reason", &set("reason", json!(""))),
            ("candidate with a slash", &set("candidate", json!("a/b"))),
            ("unknown decision", &evidence("decision", json!("maybe"))),
            ("unknown kind", &evidence("kind", json!("vibes"))),
            ("evidence missing n_stable", &|v: &mut Value| {
                v["evidence"][0].as_object_mut().unwrap().remove("n_stable");
            }),
            ("unknown evidence field", &evidence("extra", json!(1))),
        ],
    );
    accepted::<CanaryDecision>(
        &value,
        &[
            ("stable null", &set("stable", json!(null))),
            ("no interval", &evidence("lower", json!(null))),
        ],
    );
}

/// What search's deploy.rs declared and serialized before the type moved
/// here (kalon-registry's deploy now publishes this crate's type).
#[derive(serde::Serialize)]
struct SearchDeploymentChanged {
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
    model_version: String,
    variant: Option<String>,
    weight: f64,
}

#[test]
fn model_deployment_is_the_json_search_writes() {
    for change in [
        deployment(),
        DeploymentChanged {
            variant: None,
            weight: 0.0,
            ..deployment()
        },
        DeploymentChanged::now("base", Some("stable"), 1.0),
    ] {
        let search = SearchDeploymentChanged {
            event_id: change.event_id,
            occurred_at: change.occurred_at,
            model_version: change.model_version.clone(),
            variant: change.variant.clone(),
            weight: change.weight,
        };
        assert_eq!(change.to_json(), serde_json::to_vec(&search).unwrap());
        assert_eq!(
            DeploymentChanged::decode(&change.to_json()).unwrap(),
            change
        );
    }
}

// --- model.registered.v1 --------------------------------------------------

fn registered() -> ModelRegistered {
    ModelRegistered {
        event_id: id(5),
        occurred_at: at(),
        model_version: "aligned-v3".into(),
        parent_version: Some("base-v1".into()),
        training_run_id: Some("run-2026-11-30-01".into()),
        artifact_uri: "s3://kalon-models/aligned-v3/encoder.tar.zst".into(),
        artifact_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        dimension: 512,
        gate: GateOutcome::Pending,
    }
}

#[test]
fn model_registered_round_trips_and_refuses_wrong_payloads() {
    for gate in [
        GateOutcome::Passed,
        GateOutcome::Failed,
        GateOutcome::Pending,
    ] {
        let value = round_trip(&ModelRegistered {
            gate,
            ..registered()
        });
        assert_eq!(value["gate"], gate.as_str());
    }
    let root = ModelRegistered {
        parent_version: None,
        training_run_id: None,
        artifact_uri: "file:///var/lib/kalon/models/base-v1".into(),
        ..registered()
    };
    let value = round_trip(&root);
    assert!(value.get("parent_version").is_none());
    let value = round_trip(&registered());
    refused::<ModelRegistered>(
        &value,
        &[
            ("unknown gate", &set("gate", json!("skipped"))),
            ("dimension zero", &set("dimension", json!(0))),
            ("dimension negative", &set("dimension", json!(-512))),
            ("dimension fractional", &set("dimension", json!(512.5))),
            ("dimension too large", &set("dimension", json!(65_537))),
            (
                "sha256 too short",
                &set("artifact_sha256", json!("9f86d081")),
            ),
            (
                "sha256 in capitals",
                &set(
                    "artifact_sha256",
                    json!("9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"),
                ),
            ),
            (
                "relative uri",
                &set("artifact_uri", json!("models/aligned-v3")),
            ),
            (
                "uri with a space",
                &set("artifact_uri", json!("s3://bucket/a b")),
            ),
            ("uri without a scheme", &set("artifact_uri", json!(":abc"))),
            (
                "uri with nothing after the scheme",
                &set("artifact_uri", json!("s3:")),
            ),
            (
                "uri too long",
                &set("artifact_uri", json!(format!("s3://{}", "a".repeat(2044)))),
            ),
            ("parent with a slash", &set("parent_version", json!("a/b"))),
            ("empty training run", &set("training_run_id", json!(""))),
            ("version empty", &set("model_version", json!(""))),
        ],
    );
    accepted::<ModelRegistered>(
        &value,
        &[
            ("null parent", &set("parent_version", Value::Null)),
            ("null run", &set("training_run_id", Value::Null)),
            (
                "https uri",
                &set("artifact_uri", json!("https://models.example/v3?sig=a%20b")),
            ),
            (
                "uri of 2048 characters",
                &set("artifact_uri", json!(format!("s3://{}", "a".repeat(2043)))),
            ),
        ],
    );
}

// --- all topics -----------------------------------------------------------

#[test]
fn each_schema_file_is_named_after_its_topic_and_matches_the_crate() {
    for spec in TOPICS {
        let path = format!(
            "{}/../../schemas/{}.json",
            env!("CARGO_MANIFEST_DIR"),
            spec.name
        );
        let file = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            Some(file.as_str()),
            spec.schema(),
            "{path} is what the crate embeds"
        );
        let schema: Value = serde_json::from_str(&file).unwrap();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(schema["$id"], format!("urn:kalon:schema:{}", spec.name));
        assert_eq!(schema["additionalProperties"], json!(false), "{path}");
        validator(spec.name);
    }
}
