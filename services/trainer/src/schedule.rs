//! The training schedule: a cron expression, and which of its ticks is due.

use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed cron expression (UTC).
#[derive(Debug, Clone)]
pub struct Schedule {
    expression: String,
    cron: cron::Schedule,
}

impl Schedule {
    /// Six or seven fields (`sec min hour day month weekday [year]`), or
    /// crontab's five (`min hour day month weekday`, at second 0).
    pub fn parse(expression: &str) -> anyhow::Result<Schedule> {
        let fields = expression.split_whitespace().count();
        let full = if fields == 5 {
            format!("0 {expression}")
        } else {
            expression.to_owned()
        };
        let cron = cron::Schedule::from_str(&full).map_err(|e| {
            anyhow::anyhow!(
                "schedule {expression:?} is not a cron expression ({e}); e.g. \"0 0 3 * * *\" (03:00 UTC daily) or \"*/30 * * * *\""
            )
        })?;
        Ok(Schedule {
            expression: expression.to_owned(),
            cron,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The latest tick in `(after, now]`, if any: ticks missed while no
    /// trainer ran collapse into one. One step back from `now`, however long
    /// ago `after` was.
    pub fn due(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let just_after_now = now + chrono::Duration::milliseconds(1);
        self.cron
            .after(&just_after_now)
            .next_back()
            .filter(|tick| *tick > after && *tick <= now)
    }

    /// The first tick after `now`.
    pub fn next(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.after(&now).next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_and_six_fields_parse_and_garbage_is_refused_with_an_example() {
        let daily = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(
            daily.next(at("2026-12-07T02:00:00Z")),
            Some(at("2026-12-07T03:00:00Z"))
        );
        Schedule::parse("*/5 * * * * *").unwrap();
        let error = Schedule::parse("every night").unwrap_err().to_string();
        assert!(
            error.contains("not a cron expression") && error.contains("0 0 3"),
            "{error}"
        );
    }

    #[test]
    fn missed_ticks_collapse_into_the_latest() {
        let every_10s = Schedule::parse("*/10 * * * * *").unwrap();
        let start = at("2026-12-07T00:00:00Z");
        assert_eq!(every_10s.due(start, at("2026-12-07T00:00:05Z")), None);
        assert_eq!(
            every_10s.due(start, at("2026-12-07T00:00:35Z")),
            Some(at("2026-12-07T00:00:30Z"))
        );
        // a tick is due once: after it, nothing until the next
        let tick = at("2026-12-07T00:00:30Z");
        assert_eq!(every_10s.due(tick, at("2026-12-07T00:00:39Z")), None);
        assert_eq!(
            every_10s.due(start, tick),
            Some(tick),
            "a tick at now is due"
        );
        // a month of missed ticks of a per-second schedule: one step
        let every_s = Schedule::parse("* * * * * *").unwrap();
        assert_eq!(
            every_s.due(start, at("2027-01-07T00:00:00.5Z")),
            Some(at("2027-01-07T00:00:00Z"))
        );
    }
}
