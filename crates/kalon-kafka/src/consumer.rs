//! How Kalon's consumers take their partitions, and how far behind their
//! group is.
//!
//! Membership: with real Kafka a consumer joins its group and the
//! coordinator shares the partitions among the replicas. tansu 0.6 (the
//! local stack's broker) does not reliably hand a crashed member's
//! partitions to its successor: after a kill -9 the new process subscribes
//! and is never assigned anything. [`Membership::Auto`], the default, asks
//! the broker for its cluster id and takes every partition itself on tansu
//! (a single local replica) and joins the group everywhere else.
//!
//! Lag: [`GroupLag`] measures the group's committed offsets against every
//! partition's high watermark, whatever this process holds, so a consumer
//! holding no partitions while data waits reports that data as lag
//! (librdkafka's statistics only cover the partitions it holds).
//! [`watch_lag`] measures it periodically and says when a partition with
//! data waiting has not moved for too long: a readiness failure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{Error, KafkaSettings, Result};

/// The cluster id tansu reports unless started with another one.
pub const TANSU_CLUSTER_ID: &str = "tansu_cluster";

/// How a consumer takes its partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Membership {
    /// `assign-all` when the broker is tansu (cluster id `tansu_cluster`,
    /// the local stack), `group` everywhere else.
    #[default]
    Auto,
    /// Join the consumer group: the coordinator shares the partitions among
    /// the replicas and hands a dead one's partitions to the others.
    Group,
    /// Take every partition of the topics without joining the group
    /// (offsets are still committed under it). One replica only.
    AssignAll,
}

impl Membership {
    /// This membership, or `AssignAll` when the older `--assign-all` flag
    /// was given.
    pub fn or_assign_all(self, assign_all: bool) -> Membership {
        if assign_all {
            Membership::AssignAll
        } else {
            self
        }
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Membership::Auto => "auto",
            Membership::Group => "group",
            Membership::AssignAll => "assign-all",
        })
    }
}

/// How long `Auto` waits for the brokers to say what they are before it
/// gives up (a service may start before its broker).
const RESOLVE_PATIENCE: Duration = Duration::from_secs(300);

/// `Auto` made concrete by asking the broker what it is. Blocking: waits
/// (with a warning every 10 s) while the brokers do not answer, up to five
/// minutes.
pub fn resolve<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    membership: Membership,
) -> Result<Membership> {
    if membership != Membership::Auto {
        return Ok(membership);
    }
    let started = Instant::now();
    let cluster = loop {
        if let Some(cluster) = consumer.client().fetch_cluster_id(Duration::from_secs(10)) {
            break cluster;
        }
        if started.elapsed() >= RESOLVE_PATIENCE {
            return Err(Error::NoClusterId);
        }
        warn!("the brokers do not answer yet; membership auto waits to learn what they are");
    };
    Ok(if cluster == TANSU_CLUSTER_ID {
        Membership::AssignAll
    } else {
        Membership::Group
    })
}

/// Subscribes `consumer` to `topics` or assigns it every partition of them,
/// as `membership` says (`Auto` resolved first); returns the mode taken.
pub fn take_partitions<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topics: &[String],
    membership: Membership,
) -> Result<Membership> {
    let resolved = resolve(consumer, membership)?;
    match resolved {
        Membership::AssignAll => {
            let mut partitions = TopicPartitionList::new();
            for topic in topics {
                for partition in partitions_of(consumer, topic)? {
                    partitions.add_partition_offset(topic, partition, Offset::Stored)?;
                }
            }
            consumer.assign(&partitions)?;
        }
        _ => {
            let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&refs)?;
        }
    }
    let why = match (membership, resolved) {
        (Membership::Auto, Membership::AssignAll) => {
            "auto: the broker is tansu, whose coordinator does not hand a crashed member's partitions over; one replica takes every partition"
        }
        (Membership::Auto, _) => "auto: the broker is not tansu; the group shares the partitions",
        _ => "as configured",
    };
    info!(membership = %resolved, why, "consumer membership");
    Ok(resolved)
}

fn partitions_of<C: ConsumerContext>(consumer: &impl Consumer<C>, topic: &str) -> Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::NoPartitions {
            topic: topic.to_owned(),
        });
    }
    Ok(partitions)
}

/// How often a [`Consuming`] measures its group's lag.
pub const LAG_EVERY: Duration = Duration::from_secs(5);

/// A consumer's partitions taken and its group's lag watched: what every
/// consuming service (ingest, enricher) sets up alike.
pub struct Consuming {
    membership: Membership,
    lag: LagWatch,
}

impl Consuming {
    /// Takes `consumer`'s partitions of `topics` as `membership` says (see
    /// [`take_partitions`], on a blocking thread: it may wait for the
    /// brokers) and starts measuring `group`'s lag over them; stalled after
    /// `stall_after` without movement while messages wait. Hands the
    /// consumer back.
    pub async fn start<K, C>(
        consumer: K,
        settings: &KafkaSettings,
        group: &str,
        topics: Vec<String>,
        membership: Membership,
        stall_after: Duration,
    ) -> Result<(K, Consuming)>
    where
        K: Consumer<C> + Send + 'static,
        C: ConsumerContext + 'static,
    {
        let probe = GroupLag::new(settings, group, topics.clone())?;
        let (consumer, taken) = tokio::task::spawn_blocking(move || {
            let taken = take_partitions(&consumer, &topics, membership);
            (consumer, taken)
        })
        .await
        .map_err(|e| Error::Blocking(e.to_string()))?;
        let consuming = Consuming {
            membership: taken?,
            lag: watch_lag(probe, LAG_EVERY, stall_after),
        };
        Ok((consumer, consuming))
    }

    /// How the partitions were taken (`auto` resolved).
    pub fn membership(&self) -> Membership {
        self.membership
    }

    /// The group's lag and whether it is stalled, measured every
    /// [`LAG_EVERY`] against the broker (not only over the partitions this
    /// process holds).
    pub fn health(&self) -> watch::Receiver<ConsumerHealth> {
        self.lag.health()
    }

    /// Ready or not, and the JSON a service answers on `/readyz`.
    pub fn readiness(&self) -> impl Fn() -> (bool, serde_json::Value) + Send + Sync + 'static {
        readiness_of(self.health(), self.membership)
    }
}

/// Partitions `consumer` holds now (from the group, or all of them with
/// `assign-all`).
pub fn assigned<C: ConsumerContext>(consumer: &impl Consumer<C>) -> usize {
    consumer.assignment().map_or(0, |a| a.count())
}

/// One measurement of a group's lag over a set of topics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Messages between the group's position and the high watermarks,
    /// summed over every partition of the topics.
    pub messages: i64,
    /// The group's positions summed (committed offset, or the low watermark
    /// where nothing is committed).
    pub position: i64,
    pub partitions: usize,
}

impl Lag {
    fn of(partitions: &[PartitionLag]) -> Lag {
        Lag {
            messages: partitions.iter().map(|p| p.messages).sum(),
            position: partitions.iter().map(|p| p.position).sum(),
            partitions: partitions.len(),
        }
    }
}

/// One partition of a [`GroupLag`] measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset, or the low watermark where nothing is
    /// committed (the group starts at the beginning).
    pub position: i64,
    /// Messages between that position and the high watermark.
    pub messages: i64,
}

/// Measures a group's lag with its own client, which never joins the group.
pub struct GroupLag {
    client: BaseConsumer,
    topics: Vec<String>,
    timeout: Duration,
}

impl GroupLag {
    pub fn new(settings: &KafkaSettings, group: &str, topics: Vec<String>) -> Result<GroupLag> {
        let client: BaseConsumer = settings
            .client_config("kalon-lag")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(GroupLag {
            client,
            topics,
            timeout: Duration::from_secs(10),
        })
    }

    /// The group's lag summed over every partition. Blocking.
    pub fn measure(&self) -> Result<Lag> {
        Ok(Lag::of(&self.measure_partitions()?))
    }

    /// Asks the broker for the group's committed offsets and every
    /// partition's watermarks. Blocking.
    pub fn measure_partitions(&self) -> Result<Vec<PartitionLag>> {
        // serve the client's queued events (errors, statistics): it is
        // never polled otherwise
        let _ = self.client.poll(Duration::ZERO);
        let mut list = TopicPartitionList::new();
        for topic in &self.topics {
            for partition in partitions_of(&self.client, topic)? {
                list.add_partition(topic, partition);
            }
        }
        let committed = self.client.committed_offsets(list, self.timeout)?;
        let mut out = Vec::with_capacity(committed.count());
        for element in committed.elements() {
            let (low, high) =
                self.client
                    .fetch_watermarks(element.topic(), element.partition(), self.timeout)?;
            // nothing committed (or only what retention already deleted):
            // the group starts at the beginning (auto.offset.reset=earliest)
            let position = match element.offset() {
                Offset::Offset(n) => n.max(low),
                _ => low,
            };
            out.push(PartitionLag {
                topic: element.topic().to_owned(),
                partition: element.partition(),
                position,
                messages: (high - position).max(0),
            });
        }
        Ok(out)
    }
}

/// What a consumer's owner shows on its readiness endpoint and in its logs.
#[derive(Debug, Clone, Default)]
pub struct ConsumerHealth {
    /// The last measurement, if one succeeded.
    pub lag: Option<Lag>,
    /// The longest time a partition with messages waiting has not moved.
    pub stalled_for: Duration,
    /// Why the last measurement failed, if it did.
    pub error: Option<String>,
    /// Stalled (or unmeasured) for longer than allowed.
    pub stalled: bool,
}

impl ConsumerHealth {
    pub fn ready(&self) -> bool {
        self.lag.is_some() && self.error.is_none() && !self.stalled
    }

    /// A line for a readiness answer.
    pub fn reason(&self) -> String {
        if let Some(error) = &self.error {
            return format!("lag cannot be measured: {error}");
        }
        match self.lag {
            None => "lag not measured yet".into(),
            Some(lag) if self.stalled => format!(
                "stalled: {} messages wait and a partition's committed offset has not moved for {}s",
                lag.messages,
                self.stalled_for.as_secs()
            ),
            Some(lag) => format!("{} messages behind, moving", lag.messages),
        }
    }
}

/// A running [`watch_lag`]; measuring stops when it is dropped.
pub struct LagWatch {
    health: watch::Receiver<ConsumerHealth>,
    task: tokio::task::AbortHandle,
}

impl LagWatch {
    /// The latest figures, updated after every measurement.
    pub fn health(&self) -> watch::Receiver<ConsumerHealth> {
        self.health.clone()
    }
}

impl Drop for LagWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When each partition last moved, to tell a stalled group from a slow one.
struct Movement {
    started: Instant,
    /// Per partition: its last position and when it last moved (or had
    /// nothing waiting).
    seen: HashMap<(String, i32), (i64, Instant)>,
}

impl Movement {
    /// Records a measurement; returns how long the longest-waiting
    /// partition that has messages waiting has not moved (zero when none
    /// waits). A partition seen for the first time counts from the start,
    /// so one that is never consumed becomes stalled too.
    fn update(&mut self, partitions: &[PartitionLag]) -> Duration {
        let now = Instant::now();
        let mut stalled_for = Duration::ZERO;
        for p in partitions {
            let key = (p.topic.clone(), p.partition);
            let entry = self.seen.entry(key).or_insert((p.position, self.started));
            if p.messages == 0 || p.position > entry.0 {
                entry.1 = now;
            }
            entry.0 = p.position;
            if p.messages > 0 {
                stalled_for = stalled_for.max(now - entry.1);
            }
        }
        stalled_for
    }
}

/// Measures `probe` every `every` until the returned [`LagWatch`] is
/// dropped; the group is stalled when a partition has messages waiting and
/// its committed position has not moved for `stall_after` (whatever the
/// other partitions do).
pub fn watch_lag(probe: GroupLag, every: Duration, stall_after: Duration) -> LagWatch {
    let (tx, rx) = watch::channel(ConsumerHealth::default());
    let probe = std::sync::Arc::new(probe);
    let task = tokio::spawn(async move {
        let mut movement = Movement {
            started: Instant::now(),
            seen: HashMap::new(),
        };
        loop {
            let measured = {
                let probe = probe.clone();
                tokio::task::spawn_blocking(move || probe.measure_partitions()).await
            };
            let mut health = tx.borrow().clone();
            match measured {
                Ok(Ok(partitions)) => {
                    health.stalled_for = movement.update(&partitions);
                    health.lag = Some(Lag::of(&partitions));
                    health.error = None;
                }
                Ok(Err(error)) => health.error = Some(error.to_string()),
                Err(error) => health.error = Some(error.to_string()),
            }
            let was_stalled = health.stalled;
            health.stalled = health.stalled_for >= stall_after;
            if health.stalled && !was_stalled {
                warn!(reason = %health.reason(), "consumer group stalled; readiness fails until it moves");
            } else if was_stalled && !health.stalled {
                info!("consumer group moving again");
            }
            if tx.send(health).is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    LagWatch {
        health: rx,
        task: task.abort_handle(),
    }
}

/// A consumer service's readiness: ready or not, and the JSON it answers
/// on `/readyz` (membership, lag, how long stalled, why).
fn readiness_of(
    health: watch::Receiver<ConsumerHealth>,
    membership: Membership,
) -> impl Fn() -> (bool, serde_json::Value) + Send + Sync + 'static {
    move || {
        let health = health.borrow();
        let body = serde_json::json!({
            "ready": health.ready(),
            "reason": health.reason(),
            "membership": membership.to_string(),
            "lag": health.lag.map(|l| l.messages),
            "partitions": health.lag.map(|l| l.partitions),
            "stalled_for_s": health.stalled_for.as_secs(),
        });
        (health.ready(), body)
    }
}

/// A consumer of `group` with the settings every Kalon service reads with:
/// offsets committed only by the service (never automatically, never stored
/// by the client on its own), the earliest offset when the group has none,
/// a 10 s session with 1 s heartbeats, and `instance_id` as static
/// membership when given. Hand it to [`Consuming::start`].
pub fn group_consumer(
    settings: &KafkaSettings,
    client_id: &str,
    group: &str,
    instance_id: Option<&str>,
) -> Result<StreamConsumer> {
    let mut config = settings.client_config(client_id);
    if let Some(instance) = instance_id {
        config.set("group.instance.id", instance);
    }
    Ok(config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "100")
        .create()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(partition: i32, position: i64, messages: i64) -> PartitionLag {
        PartitionLag {
            topic: "t".into(),
            partition,
            position,
            messages,
        }
    }

    #[test]
    fn one_stuck_partition_is_a_stall_while_the_others_move() {
        let started = Instant::now() - Duration::from_secs(100);
        let mut movement = Movement {
            started,
            seen: HashMap::new(),
        };
        // partition 0 moves between measurements, partition 1 never does
        movement.update(&[partition(0, 10, 5), partition(1, 3, 7)]);
        let stalled = movement.update(&[partition(0, 15, 5), partition(1, 3, 7)]);
        assert!(stalled >= Duration::from_secs(100), "{stalled:?}");
        // the stuck one catches up: nothing waits, no stall
        let stalled = movement.update(&[partition(0, 20, 0), partition(1, 10, 0)]);
        assert_eq!(stalled, Duration::ZERO);
    }

    #[test]
    fn a_moving_or_drained_group_is_not_stalled() {
        let mut movement = Movement {
            started: Instant::now() - Duration::from_secs(100),
            seen: HashMap::new(),
        };
        movement.update(&[partition(0, 10, 5)]);
        // moved since the last measurement: counts from now
        let stalled = movement.update(&[partition(0, 12, 3)]);
        assert!(stalled < Duration::from_secs(1), "{stalled:?}");
        // later messages wait again but the partition has not moved since
        // it last moved a moment ago: not yet stalled
        let stalled = movement.update(&[partition(0, 12, 9)]);
        assert!(stalled < Duration::from_secs(1), "{stalled:?}");
    }
}
