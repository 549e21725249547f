//! The local stack Kalon starts for itself, natively (no Docker engine on the
//! build machines): PostgreSQL and the tansu Kafka-API broker.
//!
//! - [`tools`]: finds or installs the tansu binary and ONNX Runtime's library
//!   in a cache folder outside the repository (`$KALON_CACHE_DIR`, default
//!   `~/.cache/kalon`).
//! - [`broker`]: a tansu process on 127.0.0.1 with memory or sqlite storage.
//! - [`postgres`]: a private PostgreSQL cluster (initdb/pg_ctl) when none answers.
//! - [`stack`]: `up`, `down`, `status` over both, with state in `.kalon/`.

pub mod broker;
pub mod postgres;
pub mod stack;
pub mod tools;

pub use broker::{Broker, Storage};
pub use postgres::PgCluster;
pub use stack::{StackState, DEFAULT_BROKERS, DEFAULT_DATABASE_URL};

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Whether something accepts TCP connections at `addr`.
pub fn port_open(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .ok()
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// Waits until `addr` accepts connections, or fails after `timeout`.
pub fn wait_for_port(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if port_open(addr) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on {addr} after {timeout:?}")
}

/// A free TCP port on 127.0.0.1 (tests start private servers on them).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}
