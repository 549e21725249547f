//! A tansu broker process on 127.0.0.1.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// Where tansu keeps messages.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Lost when the broker stops; fastest (benchmarks).
    ///
    /// Not for consumers that resume from committed offsets: tansu 0.6's
    /// memory engine answers a fetch that starts inside a record batch with
    /// the next batch, so the rest of that batch is skipped; and it answers
    /// ListOffsets(latest) with the last batch's base offset + 1, so lag
    /// measured against it is wrong.
    Memory,
    /// A SQLite file (relative to the broker's working directory); survives restarts.
    Sqlite(String),
}

impl Storage {
    fn url(&self) -> String {
        match self {
            Storage::Memory => "memory://tansu/".into(),
            Storage::Sqlite(file) => format!("sqlite://{file}"),
        }
    }
}

/// A running tansu broker; killed when dropped unless [`Broker::detach`]ed.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    storage: Storage,
    binary: PathBuf,
}

impl Broker {
    /// Starts tansu on `127.0.0.1:port`, its working directory and log in
    /// `dir`, and waits until it accepts connections.
    pub fn start(binary: &Path, port: u16, storage: Storage, dir: &Path) -> anyhow::Result<Broker> {
        let mut broker = Broker {
            child: None,
            port,
            dir: dir.to_owned(),
            storage,
            binary: binary.to_owned(),
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .context("cannot open the broker log")?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &self.storage.url()])
            .arg("--silent")
            .current_dir(&self.dir)
            // tansu reads these; ours must not leak into it
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("STORAGE_ENGINE")
            // consumers recognise tansu by its default cluster id
            .env_remove("CLUSTER_ID")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("failed to start {}", self.binary.display()))?;
        self.child = Some(child);
        if let Err(error) = crate::wait_for_port(&self.address(), Duration::from_secs(30)) {
            self.kill();
            return Err(error.context(format!(
                "tansu did not come up; see {}",
                self.dir.join("broker.log").display()
            )));
        }
        Ok(())
    }

    /// `127.0.0.1:port`, for `bootstrap.servers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the broker at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts the broker again on the same port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Leaves the process running after this value is dropped.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
