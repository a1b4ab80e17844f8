//! Time as the system stores it: signed microseconds since the Unix epoch (portable across
//! Postgres and SQLite, totally ordered, no time-zone ambiguity), rendered as RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub type Micros = i64;

pub fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub fn now_secs() -> i64 {
    now_micros() / 1_000_000
}

pub fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// RFC 3339 in UTC with microsecond precision.
pub fn rfc3339(us: Micros) -> String {
    match jiff::Timestamp::from_microsecond(us) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        Err(_) => us.to_string(),
    }
}

/// Parse RFC 3339 (or a bare date `YYYY-MM-DD`, meaning midnight UTC) into micros.
pub fn parse_rfc3339(s: &str) -> Option<Micros> {
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Some(ts.as_microsecond());
    }
    let date: jiff::civil::Date = s.parse().ok()?;
    let ts = date.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    Some(ts.as_microsecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = 1_700_000_000_123_456;
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("2024-01-02"), Some(1_704_153_600_000_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
