//! A process supervisor for Kalon's services on one machine: start them in
//! dependency order and wait until each answers its health check, restart
//! one that exits when nobody asked it to, stop them cleanly in reverse
//! order, write each one's output to its own log file. A chaos mode kills
//! a random service with SIGKILL every few seconds (and restarts the broker
//! and Postgres once each) while the rest keep working.
//!
//! Each service is `kalonctl serve <service>`: the same code as its own
//! binary (kalon-ingest, kalon-search, ...), in its own process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use tokio::process::Command;
use tokio::task::JoinHandle;

/// One service: how to run it and how to tell it is up.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Set on top of the supervisor's own environment.
    pub env: Vec<(String, String)>,
    /// A URL that answers 2xx once the service is up.
    pub health_url: String,
    /// How long the first start may take to become healthy.
    pub start_timeout: Duration,
}

impl ServiceSpec {
    /// `<program> <args>`, e.g. kalonctl's `serve <service>`.
    pub fn new(program: &Path, name: &str, args: &[&str], health_url: String) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            program: program.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            health_url,
            start_timeout: Duration::from_secs(120),
        }
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> ServiceSpec {
        self.env.push((key.to_owned(), value.into()));
        self
    }
}

/// Something the supervisor did or saw, for a live timeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Happening {
    Started { service: String, pid: u32 },
    Healthy { service: String, after: Duration },
    Exited { service: String, status: String },
    ChaosKill { service: String, pid: u32 },
    InfraRestarted { part: String, took: Duration },
    InfraRestartFailed { part: String, error: String },
}

impl std::fmt::Display for Happening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Happening::Started { service, pid } => write!(f, "{service} started (pid {pid})"),
            Happening::Healthy { service, after } => {
                write!(f, "{service} healthy after {:.1}s", after.as_secs_f64())
            }
            Happening::Exited { service, status } => {
                write!(f, "{service} exited ({status}); restarting")
            }
            Happening::ChaosKill { service, pid } => {
                write!(f, "chaos: kill -9 {service} (pid {pid})")
            }
            Happening::InfraRestarted { part, took } => {
                write!(f, "chaos: restarted {part} in {:.1}s", took.as_secs_f64())
            }
            Happening::InfraRestartFailed { part, error } => {
                write!(f, "chaos: could not restart {part}: {error}")
            }
        }
    }
}

struct Supervised {
    spec: ServiceSpec,
    pid: AtomicU32,
    restarts: AtomicU64,
    stopping: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Running services; dropping it without [`Supervisor::stop`] kills them
/// (and they die with the supervisor's process in any case).
pub struct Supervisor {
    log_dir: PathBuf,
    services: Vec<Arc<Supervised>>,
    happenings: Arc<Mutex<Vec<(Instant, Happening)>>>,
    chaos: Mutex<Option<JoinHandle<()>>>,
    http: reqwest::Client,
}

/// One service's figures, for a status table.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub log: PathBuf,
}

/// Restarts of the broker or the database, for the chaos mode: a name and
/// what to call (blocking).
pub type InfraRestart = (String, Arc<dyn Fn() -> anyhow::Result<()> + Send + Sync>);

/// The chaos mode's settings.
#[derive(Clone)]
pub struct Chaos {
    /// A random service is killed with SIGKILL this often.
    pub every: Duration,
    /// The kills go to the services in turn (a shuffled order, each once
    /// per round) rather than independently at random: every service is hit.
    pub seed: u64,
    /// Restarted once each, after the first and the second kill.
    pub infra: Vec<InfraRestart>,
    /// Services never killed (e.g. the simulated LLM, not part of Kalon).
    pub spare: Vec<String>,
    /// Stop after this many kills (None: until stopped).
    pub max_kills: Option<usize>,
}

impl Supervisor {
    /// Starts `specs` in order; each must answer its health check before the
    /// next starts. On failure, stops what started and says which service
    /// failed, with the end of its log.
    pub async fn start(specs: Vec<ServiceSpec>, log_dir: &Path) -> anyhow::Result<Supervisor> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        kalon_telemetry::install_crypto_provider();
        let supervisor = Supervisor {
            log_dir: log_dir.to_owned(),
            services: Vec::new(),
            happenings: Arc::new(Mutex::new(Vec::new())),
            chaos: Mutex::new(None),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
        };
        let mut supervisor = supervisor;
        for spec in specs {
            if let Err(error) = supervisor.add(spec).await {
                supervisor.stop().await;
                return Err(error);
            }
        }
        Ok(supervisor)
    }

    async fn add(&mut self, spec: ServiceSpec) -> anyhow::Result<()> {
        let started = Instant::now();
        let log = self.log_path(&spec.name);
        let supervised = Arc::new(Supervised {
            spec,
            pid: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(keep_running(
            supervised.clone(),
            log.clone(),
            self.happenings.clone(),
        ));
        *supervised.task.lock().expect("not poisoned") = Some(task);
        self.services.push(supervised.clone());
        let spec = &supervised.spec;
        loop {
            if self.healthy(&spec.health_url).await {
                self.note(Happening::Healthy {
                    service: spec.name.clone(),
                    after: started.elapsed(),
                });
                return Ok(());
            }
            if supervised.restarts.load(Ordering::Relaxed) > 0 {
                anyhow::bail!(
                    "{} exited while starting; the end of {}:\n{}",
                    spec.name,
                    log.display(),
                    tail(&log, 20)
                );
            }
            if started.elapsed() > spec.start_timeout {
                anyhow::bail!(
                    "{} did not answer {} within {} s; the end of {}:\n{}",
                    spec.name,
                    spec.health_url,
                    spec.start_timeout.as_secs(),
                    log.display(),
                    tail(&log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether `url` answers 2xx now.
    pub async fn healthy(&self, url: &str) -> bool {
        self.http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    pub fn log_path(&self, service: &str) -> PathBuf {
        self.log_dir.join(format!("{service}.log"))
    }

    fn note(&self, happening: Happening) {
        note(&self.happenings, happening);
    }

    /// What happened since `since` (exits, restarts, chaos).
    pub fn happenings_since(&self, since: Instant) -> Vec<Happening> {
        self.happenings
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, h)| h.clone())
            .collect()
    }

    pub fn status(&self) -> Vec<ServiceStatus> {
        self.services
            .iter()
            .map(|s| ServiceStatus {
                name: s.spec.name.clone(),
                pid: Some(s.pid.load(Ordering::Relaxed)).filter(|&p| p != 0),
                restarts: s.restarts.load(Ordering::Relaxed),
                log: self.log_path(&s.spec.name),
            })
            .collect()
    }

    /// The service's current process id, if it runs.
    pub fn pid(&self, service: &str) -> Option<u32> {
        self.find(service)
            .map(|s| s.pid.load(Ordering::Relaxed))
            .filter(|&p| p != 0)
    }

    fn find(&self, service: &str) -> Option<&Arc<Supervised>> {
        self.services.iter().find(|s| s.spec.name == service)
    }

    /// SIGKILLs the service (it is restarted, as after a crash); returns
    /// the pid killed.
    pub fn kill(&self, service: &str) -> anyhow::Result<u32> {
        let supervised = self
            .find(service)
            .with_context(|| format!("no service {service} here"))?;
        let pid = kill_now(supervised)?;
        self.note(Happening::ChaosKill {
            service: service.to_owned(),
            pid,
        });
        Ok(pid)
    }

    /// Waits until `service` answers its health check again.
    pub async fn wait_healthy(&self, service: &str, timeout: Duration) -> anyhow::Result<()> {
        let supervised = self
            .find(service)
            .with_context(|| format!("no service {service} here"))?;
        let started = Instant::now();
        while !self.healthy(&supervised.spec.health_url).await {
            anyhow::ensure!(
                started.elapsed() < timeout,
                "{service} is not healthy after {} s; see {}",
                timeout.as_secs(),
                self.log_path(service).display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Starts the chaos mode: SIGKILL to the services in turn, every
    /// `chaos.every`, each infra restart once (after the first and the
    /// second kill), until [`Supervisor::stop_chaos`] or `stop`.
    pub fn start_chaos(&self, chaos: Chaos) {
        let services: Vec<Arc<Supervised>> = self
            .services
            .iter()
            .filter(|s| !chaos.spare.contains(&s.spec.name))
            .cloned()
            .collect();
        let happenings = self.happenings.clone();
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(chaos.seed);
            let mut infra = chaos.infra.into_iter();
            let mut order: Vec<usize> = Vec::new();
            let mut kills = 0;
            loop {
                if chaos.max_kills.is_some_and(|max| kills >= max) {
                    return;
                }
                kills += 1;
                tokio::time::sleep(chaos.every).await;
                if services.is_empty() {
                    continue;
                }
                if order.is_empty() {
                    order = (0..services.len()).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.random_range(0..=i));
                    }
                }
                let victim = &services[order.pop().expect("refilled")];
                match kill_now(victim) {
                    Ok(pid) => note(
                        &happenings,
                        Happening::ChaosKill {
                            service: victim.spec.name.clone(),
                            pid,
                        },
                    ),
                    Err(error) => tracing::warn!("chaos: {error:#}"),
                }
                if let Some((part, restart)) = infra.next() {
                    tokio::time::sleep(chaos.every / 2).await;
                    let started = Instant::now();
                    let outcome = tokio::task::spawn_blocking(move || restart()).await;
                    let happening = match outcome {
                        Ok(Ok(())) => Happening::InfraRestarted {
                            part,
                            took: started.elapsed(),
                        },
                        Ok(Err(error)) => Happening::InfraRestartFailed {
                            part,
                            error: format!("{error:#}"),
                        },
                        Err(error) => Happening::InfraRestartFailed {
                            part,
                            error: error.to_string(),
                        },
                    };
                    note(&happenings, happening);
                }
            }
        });
        if let Some(old) = self.chaos.lock().expect("not poisoned").replace(task) {
            old.abort();
        }
    }

    /// Whether the chaos mode still has kills to make.
    pub fn chaos_running(&self) -> bool {
        self.chaos
            .lock()
            .expect("not poisoned")
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }

    pub fn stop_chaos(&self) {
        if let Some(task) = self.chaos.lock().expect("not poisoned").take() {
            task.abort();
        }
    }

    /// Stops every service, last started first: SIGTERM, then SIGKILL after
    /// 30 s.
    pub async fn stop(&self) {
        self.stop_chaos();
        for supervised in self.services.iter().rev() {
            supervised.stopping.store(true, Ordering::SeqCst);
            let pid = supervised.pid.load(Ordering::SeqCst);
            if pid != 0 {
                signal(pid, libc::SIGTERM);
            }
            let task = supervised.task.lock().expect("not poisoned").take();
            if let Some(mut task) = task {
                if tokio::time::timeout(Duration::from_secs(30), &mut task)
                    .await
                    .is_err()
                {
                    let pid = supervised.pid.load(Ordering::SeqCst);
                    if pid != 0 {
                        signal(pid, libc::SIGKILL);
                    }
                    let _ = task.await;
                }
            }
        }
    }

    /// Restarts counted per service.
    pub fn restarts(&self) -> BTreeMap<String, u64> {
        self.services
            .iter()
            .map(|s| (s.spec.name.clone(), s.restarts.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_chaos();
        for supervised in &self.services {
            supervised.stopping.store(true, Ordering::SeqCst);
            let pid = supervised.pid.load(Ordering::SeqCst);
            if pid != 0 {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn note(happenings: &Mutex<Vec<(Instant, Happening)>>, happening: Happening) {
    tracing::debug!("{happening}");
    happenings
        .lock()
        .expect("not poisoned")
        .push((Instant::now(), happening));
}

fn kill_now(supervised: &Supervised) -> anyhow::Result<u32> {
    let pid = supervised.pid.load(Ordering::SeqCst);
    anyhow::ensure!(pid != 0, "{} is not running", supervised.spec.name);
    signal(pid, libc::SIGKILL);
    Ok(pid)
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a pid this supervisor started; no memory involved
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Runs the service until the supervisor stops it: a process that exits
/// (crash, kill) is started again, after a pause that grows while it keeps
/// failing fast (1 s, 2 s, 4 s, up to 10 s).
async fn keep_running(
    supervised: Arc<Supervised>,
    log: PathBuf,
    happenings: Arc<Mutex<Vec<(Instant, Happening)>>>,
) {
    let spec = &supervised.spec;
    let mut pause = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let status = match spawn(spec, &log) {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                supervised.pid.store(pid, Ordering::SeqCst);
                note(
                    &happenings,
                    Happening::Started {
                        service: spec.name.clone(),
                        pid,
                    },
                );
                // a stop that came between the spawn and the store
                if supervised.stopping.load(Ordering::SeqCst) {
                    signal(pid, libc::SIGTERM);
                }
                let status = child.wait().await;
                supervised.pid.store(0, Ordering::SeqCst);
                match status {
                    Ok(status) => describe_exit(status),
                    Err(error) => format!("wait failed: {error}"),
                }
            }
            Err(error) => format!("could not start: {error:#}"),
        };
        if supervised.stopping.load(Ordering::SeqCst) {
            return;
        }
        supervised.restarts.fetch_add(1, Ordering::SeqCst);
        note(
            &happenings,
            Happening::Exited {
                service: spec.name.clone(),
                status,
            },
        );
        pause = if started.elapsed() > Duration::from_secs(30) {
            Duration::from_millis(200)
        } else {
            (pause * 2).min(Duration::from_secs(10))
        };
        tokio::time::sleep(pause).await;
        if supervised.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(9)) => "killed by SIGKILL".into(),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

fn spawn(spec: &ServiceSpec, log: &Path) -> anyhow::Result<tokio::process::Child> {
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        // its own process group: a Ctrl-C in the terminal reaches the
        // supervisor, which stops the services in order
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: prctl is async-signal-safe; the child dies with its parent
    // thread (a tokio worker, alive as long as the supervisor's runtime)
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("cannot start {}", spec.program.display()))
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
