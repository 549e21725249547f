//! `kalon-bench judge`: the LMM judge measured against the simulated
//! world's OpenAI-compatible endpoint.

use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use kalon_llm::judge::{Row, Verdict};
use kalon_llm::{Aspect, ImageRef, Judge, LlmClient, LlmConfig};
use kalon_sim_llm::{SimConfig, SimServer};
use kalon_world::oracle::Choice;
use kalon_world::{Catalog, HpirItem, Oracle, QuerySet};

/// `kalon-bench judge`
#[derive(Debug, Clone, Args)]
pub struct JudgeBenchArgs {
    /// Latency of the simulated endpoint per call.
    #[arg(long, default_value_t = 300)]
    pub latency_ms: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Calls for the throughput figure.
    #[arg(long, default_value_t = 1_000)]
    pub calls: usize,
    /// The world whose HPIR items measure agreement.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 10_000)]
    pub images: usize,
    /// Log-odds towards the row shown first.
    #[arg(long, default_value_t = 1.0)]
    pub position_bias: f64,
}

fn row_refs(ids: &[String]) -> Vec<ImageRef> {
    ids.iter()
        .map(|id| ImageRef::Url(format!("http://127.0.0.1/v1/images/{id}")))
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Confidence-weighted agreement with people, per the brief's HPIR metric.
#[derive(Default)]
struct Agreement {
    agree: f64,
    weight: f64,
}

impl Agreement {
    fn add(&mut self, agrees: f64, confidence: f64) {
        self.agree += agrees * confidence;
        self.weight += confidence;
    }

    fn value(&self) -> f64 {
        if self.weight == 0.0 {
            f64::NAN
        } else {
            self.agree / self.weight
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

pub async fn bench_judge(args: &JudgeBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.concurrency >= 1 && args.calls >= 1,
        "--concurrency and --calls must be positive"
    );
    let mut sim = SimConfig::new(args.seed, args.images);
    sim.latency = Duration::from_millis(args.latency_ms);
    sim.position_bias = args.position_bias;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = SimServer::start(sim, listener).await?;
    let mut config = LlmConfig::new(server.base_url(), "kalon-sim-1");
    config.concurrency = args.concurrency;
    config.rate_per_s = 1e6;
    config.burst = 1_000_000;
    config.timeout = Duration::from_millis(args.latency_ms + 10_000);
    let judge = Judge::new(LlmClient::new(config)?);

    let catalog = Catalog::generate(args.seed, args.images);
    let queries = QuerySet::generate(args.seed, 160).queries;
    let items: Vec<HpirItem> =
        kalon_world::oracle::hpir_items(&catalog, &queries, &Oracle::default(), 2);
    anyhow::ensure!(
        !items.is_empty(),
        "world seed {} has no HPIR items",
        args.seed
    );

    // throughput: single comparison calls, `concurrency` in flight
    eprintln!(
        "bench judge: {} calls at {} in flight against the simulated endpoint ({} ms latency)",
        args.calls, args.concurrency, args.latency_ms
    );
    let bar = kalonctl::progress_bar(args.calls as u64, "calls");
    let started = Instant::now();
    let mut overheads = Vec::with_capacity(args.calls);
    let mut calls = futures::stream::iter(0..args.calls)
        .map(|i| {
            let item = &items[i % items.len()];
            let judge = &judge;
            async move {
                judge
                    .pick(
                        &item.query,
                        Aspect::Aesthetic,
                        &row_refs(&item.row_a),
                        &row_refs(&item.row_b),
                    )
                    .await
            }
        })
        .buffer_unordered(args.concurrency);
    while let Some(answer) = calls.next().await {
        let answer = answer?;
        let c = &answer.completion;
        if let Some(server_ms) = c.server_ms {
            overheads.push(c.attempt_latency.as_secs_f64() * 1e3 - server_ms);
        }
        bar.inc(1);
    }
    drop(calls);
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let calls_per_s = args.calls as f64 / seconds;
    overheads.sort_by(f64::total_cmp);
    let overhead_p50 = percentile(&overheads, 0.5);
    let ideal = args.concurrency as f64 / (args.latency_ms.max(1) as f64 / 1e3);
    eprintln!(
        "  {calls_per_s:.1} calls/s ({:.0}% of concurrency/latency = {ideal:.1}/s); client overhead p50 {overhead_p50:.3} ms, p99 {:.3} ms",
        100.0 * calls_per_s / ideal,
        percentile(&overheads, 0.99)
    );

    // agreement with people on the world's HPIR items
    let bar = kalonctl::progress_bar((items.len() * 2) as u64, "judgments");
    let mut single = [Agreement::default(), Agreement::default()];
    let mut consistent = [Agreement::default(), Agreement::default()];
    let mut half = [Agreement::default(), Agreement::default()];
    let mut decided = [0usize; 2];
    let work: Vec<(usize, Aspect, &HpirItem)> = items
        .iter()
        .flat_map(|item| {
            Aspect::ALL
                .into_iter()
                .enumerate()
                .map(move |(i, a)| (i, a, item))
        })
        .collect();
    let mut comparisons = futures::stream::iter(work)
        .map(|(index, aspect, item)| {
            let judge = &judge;
            async move {
                let result = judge
                    .compare(
                        &item.query,
                        aspect,
                        &row_refs(&item.row_a),
                        &row_refs(&item.row_b),
                    )
                    .await;
                (index, aspect, item, result)
            }
        })
        .buffer_unordered(args.concurrency.div_ceil(2));
    while let Some((index, aspect, item, result)) = comparisons.next().await {
        let comparison = result?;
        let label = match aspect {
            Aspect::Relevance => item.accuracy,
            Aspect::Aesthetic => item.aesthetic,
        };
        let human = match label.choice {
            Choice::A => Row::A,
            Choice::B => Row::B,
        };
        let c = label.confidence;
        single[index].add(f64::from(comparison.a_first == human), c);
        let wanted = if human == Row::A {
            Verdict::Win
        } else {
            Verdict::Loss
        };
        match comparison.verdict {
            Verdict::Similar => half[index].add(0.5, c),
            verdict => {
                decided[index] += 1;
                let agrees = f64::from(verdict == wanted);
                consistent[index].add(agrees, c);
                half[index].add(agrees, c);
            }
        }
        bar.inc(1);
    }
    drop(comparisons);
    bar.finish_and_clear();
    println!(
        "{:<10} {:>8} {:>18} {:>10} {:>14}",
        "aspect", "single", "order-consistent", "coverage", "similar=half"
    );
    for (i, aspect) in Aspect::ALL.into_iter().enumerate() {
        println!(
            "{:<10} {:>8.3} {:>18.3} {:>10.3} {:>14.3}",
            kalon_llm::prompts::hpir_name(aspect),
            single[i].value(),
            consistent[i].value(),
            decided[i] as f64 / items.len() as f64,
            half[i].value()
        );
    }
    println!(
        "{} HPIR items of world seed {}; confidence-weighted agreement with people; order-consistent = over the items both orders agree on (coverage = their share)",
        items.len(),
        args.seed
    );
    let stats = judge.client().stats();
    println!(
        "{}",
        serde_json::json!({
            "bench": "judge",
            "latency_ms": args.latency_ms,
            "concurrency": args.concurrency,
            "calls_per_s": round4(calls_per_s),
            "overhead_ms_p50": round4(overhead_p50),
            "retries": stats.retries,
            "agreement": {
                "single": {"accuracy": round4(single[0].value()), "aesthetic": round4(single[1].value())},
                "order_consistent": {"accuracy": round4(consistent[0].value()), "aesthetic": round4(consistent[1].value())},
                "coverage": {"accuracy": round4(decided[0] as f64 / items.len() as f64), "aesthetic": round4(decided[1] as f64 / items.len() as f64)},
            }
        })
    );
    server.stop().await;
    Ok(())
}
