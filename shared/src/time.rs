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

/// Seconds since the Unix epoch from the kernel's coarse clock: the time of the last timer
/// tick (it lags by at most a few milliseconds), read from memory the kernel shares with
/// the process, with no TSC read (which costs tens of nanoseconds in a VM). For checks at
/// one-second granularity on every request's path (mandate expiry).
pub fn coarse_now_secs() -> i64 {
    coarse_now_micros() / 1_000_000
}

/// Microseconds since the Unix epoch from the coarse clock (see [`coarse_now_secs`]).
pub fn coarse_now_micros() -> Micros {
    #[cfg(target_os = "linux")]
    if let Some(ts) = coarse(libc::CLOCK_REALTIME_COARSE) {
        return ts.tv_sec * 1_000_000 + ts.tv_nsec / 1_000;
    }
    now_micros()
}

/// Milliseconds on a monotonic clock, from the kernel's coarse clock like [`coarse_now_secs`]
/// (the time of the last tick): for durations measured on every request's path whose
/// precision need not be finer than a few milliseconds (cache lifetimes, rate-limit refill).
pub fn coarse_monotonic_millis() -> u64 {
    #[cfg(target_os = "linux")]
    if let Some(ts) = coarse(libc::CLOCK_MONOTONIC_COARSE) {
        return ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
    }
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

#[cfg(target_os = "linux")]
fn coarse(clock: libc::clockid_t) -> Option<libc::timespec> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec it is given, which lives on this stack.
    (unsafe { libc::clock_gettime(clock, &mut ts) } == 0).then_some(ts)
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
    fn coarse_clocks_follow_the_precise_ones() {
        let before = now_secs();
        let coarse = coarse_now_secs();
        let after = now_secs();
        // The coarse clock lags by at most a tick: never ahead, at most a second behind.
        assert!(coarse <= after && coarse >= before - 1, "{before} {coarse} {after}");
        let (before, coarse, after) = (now_micros(), coarse_now_micros(), now_micros());
        assert!(
            coarse <= after && coarse >= before - 1_000_000,
            "{before} {coarse} {after}"
        );
        let a = coarse_monotonic_millis();
        std::thread::sleep(Duration::from_millis(30));
        let b = coarse_monotonic_millis();
        assert!(b >= a + 20 && b < a + 5_000, "{a} {b}");
    }

    #[test]
    fn round_trip() {
        let t = 1_700_000_000_123_456;
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("2024-01-02"), Some(1_704_153_600_000_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
