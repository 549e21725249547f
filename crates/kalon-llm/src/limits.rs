//! The client's guards: a token bucket, a circuit breaker and an hourly
//! token budget.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests per second with a burst: each request takes one token; tokens
/// refill at `rate` per second up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        TokenBucket {
            rate,
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is free.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    /// Waits for a token.
    pub async fn take(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else is refused until it reports.
    HalfOpen,
}

/// Stops calling an endpoint that keeps failing: after `threshold`
/// consecutive failures it refuses calls for `cooldown`, then lets one probe
/// through; the probe's success closes it, its failure opens it again.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            threshold,
            cooldown,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    /// May a call go out now? `Err` carries the time until the next probe.
    pub fn allow(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *state = BreakerState::HalfOpen;
                    Ok(())
                } else {
                    Err(until - now)
                }
            }
            BreakerState::HalfOpen => Err(self.cooldown),
        }
    }

    pub fn record(&self, success: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = match (*state, success) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false) if failures + 1 < self.threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (BreakerState::Open { until }, false) => BreakerState::Open { until },
            (_, false) => BreakerState::Open {
                until: Instant::now() + self.cooldown,
            },
        };
    }

    pub fn is_open(&self) -> bool {
        !matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            BreakerState::Closed { .. }
        )
    }
}

/// Tokens spent in the last hour, against a limit (0 = none).
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    window: Duration,
    spent: Mutex<VecDeque<(Instant, u64)>>,
}

impl Budget {
    pub fn new(limit_per_hour: u64) -> Self {
        Budget {
            limit: limit_per_hour,
            window: Duration::from_secs(3600),
            spent: Mutex::new(VecDeque::new()),
        }
    }

    /// Tokens spent within the window.
    pub fn used(&self) -> u64 {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while spent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.window)
        {
            spent.pop_front();
        }
        spent.iter().map(|(_, n)| n).sum()
    }

    /// `Err((used, limit))` when the budget is spent.
    pub fn check(&self) -> Result<(), (u64, u64)> {
        if self.limit == 0 {
            return Ok(());
        }
        let used = self.used();
        if used >= self.limit {
            Err((used, self.limit))
        } else {
            Ok(())
        }
    }

    pub fn spend(&self, tokens: u64) {
        self.spent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((Instant::now(), tokens));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_refills_at_the_rate() {
        let bucket = TokenBucket::new(10.0, 3);
        for _ in 0..3 {
            bucket.try_take().unwrap();
        }
        let wait = bucket.try_take().unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::from_millis(50),
            "{wait:?}"
        );
        std::thread::sleep(Duration::from_millis(110));
        bucket.try_take().unwrap();
        assert!(bucket.try_take().is_err());
    }

    #[test]
    fn breaker_opens_after_threshold_and_one_probe_decides() {
        let breaker = CircuitBreaker::new(2, Duration::from_millis(50));
        breaker.record(false);
        assert!(breaker.allow().is_ok(), "one failure keeps it closed");
        breaker.record(false);
        assert!(breaker.allow().is_err(), "two open it");
        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.allow().is_ok(), "the probe goes out");
        assert!(breaker.allow().is_err(), "only one probe");
        breaker.record(false);
        assert!(breaker.allow().is_err(), "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.allow().is_ok());
        breaker.record(true);
        assert!(!breaker.is_open());
        assert!(breaker.allow().is_ok() && breaker.allow().is_ok());
    }

    #[test]
    fn budget_refuses_once_spent() {
        let budget = Budget::new(100);
        budget.check().unwrap();
        budget.spend(60);
        budget.check().unwrap();
        budget.spend(40);
        assert_eq!(budget.check(), Err((100, 100)));
        assert!(Budget::new(0).check().is_ok());
    }
}
