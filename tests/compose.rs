//! docker-compose.yml cannot run here (no Docker engine), so it is kept
//! right by this test: every Kalon program it runs is a binary of the
//! workspace, and the topics it names are exactly the topics in the code.

use std::collections::BTreeSet;

use serde_norway::Value;

fn compose() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("docker-compose.yml is readable");
    serde_norway::from_str(&text).expect("docker-compose.yml is YAML")
}

/// Binaries the workspace builds, read from the manifests.
fn workspace_binaries() -> BTreeSet<String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut bins = BTreeSet::new();
    // every workspace member's manifest (the root's `members` list)
    let workspace = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    let members = workspace
        .split("members = [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("the root Cargo.toml lists its members");
    for member in members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty() && *m != "tests")
    {
        let text = std::fs::read_to_string(format!("{root}/{member}/Cargo.toml")).unwrap();
        let mut lines = text.lines();
        let package = lines
            .find(|l| l.starts_with("name = "))
            .map(|l| l.trim_start_matches("name = ").trim_matches('"').to_owned())
            .unwrap();
        bins.insert(package);
        for line in text.lines().filter(|l| l.starts_with("name = ")) {
            bins.insert(
                line.trim_start_matches("name = ")
                    .trim_matches('"')
                    .to_owned(),
            );
        }
    }
    bins
}

#[test]
fn every_kalon_service_runs_a_workspace_binary() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let binaries = workspace_binaries();
    let mut kalon_services = 0;
    for (name, service) in services {
        let image = service["image"].as_str().unwrap_or_default();
        if !image.starts_with("kalon:") {
            continue;
        }
        kalon_services += 1;
        let program = service["command"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{name:?} has a command"));
        assert!(
            binaries.contains(program),
            "{name:?} runs {program}, which the workspace does not build ({binaries:?})"
        );
        // and the image the compose file runs it from builds it
        let dockerfile =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/Dockerfile"))
                .unwrap();
        assert!(
            dockerfile.contains(&format!("-p {program}"))
                && dockerfile.contains(&format!("release/{program} ")),
            "{name:?} runs {program}, which deploy/Dockerfile does not build and copy"
        );
    }
    assert!(
        kalon_services >= 3,
        "the compose file runs the Kalon services"
    );
    for required in [
        "kafka",
        "postgres",
        "otel-collector",
        "prometheus",
        "grafana",
        "jaeger",
        "ingest",
        "enricher",
        "trainer",
    ] {
        assert!(services.contains_key(required), "compose has {required}");
    }
}

#[test]
fn compose_topics_are_the_topics_in_the_code() {
    let compose = compose();
    let named: BTreeSet<&str> = compose["x-kalon-topics"]
        .as_sequence()
        .expect("x-kalon-topics")
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let code: BTreeSet<&str> = kalon_events::TOPICS.iter().map(|t| t.name).collect();
    assert_eq!(named, code);
}

#[test]
fn files_the_compose_mounts_exist() {
    let compose = compose();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for (_, service) in compose["services"].as_mapping().unwrap() {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let spec = volume.as_str().unwrap();
            if let Some(local) = spec.strip_prefix("./") {
                let path = local.split(':').next().unwrap();
                assert!(
                    std::path::Path::new(&format!("{root}/{path}")).exists(),
                    "{spec} mounts a missing path"
                );
            }
        }
        if let Some(dockerfile) = service["build"]["dockerfile"].as_str() {
            assert!(std::path::Path::new(&format!("{root}/{dockerfile}")).is_file());
        }
    }
}
