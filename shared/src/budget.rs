//! Budget windows: calendar windows aligned in the budget's time zone (daily at midnight,
//! weekly on Monday, monthly on the 1st), or rolling windows of a fixed length.

use jiff::{Timestamp, ToSpan, tz::TimeZone};

use crate::store::admin::{Budget, WindowKind};
use crate::time::Micros;

/// `[start, end)` of the window containing `at` (µs). Rolling windows end at `at`.
pub fn window_bounds(b: &Budget, at: Micros) -> (Micros, Micros) {
    calendar_bounds(b.window, &b.window_tz, b.rolling_secs, at)
}

pub fn calendar_bounds(kind: WindowKind, tz: &str, rolling_secs: Option<i64>, at: Micros) -> (Micros, Micros) {
    if kind == WindowKind::Rolling {
        let len = rolling_secs.unwrap_or(86_400) * 1_000_000;
        return (at - len, at);
    }
    let tz = TimeZone::get(tz).unwrap_or(TimeZone::UTC);
    let Ok(ts) = Timestamp::from_microsecond(at) else {
        return (at, at);
    };
    let z = ts.to_zoned(tz.clone());
    let date = z.date();
    let start_date = match kind {
        WindowKind::Daily => date,
        WindowKind::Weekly => {
            let back = i64::from(date.weekday().to_monday_zero_offset());
            date.checked_sub(back.days()).unwrap_or(date)
        }
        WindowKind::Monthly => date.first_of_month(),
        WindowKind::Rolling => unreachable!(),
    };
    let end_date = match kind {
        WindowKind::Daily => start_date.checked_add(1.day()),
        WindowKind::Weekly => start_date.checked_add(7.days()),
        WindowKind::Monthly => start_date.checked_add(1.month()),
        WindowKind::Rolling => unreachable!(),
    }
    .unwrap_or(start_date);
    let to_us = |d: jiff::civil::Date| {
        d.to_zoned(tz.clone())
            .map(|z| z.timestamp().as_microsecond())
            .unwrap_or(at)
    };
    (to_us(start_date), to_us(end_date))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Micros {
        s.parse::<Timestamp>().unwrap().as_microsecond()
    }

    #[test]
    fn calendar_windows_align_in_their_time_zone() {
        // 2026-11-22 is a Sunday. 23:30 UTC is already Monday in Paris.
        let at = t("2026-11-22T23:30:00Z");
        assert_eq!(
            calendar_bounds(WindowKind::Daily, "UTC", None, at),
            (t("2026-11-22T00:00:00Z"), t("2026-11-23T00:00:00Z"))
        );
        assert_eq!(
            calendar_bounds(WindowKind::Daily, "Europe/Paris", None, at),
            (t("2026-11-22T23:00:00Z"), t("2026-11-23T23:00:00Z"))
        );
        assert_eq!(
            calendar_bounds(WindowKind::Weekly, "UTC", None, at),
            (t("2026-11-16T00:00:00Z"), t("2026-11-23T00:00:00Z"))
        );
        assert_eq!(
            calendar_bounds(WindowKind::Weekly, "Europe/Paris", None, at),
            (t("2026-11-22T23:00:00Z"), t("2026-11-29T23:00:00Z"))
        );
        assert_eq!(
            calendar_bounds(WindowKind::Monthly, "UTC", None, at),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            calendar_bounds(WindowKind::Rolling, "UTC", Some(3600), at),
            (at - 3_600_000_000, at)
        );
    }
}
