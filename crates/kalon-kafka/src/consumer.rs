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
//! [`watch_lag`] measures it periodically and says when the group has made
//! no progress for too long while data waits: a readiness failure.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
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

/// `Auto` made concrete by asking the broker what it is.
pub fn resolve<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    membership: Membership,
) -> Result<Membership> {
    if membership != Membership::Auto {
        return Ok(membership);
    }
    let cluster = consumer
        .client()
        .fetch_cluster_id(Duration::from_secs(30))
        .ok_or(Error::NoClusterId)?;
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
    /// [`take_partitions`]) and starts measuring `group`'s lag over them;
    /// stalled after `stall_after` without movement while messages wait.
    pub fn start<C: ConsumerContext>(
        consumer: &impl Consumer<C>,
        settings: &KafkaSettings,
        group: &str,
        topics: Vec<String>,
        membership: Membership,
        stall_after: Duration,
    ) -> Result<Consuming> {
        let membership = take_partitions(consumer, &topics, membership)?;
        let probe = GroupLag::new(settings, group, topics)?;
        Ok(Consuming {
            membership,
            lag: watch_lag(probe, LAG_EVERY, stall_after),
        })
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
    /// where nothing is committed): grows whenever the group moves.
    pub position: i64,
    pub partitions: usize,
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

    /// Asks the broker for the group's committed offsets and every
    /// partition's watermarks. Blocking.
    pub fn measure(&self) -> Result<Lag> {
        let mut list = TopicPartitionList::new();
        for topic in &self.topics {
            for partition in partitions_of(&self.client, topic)? {
                list.add_partition(topic, partition);
            }
        }
        let committed = self.client.committed_offsets(list, self.timeout)?;
        let mut lag = Lag::default();
        for element in committed.elements() {
            let (low, high) =
                self.client
                    .fetch_watermarks(element.topic(), element.partition(), self.timeout)?;
            // nothing committed: the group starts at the beginning
            // (auto.offset.reset=earliest)
            let position = match element.offset() {
                Offset::Offset(n) => n.clamp(low, high),
                _ => low,
            };
            lag.messages += high - position;
            lag.position += position;
            lag.partitions += 1;
        }
        Ok(lag)
    }
}

/// What a consumer's owner shows on its readiness endpoint and in its logs.
#[derive(Debug, Clone, Default)]
pub struct ConsumerHealth {
    /// The last measurement, if one succeeded.
    pub lag: Option<Lag>,
    /// How long the group has not moved while messages waited.
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
                "stalled: {} messages wait and the group has not moved for {}s",
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

/// Measures `probe` every `every` until the returned [`LagWatch`] is
/// dropped; the group is stalled when messages wait and its position has
/// not moved for `stall_after` (counted from the start, so a consumer that
/// is never assigned anything becomes stalled too).
pub fn watch_lag(probe: GroupLag, every: Duration, stall_after: Duration) -> LagWatch {
    let (tx, rx) = watch::channel(ConsumerHealth::default());
    let probe = std::sync::Arc::new(probe);
    let task = tokio::spawn(async move {
        let mut last_move = Instant::now();
        let mut last_position: Option<i64> = None;
        loop {
            let measured = {
                let probe = probe.clone();
                tokio::task::spawn_blocking(move || probe.measure()).await
            };
            let mut health = tx.borrow().clone();
            match measured {
                Ok(Ok(lag)) => {
                    if lag.messages == 0 || last_position.is_some_and(|p| lag.position > p) {
                        last_move = Instant::now();
                    }
                    last_position = Some(lag.position);
                    health.lag = Some(lag);
                    health.error = None;
                }
                Ok(Err(error)) => health.error = Some(error.to_string()),
                Err(error) => health.error = Some(error.to_string()),
            }
            health.stalled_for = if health.lag.is_some_and(|l| l.messages > 0) {
                last_move.elapsed()
            } else {
                Duration::ZERO
            };
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
