//! Calendar helpers of the schedule and refresh tests.

/// `t` truncated to the minute, as run names show it.
pub fn stamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y%m%d%H%M").to_string()
}

/// The next `hh:mm` UTC strictly after `t`, computed on the calendar.
pub fn next_utc(t: jiff::Timestamp, hour: i8, minute: i8) -> jiff::Timestamp {
    let z = t.to_zoned(jiff::tz::TimeZone::UTC);
    let today = z
        .date()
        .at(hour, minute, 0, 0)
        .to_zoned(jiff::tz::TimeZone::UTC)
        .expect("a valid time");
    let cand = today.timestamp();
    if cand > t {
        cand
    } else {
        cand.checked_add(jiff::SignedDuration::from_hours(24))
            .expect("in range")
    }
}

/// `t` plus `secs` seconds.
pub fn plus(t: jiff::Timestamp, secs: i64) -> jiff::Timestamp {
    t.checked_add(jiff::SignedDuration::from_secs(secs))
        .expect("in range")
}
