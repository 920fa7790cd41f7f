//! Object names and spans: the pure checks behind the schema's name rules,
//! and the names the operator derives from a Branch's name.

use std::time::Duration;

/// The longest Branch name. A branch's name gets suffixes: its Deployment
/// `<name>-<timeline16>` (17 more), a read replica's Deployment
/// `<name>-<timeline8>-r<n>` (13 more at most) and a restore's default backup branch
/// `<name>-old-<yyyymmddhhmmss>` (19 more), and the results must stay valid
/// DNS labels (63 characters). The CRD enforces this limit with a rule on
/// `metadata.name`.
pub const MAX_BRANCH_NAME_LEN: usize = 44;

/// The longest DNS label (Service names, label values).
pub const MAX_DNS_LABEL_LEN: usize = 63;

/// Why a name cannot be a Branch name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name {name:?} has {len} characters; at most {max} are allowed")]
    TooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error(
        "name {0:?} must consist of lowercase letters, digits and '-', start with a letter and end with a letter or digit"
    )]
    NotDnsLabel(String),
}

/// Checks a Branch name the way the CRD's `metadata.name` rules do: a
/// DNS-1035 label (so `<name>` can be a Service name) of at most
/// [`MAX_BRANCH_NAME_LEN`] characters.
pub fn validate_branch_name(name: &str) -> Result<(), NameError> {
    validate_dns_label(name)?;
    if name.len() > MAX_BRANCH_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.to_string(),
            len: name.len(),
            max: MAX_BRANCH_NAME_LEN,
        });
    }
    Ok(())
}

/// Checks a DNS-1035 label: `[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn validate_dns_label(name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let Some((&first, _)) = bytes.split_first() else {
        return Err(NameError::Empty);
    };
    if name.len() > MAX_DNS_LABEL_LEN {
        return Err(NameError::TooLong {
            name: name.to_string(),
            len: name.len(),
            max: MAX_DNS_LABEL_LEN,
        });
    }
    let ok_inner = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let last = bytes[bytes.len() - 1];
    if !first.is_ascii_lowercase() || !ok_inner || last == b'-' {
        return Err(NameError::NotDnsLabel(name.to_string()));
    }
    Ok(())
}

/// Suffix length of a default backup branch name: `-old-` + 14 digits.
const BACKUP_SUFFIX_LEN: usize = 5 + 14;

/// The default name of the backup branch a restore makes of `target`:
/// `<target>-old-<yyyymmddhhmmss>` (UTC). The target part is shortened when
/// needed so that the result is itself a valid Branch name.
pub fn backup_branch_name(target: &str, at: jiff::Timestamp) -> String {
    let keep = MAX_BRANCH_NAME_LEN - BACKUP_SUFFIX_LEN;
    let mut prefix: &str = &target[..target.len().min(keep)];
    // Names are ASCII when valid; stay on a char boundary anyway.
    while !target.is_char_boundary(prefix.len()) {
        prefix = &prefix[..prefix.len() - 1];
    }
    let prefix = prefix.trim_end_matches('-');
    format!("{prefix}-old-{}", at.strftime("%Y%m%d%H%M%S"))
}

/// Why a span (`12h`, `1d`, `4w`) cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a span: use a positive number and one unit s, m, h, d or w (such as 30m, 12h, 1d, 4w)")]
pub struct SpanError(pub String);

/// Reads a span as `SnapshotSchedule.spec.interval`, `retention.maxAge` and
/// `snapshotTemplate.expiresAfter` accept it (the schema's rule is the same):
/// a positive number of at most 6 digits and one unit, `s`, `m`, `h`, `d`
/// (24 h) or `w` (7 d).
pub fn parse_span(text: &str) -> Result<Duration, SpanError> {
    let err = || SpanError(text.to_string());
    let unit = text.chars().last().ok_or_else(err)?;
    let digits = &text[..text.len() - unit.len_utf8()];
    if digits.is_empty()
        || digits.len() > 6
        || digits.starts_with('0')
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs(n * secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        assert!(validate_branch_name("prod").is_ok());
        assert!(validate_branch_name("a").is_ok());
        assert!(validate_branch_name("dev-2").is_ok());
        assert!(validate_branch_name(&"a".repeat(44)).is_ok());
        assert!(matches!(
            validate_branch_name(&"a".repeat(45)),
            Err(NameError::TooLong { max: 44, .. })
        ));
        assert_eq!(validate_branch_name(""), Err(NameError::Empty));
        for bad in ["2dev", "Dev", "dev-", "dev.x", "dev_x", "-dev"] {
            assert!(
                matches!(validate_branch_name(bad), Err(NameError::NotDnsLabel(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn derived_names_stay_dns_labels() {
        let at: jiff::Timestamp = "2026-03-04T05:06:07Z".parse().unwrap();
        assert_eq!(backup_branch_name("prod", at), "prod-old-20260304050607");
        let long = "a".repeat(MAX_BRANCH_NAME_LEN);
        let backup = backup_branch_name(&long, at);
        assert!(validate_branch_name(&backup).is_ok(), "{backup}");
        assert!(backup.ends_with("-old-20260304050607"));
        // A cut that would end on '-' drops it.
        let dashy = format!("{}-{}", "b".repeat(24), "c".repeat(10));
        let backup = backup_branch_name(&dashy, at);
        assert_eq!(backup, format!("{}-old-20260304050607", "b".repeat(24)));
        // Deployment names `<name>-<timeline16>` fit a DNS label.
        assert!(validate_dns_label(&format!("{long}-{}", "0123456789abcdef")).is_ok());
    }

    #[test]
    fn spans() {
        assert_eq!(parse_span("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_span("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_span("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_span("4w"), Ok(Duration::from_secs(28 * 86_400)));
        for bad in [
            "", "h", "0h", "01h", "1.5h", "1y", "1234567s", "-1h", "1H", "1h30m",
        ] {
            assert!(parse_span(bad).is_err(), "{bad}");
        }
    }
}
