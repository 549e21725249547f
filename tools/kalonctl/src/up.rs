//! `kalonctl up`: the whole loop on one machine. The local stack (Postgres,
//! the broker), a search that answers (a simulated catalog and the
//! reference model, `search-bootstrap`), the simulated LLM/LMM endpoint
//! unless `KALON_LLM_BASE_URL` names yours, and every service as its own
//! process under [`Supervisor`]: ingest, search, enricher, preferences,
//! trainer, canary. Runs until Ctrl-C, then stops them in reverse order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::supervisor::{Chaos, InfraRestart, ServiceSpec, Supervisor};
use crate::{Endpoints, Globals};

/// How fast the loop turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pace {
    /// Each service's own defaults (the trainer at 03:00 daily, canary
    /// steps of 5 minutes, clicks final after 30 quiet minutes).
    Production,
    /// Minutes instead of hours: a run every 20 s when 300 new pairs
    /// wait, canary steps of 20 s at 20% and 50%, clicks final after 5
    /// quiet seconds. For demos and tests.
    Demo,
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Images in the simulated catalog search serves (made once, in
    /// `<state dir>/loop/world`).
    #[arg(long, default_value_t = 2_000)]
    pub images: usize,
    /// The simulated world's seed.
    #[arg(long, default_value_t = 1)]
    pub world_seed: u64,
    #[arg(long, value_enum, default_value_t = Pace::Production)]
    pub pace: Pace,
    /// The services' ports are this and the next ones (search, the
    /// simulated LLM, the health endpoints of ingest, enricher, trainer,
    /// preferences, canary, the canary's admin API, the console) instead
    /// of the defaults (8080, 8090, 9181-9185, 8086, 8087).
    #[arg(long)]
    pub port_base: Option<u16>,
    /// Chaos: SIGKILL one service (in turn, each once per round) every
    /// this many seconds; the broker and Postgres are restarted once each
    /// (when the stack started them).
    #[arg(long)]
    pub chaos_every_s: Option<f64>,
    /// Run the loop in this database of the stack's Postgres server,
    /// dropped and made anew first (the main job's `kalon_demo`), instead
    /// of DATABASE_URL's own.
    #[arg(long)]
    pub fresh_database: Option<String>,
    /// The canary admin API's token (`KALON_CANARY_ADMIN_TOKEN`); without
    /// one its overrides answer 403.
    #[arg(long, env = "KALON_CANARY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// Where each service listens.
#[derive(Debug, Clone, PartialEq)]
pub struct Ports {
    pub search: u16,
    pub llm: u16,
    pub ingest: u16,
    pub enricher: u16,
    pub trainer: u16,
    pub preferences: u16,
    pub canary: u16,
    pub canary_admin: u16,
    pub console: u16,
}

impl Ports {
    /// Nine distinct free ports below the kernel's ephemeral range (where
    /// a port found free can be taken by any outgoing connection before
    /// the service binds it), for tests running loops side by side.
    pub fn free() -> Ports {
        use rand::Rng;
        loop {
            let base = rand::rng().random_range(20_000..30_000u16);
            let all_free =
                (base..base + 9).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
            if all_free {
                return Ports::from_base(Some(base));
            }
        }
    }

    pub fn from_base(base: Option<u16>) -> Ports {
        match base {
            None => Ports {
                search: 8080,
                llm: 8090,
                ingest: 9181,
                enricher: 9182,
                trainer: 9183,
                preferences: 9184,
                canary: 9185,
                canary_admin: 8086,
                console: 8087,
            },
            Some(b) => Ports {
                search: b,
                llm: b + 1,
                ingest: b + 2,
                enricher: b + 3,
                trainer: b + 4,
                preferences: b + 5,
                canary: b + 6,
                canary_admin: b + 7,
                console: b + 8,
            },
        }
    }
}

/// What the loop needs besides the stack: where things are.
#[derive(Debug, Clone)]
pub struct LoopSite {
    pub endpoints_db: String,
    pub brokers: String,
    pub topic_prefix: String,
    /// `<dir>/world` (catalog) and `<dir>/models/ref-1` (reference model).
    pub dir: PathBuf,
    pub ports: Ports,
    pub pace: Pace,
    /// Set when the endpoint is the user's; else the simulated one starts.
    pub llm_base_url: Option<String>,
    pub admin_token: Option<String>,
    /// Consumer groups get this prefix too (tests on one shared broker).
    pub group_prefix: String,
    /// The world's seed (the simulated LLM reads the catalog from the world
    /// folder).
    pub world_seed: u64,
    /// The kalonctl executable whose `serve <service>` runs each service.
    pub program: PathBuf,
}

impl LoopSite {
    pub fn world(&self) -> PathBuf {
        self.dir.join("world")
    }

    pub fn search_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.search)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.canary_admin)
    }

    pub fn console_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.console)
    }

    fn llm_url(&self) -> String {
        self.llm_base_url
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{}/v1", self.ports.llm))
    }

    /// The services in the order they start, each with its settings.
    pub fn services(&self) -> Vec<ServiceSpec> {
        let world = self.world();
        let world = world.display().to_string();
        let p = &self.ports;
        let health = |port: u16| format!("http://127.0.0.1:{port}/healthz");
        let addr = |port: u16| format!("127.0.0.1:{port}");
        let demo = self.pace == Pace::Demo;
        let mut specs = Vec::new();
        if self.llm_base_url.is_none() {
            specs.push(ServiceSpec::new(
                &self.program,
                "sim-llm",
                &[
                    "sim",
                    "serve-llm",
                    "--listen",
                    &addr(p.llm),
                    "--world",
                    &world,
                    "--latency-ms",
                    "50",
                ],
                format!("http://127.0.0.1:{}/v1/models", p.llm),
            ));
        }
        let store = kalon_registry::artifact::default_url(&self.dir);
        let common = |spec: ServiceSpec| -> ServiceSpec {
            spec.env("DATABASE_URL", &self.endpoints_db)
                .env("KALON_KAFKA_BROKERS", &self.brokers)
                .env("KALON_TOPIC_PREFIX", &self.topic_prefix)
                .env(
                    "KALON_ARTIFACT_STORE",
                    or_env("KALON_ARTIFACT_STORE", &store),
                )
        };
        let llm = |spec: ServiceSpec| -> ServiceSpec {
            spec.env("KALON_LLM_BASE_URL", self.llm_url())
                .env("KALON_LLM_MODEL", or_env("KALON_LLM_MODEL", "kalon-sim-1"))
                .env("KALON_LLM_RATE", or_env("KALON_LLM_RATE", "20"))
        };
        let group = |spec: ServiceSpec, var: &str, name: &str| -> ServiceSpec {
            if self.group_prefix.is_empty() {
                spec
            } else {
                spec.env(var, format!("{}{name}", self.group_prefix))
            }
        };
        // pace settings a user's own environment overrides
        let paced = |mut spec: ServiceSpec, settings: &[(&str, &str)]| -> ServiceSpec {
            if demo {
                for (key, value) in settings {
                    spec = spec.env(key, or_env(key, value));
                }
            }
            spec
        };

        let ingest = ServiceSpec::new(
            &self.program,
            "ingest",
            &["serve", "ingest"],
            health(p.ingest),
        )
        .env("KALON_INGEST_HEALTH_ADDR", addr(p.ingest));
        specs.push(group(common(ingest), "KALON_INGEST_GROUP", "kalon-ingest"));

        let search = ServiceSpec::new(
            &self.program,
            "search",
            &[
                "serve",
                "search",
                "--listen",
                &addr(p.search),
                "--images",
                &format!("{world}/images"),
            ],
            format!("http://127.0.0.1:{}/readyz", p.search),
        );
        specs.push(paced(common(search), &[("KALON_SEARCH_RELOAD_S", "5")]));

        let enricher = ServiceSpec::new(
            &self.program,
            "enricher",
            &["serve", "enricher"],
            health(p.enricher),
        )
        .env("KALON_ENRICHER_HEALTH_ADDR", addr(p.enricher));
        specs.push(group(
            llm(common(enricher)),
            "KALON_ENRICHER_GROUP",
            "kalon-enricher",
        ));

        let preferences = ServiceSpec::new(
            &self.program,
            "preferences",
            &["serve", "preferences"],
            health(p.preferences),
        )
        .env("KALON_PREFERENCES_HEALTH_ADDR", addr(p.preferences))
        .env("KALON_PREFERENCES_DATASET", &world)
        .env(
            "KALON_PREFERENCES_IMAGE_BASE_URL",
            format!("{}/v1/images", self.search_url()),
        );
        specs.push(group(
            paced(
                llm(common(preferences)),
                &[
                    ("KALON_PREFERENCES_QUIET_S", "5"),
                    ("KALON_PREFERENCES_POLL_MS", "1000"),
                ],
            ),
            "KALON_PREFERENCES_GROUP",
            "kalon-preferences",
        ));

        let trainer = ServiceSpec::new(
            &self.program,
            "trainer",
            &["serve", "trainer"],
            health(p.trainer),
        )
        .env("KALON_TRAINER_HEALTH_ADDR", addr(p.trainer))
        .env("KALON_TRAINER_DATASET", &world)
        .env(
            "KALON_TRAINER_WORK_DIR",
            self.dir.join("trainer").display().to_string(),
        );
        specs.push(paced(
            llm(common(trainer)),
            &[
                ("KALON_TRAINER_SCHEDULE", "*/20 * * * * *"),
                // the LMM teacher's D_po pairs come fast; this many new
                // pairs also holds a few hundred of the people's click pairs
                ("KALON_TRAINER_MIN_NEW_PAIRS", "8000"),
                ("KALON_TRAINER_MIN_PAIRS", "200"),
                ("KALON_GATE_JUDGE_QUERIES", "20"),
            ],
        ));

        let mut canary = ServiceSpec::new(
            &self.program,
            "canary",
            &["serve", "canary"],
            health(p.canary),
        )
        .env("KALON_CANARY_HEALTH_ADDR", addr(p.canary))
        .env("KALON_CANARY_ADMIN_ADDR", addr(p.canary_admin))
        .env("KALON_CANARY_DATASET", &world)
        .env("KALON_CANARY_SEARCH_URL", self.search_url())
        .env(
            "KALON_CANARY_EVIDENCE",
            or_env("KALON_CANARY_EVIDENCE", "ab,interleaving,lmm"),
        );
        if let Some(token) = &self.admin_token {
            canary = canary.env("KALON_CANARY_ADMIN_TOKEN", token);
        }
        specs.push(group(
            paced(
                llm(common(canary)),
                &[
                    ("KALON_CANARY_LADDER", "0.3,0.5"),
                    // a candidate about as good as the stable one (what a
                    // few minutes of training gives) would need tens of
                    // thousands of sessions to be shown within 5% CTR: the
                    // demo accepts it within 15% CTR and 0.2 preference
                    ("KALON_CANARY_MARGIN", "0.15"),
                    ("KALON_CANARY_PREFERENCE_MARGIN", "0.2"),
                    // more of the candidate's traffic for A/B (whose CTR
                    // decides a near-equal candidate), less interleaved
                    ("KALON_CANARY_INTERLEAVE", "0.3"),
                    ("KALON_CANARY_MIN_STEP_S", "20"),
                    ("KALON_CANARY_MIN_SESSIONS", "100"),
                    ("KALON_CANARY_MIN_DECISIVE", "30"),
                    ("KALON_CANARY_TICK_MS", "1000"),
                    ("KALON_CANARY_HOLD_EVERY_S", "20"),
                    ("KALON_CANARY_BUDGET_S", "420"),
                    ("KALON_CANARY_MIN_REQUESTS", "100"),
                    // the LMM judge's verdicts come fastest (pinned searches,
                    // whatever the share): more queries per look, and more in all
                    ("KALON_CANARY_LMM_PER_LOOK", "20"),
                    ("KALON_CANARY_LMM_MAX_QUERIES", "600"),
                ],
            ),
            "KALON_CANARY_GROUP",
            "kalon-canary",
        ));

        let mut console = ServiceSpec::new(
            &self.program,
            "console",
            &["serve", "console"],
            health(p.console),
        )
        .env("KALON_CONSOLE_ADDR", addr(p.console))
        .env("KALON_CONSOLE_SEARCH_URL", self.search_url())
        .env("KALON_CONSOLE_CANARY_URL", self.admin_url());
        if let Some(token) = &self.admin_token {
            console = console.env("KALON_CANARY_ADMIN_TOKEN", token);
        }
        specs.push(llm(common(console)));
        specs
    }
}

/// `value` unless the environment sets `key`.
fn or_env(key: &str, value: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| value.to_owned())
}

/// A running loop: the stack's addresses, the site, the supervised services.
pub struct Running {
    pub endpoints: Endpoints,
    pub site: LoopSite,
    pub supervisor: Supervisor,
}

/// Stack up, bootstrap (once), every service started and healthy.
pub async fn bring_up(cli: &Globals, args: &UpArgs) -> anyhow::Result<Running> {
    let endpoints = crate::stack_up(
        cli.database_url.as_deref(),
        cli.brokers.as_deref(),
        &cli.state_dir,
        &cli.topic_prefix,
    )
    .await?;
    let endpoints = match &args.fresh_database {
        Some(name) => Endpoints {
            database_url: recreate_database(&endpoints.database_url, name).await?,
            kafka: endpoints.kafka,
        },
        None => endpoints,
    };
    let dir = std::path::absolute(cli.state_dir.join("loop"))?;
    let site = LoopSite {
        endpoints_db: endpoints.database_url.clone(),
        brokers: endpoints.kafka.brokers.clone(),
        topic_prefix: cli.topic_prefix.clone(),
        dir: dir.clone(),
        ports: Ports::from_base(args.port_base),
        pace: args.pace,
        llm_base_url: std::env::var("KALON_LLM_BASE_URL")
            .ok()
            .filter(|u| !u.is_empty()),
        admin_token: args.admin_token.clone(),
        group_prefix: String::new(),
        world_seed: args.world_seed,
        program: kalonctl_program()?,
    };
    let running = start(endpoints, site, args.images).await?;
    if let Some(every) = args.chaos_every_s {
        running
            .supervisor
            .start_chaos(chaos(&cli.state_dir, Duration::from_secs_f64(every)));
    }
    Ok(running)
}

/// Drops the database `name` on `server_url`'s server and makes it anew,
/// migrated; returns its URL.
async fn recreate_database(server_url: &str, name: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "--fresh-database takes a plain name (letters, digits, _), got {name:?}"
    );
    let url = kalon_db::with_database(server_url, name);
    let admin = kalon_db::connect(&kalon_db::with_database(server_url, "postgres"), 1).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&admin)
        .await
        .with_context(|| format!("cannot drop the database {name}"))?;
    admin.close().await;
    crate::migrate(&url).await?;
    Ok(url)
}

/// The kalonctl executable: this one, or the one beside it (when a
/// benchmark program brings the loop up).
pub fn kalonctl_program() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this program's executable")?;
    if me.file_stem().is_some_and(|s| s == "kalonctl") {
        return Ok(me);
    }
    let beside = me.with_file_name("kalonctl");
    anyhow::ensure!(
        beside.is_file(),
        "the services run as `kalonctl serve <service>`, and there is no kalonctl beside {}; \
         build it with the same profile (e.g. `cargo build --release -p kalonctl`)",
        me.display()
    );
    Ok(beside)
}

/// Bootstrap (each step skipped when done) and start the services of `site`.
pub async fn start(endpoints: Endpoints, site: LoopSite, images: usize) -> anyhow::Result<Running> {
    ensure_world_size(&site.world(), images)?;
    crate::search::bootstrap(
        &endpoints,
        &crate::search::BootstrapArgs {
            dir: site.dir.clone(),
            seed: site.world_seed,
            images,
            model_version: "ref-1".into(),
        },
    )
    .await?;
    let supervisor = Supervisor::start(site.services(), &site.dir.join("logs")).await?;
    Ok(Running {
        endpoints,
        site,
        supervisor,
    })
}

/// A world made earlier with another size is not silently reused.
fn ensure_world_size(world: &Path, images: usize) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(world.join("world.json")) else {
        return Ok(());
    };
    let made: serde_json::Value = serde_json::from_str(&text)?;
    if let Some(n) = made.get("images").and_then(|n| n.as_u64()) {
        anyhow::ensure!(
            n as usize == images,
            "{} holds a world of {n} images, not {images}: pass --images {n}, or remove {} (and \
             the models registered from it) to start over",
            world.display(),
            world.parent().unwrap_or(world).display()
        );
    }
    Ok(())
}

/// The chaos mode against the local stack: services killed in turn, the
/// broker and Postgres restarted once each when the stack started them.
pub fn chaos(state_dir: &Path, every: Duration) -> Chaos {
    let root = state_dir.to_owned();
    let broker_root = root.clone();
    let infra: Vec<InfraRestart> = vec![
        (
            "the broker".into(),
            Arc::new(move || kalon_stack::stack::restart_broker(&broker_root)),
        ),
        (
            "postgres".into(),
            Arc::new(move || kalon_stack::stack::restart_postgres(&root)),
        ),
    ];
    Chaos {
        every,
        seed: crate::events::clock_seed(),
        infra,
        spare: vec!["sim-llm".into()],
        max_kills: None,
    }
}

/// `kalonctl up`: bring the loop up, say where everything is, supervise
/// until Ctrl-C.
pub async fn run(cli: &Globals, args: &UpArgs) -> anyhow::Result<()> {
    let running = bring_up(cli, args).await?;
    print_where(&running);
    eprintln!(
        "supervising; Ctrl-C stops every service (the stack stays up: `kalonctl stack down`)"
    );
    let mut since = std::time::Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let stop = kalon_telemetry::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {
                let now = std::time::Instant::now();
                for happening in running.supervisor.happenings_since(since) {
                    eprintln!("{}  {happening}", chrono::Local::now().format("%H:%M:%S"));
                }
                since = now;
            }
        }
    }
    eprintln!("stopping the services");
    running.supervisor.stop().await;
    Ok(())
}

/// The services, their pids and logs, and the URLs to use.
pub fn print_where(running: &Running) {
    let site = &running.site;
    eprintln!("{:<12} {:>8}  log", "service", "pid");
    for s in running.supervisor.status() {
        eprintln!(
            "{:<12} {:>8}  {}",
            s.name,
            s.pid.map_or("-".into(), |p| p.to_string()),
            s.log.display()
        );
    }
    eprintln!(
        "console      {}/\nsearch       {}/v1/search (OpenAPI: {1}/openapi.json)\ncanary admin {}/v1/canary \
         (token: KALON_CANARY_ADMIN_TOKEN)\nLLM/LMM      {}\nDATABASE_URL={}",
        site.console_url(),
        site.search_url(),
        site.admin_url(),
        kalon_db::redact(&site.llm_url()),
        kalon_db::redact(&site.endpoints_db),
    );
}
