//! A private PostgreSQL cluster, made with the machine's initdb and pg_ctl,
//! for machines where no server answers (and for tests that restart one).
//!
//! PostgreSQL refuses to run as root; when we are root, the cluster belongs
//! to the `postgres` system user and its commands run through `runuser`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context};

/// A cluster in `dir`, listening on 127.0.0.1:`port` (trust auth, local only).
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    stop_on_drop: bool,
}

/// The folder holding initdb and pg_ctl: `$KALON_PG_BIN`, the one on PATH,
/// or the newest under /usr/lib/postgresql.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KALON_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server binaries (initdb, pg_ctl) found; install the postgresql package or set KALON_PG_BIN"
        ),
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl PgCluster {
    /// A cluster in `dir` on `port`, created with initdb when `dir` holds none.
    pub fn open(dir: &Path, port: u16) -> anyhow::Result<PgCluster> {
        let cluster = PgCluster {
            dir: dir.to_owned(),
            port,
            bin: pg_bin_dir()?,
            stop_on_drop: false,
        };
        if !dir.join("PG_VERSION").is_file() {
            cluster.init()?;
        }
        Ok(cluster)
    }

    /// Stop the server when this value is dropped (tests).
    pub fn stop_on_drop(mut self) -> Self {
        self.stop_on_drop = true;
        self
    }

    fn init(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        if running_as_root() {
            // the server user must own the data folder and reach it
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir))?;
            let mut parent = self.dir.parent();
            while let Some(p) = parent {
                if p.metadata().is_ok_and(|m| m.mode() & 0o001 == 0) {
                    let mode = p.metadata()?.mode() | 0o711;
                    std::fs::set_permissions(
                        p,
                        std::os::unix::fs::PermissionsExt::from_mode(mode),
                    )?;
                }
                parent = p.parent();
            }
        }
        let mut initdb = self.command("initdb");
        initdb.arg("-D").arg(&self.dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        ]);
        run(&mut initdb).context("initdb failed")?;
        Ok(())
    }

    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn is_running(&self) -> bool {
        crate::port_open(&format!("127.0.0.1:{}", self.port))
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=on -c max_connections=200",
            self.port
        );
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(&self.dir)
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        run(&mut start).with_context(|| {
            format!(
                "pg_ctl start failed; see {}",
                self.dir.join("server.log").display()
            )
        })?;
        Ok(())
    }

    /// Stops the server (fast mode: open sessions are cut, as in a restart).
    pub fn stop(&self) -> anyhow::Result<()> {
        if !self.dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(&self.dir)
            .args(["-m", "fast", "-w", "stop"]);
        run(&mut stop).context("pg_ctl stop failed")?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.stop_on_drop {
            let _ = self.stop();
        }
    }
}

fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} exited with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}
