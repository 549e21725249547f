//! The LLM client, the judge and the rephraser against the simulated
//! world's OpenAI-compatible endpoint, over real HTTP on a local socket.

use std::time::{Duration, Instant};

use kalon_llm::ask::AskError;
use kalon_llm::judge::Row;
use kalon_llm::protocol::Message;
use kalon_llm::rephrase::{ask_rephrasing, HttpRephraser};
use kalon_llm::{
    Aspect, ImageRef, Judge, LlmClient, LlmConfig, LlmError, PromptVariant, Rephraser, Verdict,
};
use kalon_sim_llm::WorldRephraser;
use kalon_sim_llm::{Fault, FaultControl, SimConfig, SimServer};
use kalon_world::{Catalog, Oracle, QuerySet};

async fn start(config: SimConfig) -> SimServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimServer::start(config, listener).await.unwrap()
}

/// A quiet world endpoint: no noise in rephrasings, plain JSON answers.
fn quiet(seed: u64) -> SimConfig {
    let mut config = SimConfig::new(seed, 2_000);
    config.rephrase_noise = 0.0;
    config.chatty = 0.0;
    config
}

fn client_config(sim: &SimServer) -> LlmConfig {
    let mut config = LlmConfig::new(sim.base_url(), "kalon-sim-1");
    config.timeout = Duration::from_millis(500);
    config.backoff_base = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    config.max_retries = 3;
    config.rate_per_s = 1_000.0;
    config.burst = 1_000;
    config
}

fn hello() -> Vec<Message> {
    vec![Message::user("hello")]
}

#[tokio::test]
async fn each_injected_fault_is_retried_and_the_call_succeeds() {
    let mut config = quiet(1);
    config.retry_after_s = 0.3;
    let sim = start(config).await;
    let client = LlmClient::new(client_config(&sim)).unwrap();
    for fault in [
        Fault::RateLimited,
        Fault::ServerError,
        Fault::Timeout,
        Fault::Truncated,
        Fault::Garbage,
    ] {
        let before = sim.stats().requests;
        sim.control(FaultControl {
            script: vec![fault],
            rates: None,
        });
        let started = Instant::now();
        let completion = client
            .chat(hello())
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(completion.attempts, 2, "{fault:?}");
        assert_eq!(sim.stats().requests - before, 2, "{fault:?}: one retry");
        assert!(completion.text.contains("simulated"), "{}", completion.text);
        if fault == Fault::RateLimited {
            assert!(
                started.elapsed() >= Duration::from_millis(300),
                "Retry-After honoured: {:?}",
                started.elapsed()
            );
        }
        if fault == Fault::Timeout {
            assert!(started.elapsed() >= Duration::from_millis(500));
        }
    }
    let stats = client.stats();
    assert_eq!(
        (stats.calls, stats.attempts, stats.retries, stats.failures),
        (5, 10, 5, 0)
    );
    assert!(stats.prompt_tokens > 0 && stats.completion_tokens > 0);
    // retries are bounded: four 500s in a row exhaust 3 retries
    sim.control(FaultControl {
        script: vec![Fault::ServerError; 4],
        rates: None,
    });
    let error = client.chat(hello()).await.unwrap_err();
    assert!(
        matches!(error, LlmError::Status { status: 500, .. }),
        "{error}"
    );
    assert!(error.is_transient());
    sim.stop().await;
}

#[tokio::test]
async fn the_breaker_opens_refuses_without_calling_and_a_probe_closes_it() {
    let sim = start(quiet(1)).await;
    let mut config = client_config(&sim);
    config.max_retries = 0;
    config.breaker_failures = 3;
    config.breaker_cooldown = Duration::from_millis(300);
    let client = LlmClient::new(config).unwrap();
    sim.control(FaultControl {
        script: vec![Fault::ServerError; 3],
        rates: None,
    });
    for _ in 0..3 {
        assert!(matches!(
            client.chat(hello()).await,
            Err(LlmError::Status { status: 500, .. })
        ));
    }
    assert!(client.breaker_open());
    let error = client.chat(hello()).await.unwrap_err();
    assert!(matches!(error, LlmError::CircuitOpen(_)), "{error}");
    assert_eq!(sim.stats().requests, 3, "an open breaker sends nothing");
    tokio::time::sleep(Duration::from_millis(350)).await;
    client.chat(hello()).await.expect("the probe succeeds");
    assert!(!client.breaker_open());
    assert_eq!(sim.stats().requests, 4);
    sim.stop().await;
}

#[tokio::test]
async fn the_rate_limit_holds_under_a_burst() {
    let sim = start(quiet(1)).await;
    let mut config = client_config(&sim);
    config.rate_per_s = 20.0;
    config.burst = 5;
    config.concurrency = 64;
    let client = LlmClient::new(config).unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.chat(hello()).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // 5 at once, then 20/s: the last of 40 no earlier than 35/20 s
    assert!(
        started.elapsed() >= Duration::from_millis(1_700),
        "{:?}",
        started.elapsed()
    );
    let arrivals = sim.stats().arrivals_ms;
    assert_eq!(arrivals.len(), 40);
    for (i, &t) in arrivals.iter().enumerate() {
        let in_second = arrivals[i..]
            .iter()
            .take_while(|&&u| u < t + 1_000.0)
            .count();
        assert!(
            in_second <= 5 + 20 + 1,
            "{in_second} requests within 1 s of {t} ms"
        );
    }
    sim.stop().await;
}

#[tokio::test]
async fn concurrency_and_budget_limits_hold() {
    let mut config = quiet(1);
    config.latency = Duration::from_millis(200);
    let sim = start(config).await;
    let mut config = client_config(&sim);
    config.concurrency = 4;
    let client = LlmClient::new(config).unwrap();
    let started = Instant::now();
    let calls = (0..12).map(|_| client.chat(hello()));
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    // 12 calls, 4 at a time, 200 ms each: three waves
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );

    let mut config = client_config(&sim);
    config.budget_tokens_per_hour = 5;
    let client = LlmClient::new(config).unwrap();
    let first = client.chat(hello()).await.unwrap();
    assert!(first.usage.total_tokens >= 5, "{:?}", first.usage);
    let before = sim.stats().requests;
    let error = client.chat(hello()).await.unwrap_err();
    assert!(
        matches!(error, LlmError::Budget { limit: 5, .. }),
        "{error}"
    );
    assert_eq!(sim.stats().requests, before, "a spent budget sends nothing");
    sim.stop().await;
}

#[tokio::test]
async fn a_wrong_key_is_refused_once_without_retries() {
    let mut config = quiet(1);
    config.api_key = Some("sk-right".into());
    let sim = start(config).await;
    let mut config = client_config(&sim);
    config.api_key = Some("sk-wrong".into());
    let error = LlmClient::new(config)
        .unwrap()
        .chat(hello())
        .await
        .unwrap_err();
    assert!(
        matches!(error, LlmError::Status { status: 401, .. }),
        "{error}"
    );
    assert!(!error.is_transient());
    assert_eq!(sim.stats().requests, 1);
    let mut config = client_config(&sim);
    config.api_key = Some("sk-right".into());
    LlmClient::new(config).unwrap().chat(hello()).await.unwrap();
    sim.stop().await;
}

#[tokio::test]
async fn every_variant_comes_back_parsed_and_malformed_answers_get_one_strict_retry() {
    let mut config = quiet(7);
    config.chatty = 1.0; // every answer wrapped in prose or code fences
    let sim = start(config).await;
    let client = LlmClient::new(client_config(&sim)).unwrap();
    let world = WorldRephraser { seed: 7 };
    for variant in PromptVariant::ALL {
        let answer = ask_rephrasing(&client, "moody red cat in the snow", variant)
            .await
            .unwrap();
        assert_eq!(
            answer.value,
            world
                .rephrase("moody red cat in the snow", variant)
                .unwrap(),
            "{variant:?}"
        );
        assert!(!answer.strict);
    }
    sim.control(FaultControl {
        script: vec![Fault::Malformed],
        rates: None,
    });
    let answer = ask_rephrasing(&client, "red cat", PromptVariant::Detail)
        .await
        .unwrap();
    assert!(answer.strict, "needed the strict prompt");
    assert_eq!(answer.refused.len(), 1);
    assert!(answer.refused[0].0.text.contains("sorry"));
    sim.control(FaultControl {
        script: vec![Fault::Malformed, Fault::Malformed],
        rates: None,
    });
    match ask_rephrasing(&client, "red cat", PromptVariant::Detail).await {
        Err(AskError::Malformed { refused }) => assert_eq!(refused.len(), 2),
        other => panic!("expected malformed, got {other:?}"),
    }
    sim.stop().await;
}

#[test]
fn the_http_rephraser_plugs_into_the_rephraser_trait() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime.block_on(start(quiet(3)));
    let rephraser = HttpRephraser::new(LlmClient::new(client_config(&sim)).unwrap()).unwrap();
    let rephraser: &dyn Rephraser = &rephraser;
    let world = WorldRephraser { seed: 3 };
    for variant in [PromptVariant::Detail, PromptVariant::Reorg] {
        assert_eq!(
            rephraser.rephrase("white car", variant).unwrap(),
            world.rephrase("white car", variant).unwrap()
        );
    }
    runtime.block_on(sim.stop());
}

#[tokio::test]
async fn the_judge_is_order_consistent_over_urls_and_inline_images() {
    // a small world on disk, so inline images can be recognised by bytes
    let dir = tempfile::tempdir().unwrap();
    let spec = kalon_world::WorldSpec::new(5, 400);
    kalon_world::export(&spec, dir.path(), |_| {}).unwrap();
    let catalog = Catalog::generate(5, 400);
    let oracle = Oracle::default();
    let query = QuerySet::generate(5, 160)
        .queries
        .into_iter()
        .find(|q| q.colour.is_none() && q.scene.is_none() && q.style_intent.is_none())
        .unwrap();
    let mut relevant: Vec<_> = catalog
        .images
        .iter()
        .filter(|m| query.relevance(m) > 0.0)
        .collect();
    relevant.sort_by(|a, b| {
        oracle
            .aesthetic(&query, b)
            .total_cmp(&oracle.aesthetic(&query, a))
    });
    assert!(relevant.len() >= 10);
    let by_url = |ids: &[&kalon_world::ImageMeta]| -> Vec<ImageRef> {
        ids.iter()
            .map(|m| ImageRef::Url(format!("http://search.local/v1/images/{}", m.id)))
            .collect()
    };
    let inline = |ids: &[&kalon_world::ImageMeta]| -> Vec<ImageRef> {
        ids.iter()
            .map(|m| {
                ImageRef::Png(
                    std::fs::read(dir.path().join(format!("images/{}.png", m.id))).unwrap(),
                )
            })
            .collect()
    };
    let best = &relevant[..5];
    let worst = &relevant[relevant.len() - 5..];

    let mut config = SimConfig::new(5, 400);
    config.world_dir = Some(dir.path().to_owned());
    config.position_bias = 0.0;
    let sim = start(config.clone()).await;
    let judge = Judge::new(LlmClient::new(client_config(&sim)).unwrap());
    for (a, b) in [(by_url(best), by_url(worst)), (inline(best), inline(worst))] {
        let comparison = judge
            .compare(&query.text, Aspect::Aesthetic, &a, &b)
            .await
            .unwrap();
        assert_eq!(comparison.verdict, Verdict::Win);
        assert_eq!((comparison.a_first, comparison.b_first), (Row::A, Row::A));
        assert_eq!(comparison.calls.len(), 2);
        let reverse = judge
            .compare(&query.text, Aspect::Aesthetic, &b, &a)
            .await
            .unwrap();
        assert_eq!(reverse.verdict, Verdict::Loss);
        let scores = judge
            .score(&query.text, Aspect::Aesthetic, &a, &b)
            .await
            .unwrap();
        assert!(scores.a > scores.b, "{} vs {}", scores.a, scores.b);
    }
    assert_eq!(sim.stats().compare, 8);
    // a ranking of all ten, asked in both orders: the best five on top
    let mixed: Vec<ImageRef> = by_url(worst).into_iter().chain(by_url(best)).collect();
    let (scores, calls) = judge
        .rank(&query.text, Aspect::Aesthetic, &mixed)
        .await
        .unwrap();
    assert_eq!(calls.len(), 2);
    let lowest_best = scores[5..].iter().copied().fold(f64::INFINITY, f64::min);
    let highest_worst = scores[..5]
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(lowest_best > highest_worst, "{scores:?}");
    sim.stop().await;

    // a judge that always prefers the row shown first: every verdict is
    // "similar", which only asking in both orders reveals
    config.position_bias = 50.0;
    let sim = start(config).await;
    let judge = Judge::new(LlmClient::new(client_config(&sim)).unwrap());
    let single = judge
        .pick(
            &query.text,
            Aspect::Aesthetic,
            &by_url(worst),
            &by_url(best),
        )
        .await
        .unwrap();
    assert_eq!(single.value, 1, "one call picks the worse row shown first");
    let comparison = judge
        .compare(
            &query.text,
            Aspect::Aesthetic,
            &by_url(best),
            &by_url(worst),
        )
        .await
        .unwrap();
    assert_eq!(comparison.verdict, Verdict::Similar);
    // a ranking judge that only follows the order shown: asking both orders
    // cancels it, every image scores the same
    let (scores, _) = judge
        .rank(&query.text, Aspect::Aesthetic, &by_url(best))
        .await
        .unwrap();
    assert!(scores.iter().all(|s| *s == scores[0]), "{scores:?}");
    sim.stop().await;
}

#[tokio::test]
async fn kalonctl_serves_the_world_endpoint_and_refuses_bad_settings() {
    let kalonctl = kalon_tests::workspace_binary("kalonctl");
    let bad = std::process::Command::new(&kalonctl)
        .args(["sim", "serve-llm", "--chatty", "2"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--chatty 2 is not a probability"),
        "{stderr}"
    );

    let addr = format!("127.0.0.1:{}", kalon_tests::free_port());
    let mut child = std::process::Command::new(&kalonctl)
        .args([
            "sim",
            "serve-llm",
            "--listen",
            &addr,
            "--seed",
            "4",
            "--images",
            "500",
        ])
        .args(["--rephrase-noise", "0", "--chatty", "0"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kalon_stack::wait_for_port(&addr, Duration::from_secs(30)).unwrap();
    let client = LlmClient::new(LlmConfig::new(format!("http://{addr}/v1"), "m")).unwrap();
    let answer = ask_rephrasing(&client, "red cat", PromptVariant::Reorg).await;
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(
        answer.unwrap().value,
        WorldRephraser { seed: 4 }
            .rephrase("red cat", PromptVariant::Reorg)
            .unwrap()
    );
}
