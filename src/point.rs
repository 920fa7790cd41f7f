//! Points of a timeline's history, and the times that name them, as people
//! and the operator write them: a spec's `lsn` / `timestamp` pair, the
//! command line's `--lsn` / `--timestamp` and `BRANCH@POINT`, and the
//! RFC 3339 times of specs and statuses.
//!
//! The one parser of these for the controllers, local mode and the command
//! line, so a point or a time reads the same everywhere and a bad one is
//! explained in the same words. Callers turn a [`PointError`] into their
//! own error (a `Stalled` reason, a usage error); its text names the field.

use jiff::Timestamp;

use crate::storage::{Lsn, Point};

/// A time shown in messages as an example.
const TIME_EXAMPLE: &str = "2024-05-01T12:00:00Z";
/// An LSN shown in messages as an example.
const LSN_EXAMPLE: &str = "16/B3733C50";

/// Why a point or a time could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    #[error("{field} {text:?} is not an RFC 3339 time like {TIME_EXAMPLE}: {detail}")]
    Time {
        field: String,
        text: String,
        detail: String,
    },
    #[error("{field} {text:?} is not an LSN: expected two hexadecimal numbers separated by '/', like {LSN_EXAMPLE}")]
    Lsn { field: String, text: String },
    #[error("{lsn} and {timestamp} are mutually exclusive; set at most one")]
    Both { lsn: String, timestamp: String },
    #[error("{field} {text:?} is not a point: use head, an LSN like {LSN_EXAMPLE} or an RFC 3339 time like {TIME_EXAMPLE}")]
    Point { field: String, text: String },
}

/// Reads an RFC 3339 time (`2024-05-01T12:00:00Z`, any offset, optional
/// fraction). `field` names it in the error.
pub fn parse_time(field: &str, text: &str) -> Result<Timestamp, PointError> {
    text.parse().map_err(|e: jiff::Error| PointError::Time {
        field: field.to_string(),
        text: text.to_string(),
        detail: e.to_string(),
    })
}

/// Reads a time the operator wrote itself (a status field, an annotation):
/// one it cannot read counts as absent.
pub fn read_time(text: &str) -> Option<Timestamp> {
    parse_time("", text).ok()
}

/// Reads an LSN (`16/B3733C50`). `field` names it in the error.
pub fn parse_lsn(field: &str, text: &str) -> Result<Lsn, PointError> {
    text.parse().map_err(|_| PointError::Lsn {
        field: field.to_string(),
        text: text.to_string(),
    })
}

/// The point of a pair of optional fields named `<fields>lsn` and
/// `<fields>timestamp` (`fields` is their common prefix, such as
/// `spec.parent.` or `--`): an LSN, a time, or the head when neither is set.
pub fn parse_point(
    fields: &str,
    lsn: Option<&str>,
    timestamp: Option<&str>,
) -> Result<Point, PointError> {
    match (lsn, timestamp) {
        (Some(_), Some(_)) => Err(PointError::Both {
            lsn: format!("{fields}lsn"),
            timestamp: format!("{fields}timestamp"),
        }),
        (Some(l), None) => parse_lsn(&format!("{fields}lsn"), l).map(Point::Lsn),
        (None, Some(t)) => parse_time(&format!("{fields}timestamp"), t).map(Point::Timestamp),
        (None, None) => Ok(Point::Head),
    }
}

/// A point written as one word: `head`, an LSN or an RFC 3339 time.
/// `field` names it in the error.
pub fn parse_point_word(field: &str, text: &str) -> Result<Point, PointError> {
    if text == "head" {
        return Ok(Point::Head);
    }
    if let Ok(l) = text.parse::<Lsn>() {
        return Ok(Point::Lsn(l));
    }
    text.parse()
        .map(Point::Timestamp)
        .map_err(|_| PointError::Point {
            field: field.to_string(),
            text: text.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_and_errors_name_the_field() {
        let t = parse_time("spec.expiresAt", "2024-05-01T12:00:00Z").unwrap();
        assert_eq!(t.as_second(), 1_714_564_800);
        // Another offset and a fraction are the same kind of time.
        let t2 = parse_time("x", "2024-05-01T14:00:00.5+02:00").unwrap();
        assert_eq!(t2.as_second(), t.as_second());
        let e = parse_time("spec.expiresAt", "tomorrow").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "spec.expiresAt \"tomorrow\" is not an RFC 3339 time like 2024-05-01T12:00:00Z: "
            ),
            "{msg}"
        );
        // A date alone is not an instant.
        assert!(parse_time("t", "2024-05-01").is_err());
    }

    #[test]
    fn a_pair_of_fields_gives_head_an_lsn_or_a_time() {
        assert_eq!(parse_point("spec.", None, None).unwrap(), Point::Head);
        assert_eq!(
            parse_point("spec.", Some("16/B3733C50"), None).unwrap(),
            Point::Lsn(Lsn(0x16_B373_3C50))
        );
        assert_eq!(
            parse_point("spec.", None, Some("2024-05-01T12:00:00Z")).unwrap(),
            Point::Timestamp(parse_time("t", "2024-05-01T12:00:00Z").unwrap())
        );
    }

    #[test]
    fn a_bad_pair_says_which_field_is_wrong() {
        let e = parse_point("spec.parent.", Some("zz"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.parent.lsn \"zz\" is not an LSN: expected two hexadecimal numbers separated by '/', like 16/B3733C50"
        );
        let e = parse_point("--", None, Some("yesterday")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--timestamp \"yesterday\" is not an RFC 3339 time"),
            "{e}"
        );
        let e = parse_point("spec.source.", Some("0/1"), Some("2024-05-01T12:00:00Z")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.source.lsn and spec.source.timestamp are mutually exclusive; set at most one"
        );
    }

    #[test]
    fn a_point_word_is_head_an_lsn_or_a_time() {
        assert_eq!(parse_point_word("p", "head").unwrap(), Point::Head);
        assert_eq!(
            parse_point_word("p", "0/16B3740").unwrap(),
            Point::Lsn(Lsn(0x16B_3740))
        );
        assert!(matches!(
            parse_point_word("p", "2026-11-26T21:00:00Z").unwrap(),
            Point::Timestamp(_)
        ));
        let e = parse_point_word("--source", "yesterday").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--source \"yesterday\" is not a point: use head, an LSN like 16/B3733C50 or an RFC 3339 time like 2024-05-01T12:00:00Z"
        );
    }
}
