//! The `QUOTA_REFRESH_PERIOD` schedule: `hourly`, `daily`, or a 5- or 6-field cron expression
//! (seconds first when 6), evaluated in the server's local time as the original did.

use chrono::{DateTime, Local};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use crate::config::ConfigError;

/// When quotas refresh.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    /// The expression as the operator wrote it (for logs and messages).
    pub source: String,
}

impl Schedule {
    /// Parses `QUOTA_REFRESH_PERIOD`; `Ok(None)` when it is empty (quotas never refresh).
    pub fn parse(value: &str) -> Result<Option<Schedule>, ConfigError> {
        let v = value.trim();
        let pattern = match v.to_ascii_lowercase().as_str() {
            "" => return Ok(None),
            "hourly" => "0 * * * *".to_string(),
            "daily" => "0 0 * * *".to_string(),
            _ => v.to_string(),
        };
        let fields = pattern.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(invalid(
                value,
                &format!("it has {fields} fields, a cron expression needs 5 or 6"),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&pattern)
            .map_err(|e| invalid(value, &e.to_string()))?;
        let schedule = Schedule {
            cron,
            source: v.to_string(),
        };
        // A valid expression that never matches (e.g. February 30th) is an error too.
        if schedule.next_after(Local::now()).is_none() {
            return Err(invalid(value, "it never matches any date"));
        }
        Ok(Some(schedule))
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Local>) -> Option<DateTime<Local>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }
}

fn invalid(value: &str, why: &str) -> ConfigError {
    ConfigError(format!(
        "QUOTA_REFRESH_PERIOD={value:?} is not valid ({why}); use hourly, daily, or a cron \
         expression with 5 fields (minute hour day month weekday) or 6 (seconds first), e.g. \
         \"0 0 * * *\", or leave it empty to never refresh"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Local> {
        Local
            .with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("unambiguous local time")
    }

    #[test]
    fn named_periods_and_cron() {
        assert!(Schedule::parse("").expect("ok").is_none());
        assert!(Schedule::parse("  ").expect("ok").is_none());
        let hourly = Schedule::parse("hourly").expect("ok").expect("some");
        assert_eq!(
            hourly.next_after(at(2026, 3, 10, 10, 15, 0)),
            Some(at(2026, 3, 10, 11, 0, 0))
        );
        let daily = Schedule::parse("Daily").expect("ok").expect("some");
        assert_eq!(
            daily.next_after(at(2026, 3, 10, 10, 15, 0)),
            Some(at(2026, 3, 11, 0, 0, 0))
        );
        let five = Schedule::parse("30 6 * * 1").expect("ok").expect("some");
        // 2026-03-10 is a Tuesday; the next Monday is the 16th.
        assert_eq!(
            five.next_after(at(2026, 3, 10, 10, 15, 0)),
            Some(at(2026, 3, 16, 6, 30, 0))
        );
        let six = Schedule::parse("*/20 * * * * *")
            .expect("ok")
            .expect("some");
        assert_eq!(
            six.next_after(at(2026, 3, 10, 10, 15, 5)),
            Some(at(2026, 3, 10, 10, 15, 20))
        );
    }

    #[test]
    fn invalid_values_name_the_variable() {
        for bad in [
            "weekly",
            "* * *",
            "61 * * * *",
            "0 0 30 2 *",
            "* * * * * * *",
            "0 0 * * * 2030",
        ] {
            let e = Schedule::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("QUOTA_REFRESH_PERIOD"), "{e}");
        }
    }
}
