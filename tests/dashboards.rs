//! The Grafana dashboards (`deploy/grafana/dashboards/*.json`) against the
//! metrics the code registers: every metric a panel queries is one the
//! code exports, under the name the collector's Prometheus exporter gives
//! it, with labels the code sets; every registered metric is on a
//! dashboard. No database or broker: the Rust sources are scanned as text.
//!
//! The exporter's naming (`deploy/otel-collector.yaml`, `prometheus`
//! exporter): non-alphanumeric runs become `_`; the unit's word is appended
//! unless the name already has it (`s` -> `seconds`, `ms` ->
//! `milliseconds`, `By` -> `bytes`, `1` on a gauge -> `ratio`, `{...}`
//! annotations dropped); monotonic counters end in `_total`; histograms are
//! queried as `_bucket`, `_sum` and `_count`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The dashboards docker-compose users get, one per service.
const DASHBOARDS: [&str; 6] = [
    "ingest",
    "search",
    "enricher",
    "preferences",
    "trainer",
    "canary",
];

/// Labels every series has besides the code's attributes: the exporter's
/// `job`/`instance` (from the OTLP resource) and scope labels, and `le` on
/// histogram buckets (allowed on histograms only).
const EXPORTER_LABELS: [&str; 4] = ["job", "instance", "otel_scope_name", "otel_scope_version"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A monotonic sum (`*_counter`, `*_observable_counter`).
    Counter,
    /// A non-monotonic sum (`*_up_down_counter`): exported as a gauge.
    UpDownCounter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The kind an instrument method (`u64_counter`, `i64_observable_gauge`,
    /// ...) builds, or `None` when `method` builds no instrument.
    fn of_method(method: &str) -> Option<Kind> {
        let rest = ["u64_", "i64_", "f64_"]
            .iter()
            .find_map(|p| method.strip_prefix(p))?;
        let rest = rest.strip_prefix("observable_").unwrap_or(rest);
        match rest {
            "counter" => Some(Kind::Counter),
            "up_down_counter" => Some(Kind::UpDownCounter),
            "gauge" => Some(Kind::Gauge),
            "histogram" => Some(Kind::Histogram),
            _ => None,
        }
    }
}

/// One instrument registration found in the sources.
#[derive(Debug, Clone)]
struct Instrument {
    /// The OpenTelemetry name, e.g. `kalon.ingest.commit.duration`.
    name: String,
    unit: String,
    kind: Kind,
    /// Where it is registered (workspace-relative path).
    file: String,
    /// The attribute keys (`KeyValue::new("key", ..)`) set in that file.
    labels: BTreeSet<String>,
}

impl Instrument {
    /// The Prometheus series names it is queried by.
    fn series(&self) -> Result<Vec<String>, String> {
        let base = prometheus_name(&self.name, &self.unit, self.kind)?;
        Ok(match self.kind {
            Kind::Histogram => ["bucket", "sum", "count"]
                .iter()
                .map(|suffix| format!("{base}_{suffix}"))
                .collect(),
            _ => vec![base],
        })
    }
}

/// The Prometheus name the collector's exporter gives an instrument
/// (histogram suffixes aside).
fn prometheus_name(name: &str, unit: &str, kind: Kind) -> Result<String, String> {
    let mut tokens: Vec<&str> = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    let unit_word = match unit {
        "" => None,
        u if u.starts_with('{') && u.ends_with('}') => None,
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        "By" => Some("bytes"),
        "1" if kind == Kind::Gauge => Some("ratio"),
        "1" => None,
        other => {
            return Err(format!(
                "{name}: unit {other:?} is not one this test knows the Prometheus word for \
                 (add it to prometheus_name, as the collector's exporter spells it)"
            ))
        }
    };
    if let Some(word) = unit_word {
        if !tokens.contains(&word) {
            tokens.push(word);
        }
    }
    if kind == Kind::Counter {
        tokens.retain(|t| *t != "total");
        tokens.push("total");
    }
    Ok(tokens.join("_"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// Every `.rs` file under `dir`, build outputs and hidden folders skipped.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The string literal at the start of `text` (after whitespace), and the
/// rest of `text` after it.
fn string_literal(text: &str) -> Option<(String, &str)> {
    let text = text.trim_start();
    let body = text.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &body[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// Every `KeyValue::new("key", ..)` key in `source`.
fn attribute_keys(source: &str) -> BTreeSet<String> {
    source
        .match_indices("KeyValue::new(")
        .filter_map(|(at, m)| string_literal(&source[at + m.len()..]))
        .map(|(key, _)| key)
        .collect()
}

/// The instruments registered in one file's `source`: a method call
/// `.<u64|i64|f64>_[observable_]<counter|up_down_counter|gauge|histogram>(`
/// with a literal name, and in the same builder chain (up to `.build()`)
/// an optional `.with_unit("..")`. A registration the scanner cannot read
/// is an error, so the check never passes by missing one.
fn scan_source(file: &str, source: &str) -> Result<Vec<Instrument>, String> {
    let labels = attribute_keys(source);
    let mut found = Vec::new();
    for (dot, _) in source.match_indices('.') {
        let after = &source[dot + 1..];
        let method_len = after.find(|c: char| !is_ident(c)).unwrap_or(after.len());
        let method = &after[..method_len];
        let Some(kind) = Kind::of_method(method) else {
            continue;
        };
        let rest = &after[method_len..];
        let Some(args) = rest.strip_prefix('(') else {
            continue;
        };
        let line = source[..dot].lines().count();
        let (name, chain) = string_literal(args).ok_or_else(|| {
            format!("{file}:{line}: .{method}( without a literal name: use a string literal")
        })?;
        let end = chain
            .find(".build()")
            .ok_or_else(|| format!("{file}:{line}: {name}: no .build() ends its builder"))?;
        let chain = &chain[..end];
        let unit = match chain.find(".with_unit(") {
            Some(at) => {
                string_literal(&chain[at + ".with_unit(".len()..])
                    .ok_or_else(|| format!("{file}:{line}: {name}: with_unit without a literal"))?
                    .0
            }
            None => String::new(),
        };
        found.push(Instrument {
            name,
            unit,
            kind,
            file: file.to_owned(),
            labels: labels.clone(),
        });
    }
    Ok(found)
}

/// Every instrument registered under `crates/` and `services/`.
fn registered() -> Vec<Instrument> {
    let root = workspace();
    let mut files = Vec::new();
    for dir in ["crates", "services"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut instruments = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let file = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        match scan_source(&file, &source) {
            Ok(found) => instruments.extend(found),
            Err(error) => errors.push(error),
        }
    }
    assert!(
        errors.is_empty(),
        "unreadable registrations:\n{}",
        errors.join("\n")
    );
    instruments
}

/// One query of a dashboard panel.
#[derive(Debug)]
struct Query {
    dashboard: String,
    panel: String,
    expr: String,
}

/// A dashboard's title and every panel's queries, rows' panels included.
fn queries(dashboard: &str, json: &serde_json::Value) -> Vec<Query> {
    fn walk(dashboard: &str, panels: &serde_json::Value, out: &mut Vec<Query>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(Query {
                        dashboard: dashboard.to_owned(),
                        panel: title.clone(),
                        expr: expr.to_owned(),
                    });
                }
            }
            walk(dashboard, &panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &json["panels"], &mut out);
    out
}

/// Every dashboard file, parsed, by file stem.
fn dashboards() -> BTreeMap<String, serde_json::Value> {
    let dir = workspace().join("deploy/grafana/dashboards");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
        out.insert(stem, json);
    }
    out
}

/// The metric names in a PromQL expression: identifiers starting `kalon_`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    let mut offset = 0;
    while let Some(at) = rest.find("kalon_") {
        let start = offset + at;
        let before = expr[..start].chars().next_back();
        let len = expr[start..]
            .find(|c: char| !(is_ident(c) || c == ':'))
            .unwrap_or(expr.len() - start);
        if !before.is_some_and(|c| is_ident(c) || c == ':') {
            names.push(expr[start..start + len].to_owned());
        }
        offset = start + len;
        rest = &expr[offset..];
    }
    names
}

/// The label names a PromQL expression uses: in selectors (`{a="x", b=~"y"}`)
/// and in `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`
/// lists.
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut take_list = |list: &str, matchers: bool| {
        for part in list.split(',') {
            let part = part.trim();
            let len = part.find(|c: char| !is_ident(c)).unwrap_or(part.len());
            if len > 0 && (!matchers || part[len..].trim_start().starts_with(['=', '!'])) {
                labels.insert(part[..len].to_owned());
            }
        }
    };
    // selectors; quoted values hold no braces in these dashboards
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        take_list(&rest[open + 1..open + close], true);
        rest = &rest[open + close + 1..];
    }
    for keyword in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        for (at, _) in expr.match_indices(keyword) {
            let before = expr[..at].chars().next_back();
            let after = expr[at + keyword.len()..].trim_start();
            if before.is_some_and(is_ident) || !after.starts_with('(') {
                continue;
            }
            if let Some(close) = after.find(')') {
                take_list(&after[1..close], false);
            }
        }
    }
    labels
}

/// Prometheus series name -> the instrument it comes from.
fn series_index(instruments: &[Instrument]) -> BTreeMap<String, Instrument> {
    let mut index = BTreeMap::new();
    let mut errors = Vec::new();
    for instrument in instruments {
        match instrument.series() {
            Ok(series) => {
                for name in series {
                    index.insert(name, instrument.clone());
                }
            }
            Err(error) => errors.push(error),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    index
}

#[test]
fn names_derive_as_the_collector_exports_them() {
    let cases = [
        (
            "kalon.ingest.events",
            "",
            Kind::Counter,
            "kalon_ingest_events_total",
        ),
        (
            "kalon.ingest.commit.duration",
            "s",
            Kind::Histogram,
            "kalon_ingest_commit_duration_seconds",
        ),
        (
            "kalon.ingest.consumer.lag",
            "",
            Kind::Gauge,
            "kalon_ingest_consumer_lag",
        ),
        (
            "kalon.preferences.join_lag",
            "s",
            Kind::Gauge,
            "kalon_preferences_join_lag_seconds",
        ),
        (
            "kalon.x.payload",
            "By",
            Kind::Histogram,
            "kalon_x_payload_bytes",
        ),
        (
            "kalon.x.wait",
            "ms",
            Kind::Gauge,
            "kalon_x_wait_milliseconds",
        ),
        ("kalon.x.seconds", "s", Kind::Gauge, "kalon_x_seconds"),
        (
            "kalon.x.total.calls",
            "",
            Kind::Counter,
            "kalon_x_calls_total",
        ),
        (
            "kalon.x.tokens",
            "{token}",
            Kind::Counter,
            "kalon_x_tokens_total",
        ),
        ("kalon.x.in_use", "", Kind::UpDownCounter, "kalon_x_in_use"),
        (
            "kalon.x.utilisation",
            "1",
            Kind::Gauge,
            "kalon_x_utilisation_ratio",
        ),
        (
            "kalon.x.cost.usd",
            "",
            Kind::Counter,
            "kalon_x_cost_usd_total",
        ),
    ];
    for (name, unit, kind, want) in cases {
        assert_eq!(
            prometheus_name(name, unit, kind).unwrap(),
            want,
            "{name} ({unit})"
        );
    }
    assert!(prometheus_name("kalon.x", "furlongs", Kind::Gauge).is_err());
    let histogram = Instrument {
        name: "kalon.search.request.duration".into(),
        unit: "s".into(),
        kind: Kind::Histogram,
        file: String::new(),
        labels: BTreeSet::new(),
    };
    assert_eq!(
        histogram.series().unwrap(),
        [
            "kalon_search_request_duration_seconds_bucket",
            "kalon_search_request_duration_seconds_sum",
            "kalon_search_request_duration_seconds_count"
        ]
    );
}

#[test]
fn the_scanner_reads_builder_chains_and_refuses_what_it_cannot_read() {
    let source = r#"
        let m = Metrics {
            a: meter
                .f64_histogram("kalon.x.latency")
                .with_description("with a \"quote\"")
                .with_unit("s")
                .build(),
            b: meter.u64_counter("kalon.x.calls").build(),
        };
        meter
            .i64_observable_gauge("kalon.x.lag")
            .with_callback(|g| g.observe(1, &[]))
            .build();
        counter.add(1, &[KeyValue::new("outcome", "ok"), opentelemetry::KeyValue::new("task", t)]);
        // .u64_counter is not a call, u64_counter_like("x") no instrument
        let _ = v.u64_counter_like("kalon.not.one");
    "#;
    let found = scan_source("x.rs", source).unwrap();
    let got: Vec<_> = found
        .iter()
        .map(|i| (i.name.as_str(), i.unit.as_str(), i.kind))
        .collect();
    assert_eq!(
        got,
        [
            ("kalon.x.latency", "s", Kind::Histogram),
            ("kalon.x.calls", "", Kind::Counter),
            ("kalon.x.lag", "", Kind::Gauge),
        ]
    );
    assert_eq!(
        found[0].labels,
        BTreeSet::from(["outcome".to_owned(), "task".to_owned()])
    );
    assert!(scan_source("x.rs", "meter.u64_counter(NAME).build()").is_err());
    assert!(scan_source("x.rs", r#"meter.u64_counter("kalon.x")"#).is_err());
}

#[test]
fn promql_names_and_labels_are_extracted() {
    let expr = r#"histogram_quantile(0.99, sum by (le, task) (rate(kalon_llm_call_duration_seconds_bucket{outcome!="ok", job=~"kalon.*"}[5m]))) / ignoring(x) kalon_a:b + notkalon_x"#;
    assert_eq!(
        metric_names(expr),
        ["kalon_llm_call_duration_seconds_bucket", "kalon_a:b"]
    );
    assert_eq!(
        label_names(expr),
        ["job", "le", "outcome", "task", "x"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
    assert_eq!(
        label_names("sum without(kind)(rate(kalon_x_total[1m])) by"),
        BTreeSet::from(["kind".to_owned()])
    );
}

#[test]
fn every_service_has_a_dashboard_with_panels() {
    let dashboards = dashboards();
    let mut uids = BTreeSet::new();
    for name in DASHBOARDS {
        let json = dashboards
            .get(name)
            .unwrap_or_else(|| panic!("deploy/grafana/dashboards/{name}.json is missing"));
        let panels = json["panels"].as_array().map_or(0, Vec::len);
        assert!(panels > 0, "{name}.json has no panels");
        assert!(
            json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}.json has no title"
        );
        let uid = json["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}.json has no uid"));
        assert!(
            uids.insert(uid.to_owned()),
            "{name}.json repeats the uid {uid}"
        );
        let queries = queries(name, json);
        assert!(!queries.is_empty(), "{name}.json has no queries");
        for query in queries {
            assert!(
                !query.expr.trim().is_empty(),
                "{name}.json, panel {:?}: an empty expr",
                query.panel
            );
        }
    }
}

#[test]
fn dashboards_query_only_registered_metrics_and_labels() {
    let instruments = registered();
    let index = series_index(&instruments);
    // a broken scanner must fail here, not pass with nothing to compare
    for known in [
        "kalon_ingest_events_total",
        "kalon_ingest_consumer_lag",
        "kalon_search_request_duration_seconds_bucket",
        "kalon_preferences_join_lag_seconds",
        "kalon_trainer_phase_duration_seconds_count",
        "kalon_llm_calls_total",
        "kalon_enricher_rephrasings_total",
        "kalon_canary_decisions_total",
    ] {
        assert!(
            index.contains_key(known),
            "the scanner did not find {known}; it found: {:?}",
            index.keys().collect::<Vec<_>>()
        );
    }
    let mut unknown = Vec::new();
    let mut bad_labels = Vec::new();
    for (name, json) in &dashboards() {
        for query in queries(name, json) {
            let names = metric_names(&query.expr);
            if names.is_empty() {
                unknown.push(format!(
                    "{}.json, panel {:?}: no kalon_ metric in {:?}",
                    query.dashboard, query.panel, query.expr
                ));
            }
            let mut allowed: BTreeSet<String> =
                EXPORTER_LABELS.iter().map(|l| (*l).to_owned()).collect();
            for metric in &names {
                match index.get(metric) {
                    Some(instrument) => {
                        allowed.extend(instrument.labels.iter().cloned());
                        if instrument.kind == Kind::Histogram {
                            allowed.insert("le".into());
                        }
                    }
                    None => unknown.push(format!(
                        "{}.json, panel {:?}: {metric}",
                        query.dashboard, query.panel
                    )),
                }
            }
            for label in label_names(&query.expr) {
                if !allowed.contains(&label) {
                    bad_labels.push(format!(
                        "{}.json, panel {:?}: label {label:?} is not an attribute set where {names:?} are registered",
                        query.dashboard, query.panel
                    ));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "dashboards query metrics the code does not register (known: {:?}):\n{}",
        index.keys().collect::<Vec<_>>(),
        unknown.join("\n")
    );
    assert!(bad_labels.is_empty(), "{}", bad_labels.join("\n"));
}

#[test]
fn every_registered_metric_is_on_a_dashboard() {
    let instruments = registered();
    let queried: BTreeSet<String> = dashboards()
        .iter()
        .flat_map(|(name, json)| queries(name, json))
        .flat_map(|q| metric_names(&q.expr))
        .collect();
    let missing: Vec<String> = instruments
        .iter()
        .filter(|i| {
            !i.series()
                .unwrap_or_default()
                .iter()
                .any(|s| queried.contains(s))
        })
        .map(|i| {
            format!(
                "{} ({}, registered in {})",
                i.name,
                i.series().unwrap_or_default().join(" | "),
                i.file
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics no dashboard shows (add a panel to deploy/grafana/dashboards/):\n{}",
        missing.join("\n")
    );
}
