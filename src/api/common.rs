//! Types and CEL rules shared by several kinds.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What deleting a Snapshot object does to the stored snapshot: `Delete`
/// (default) removes it, `Retain` keeps it in the storage layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Deleting the object deletes the stored snapshot.
    #[default]
    Delete,
    /// Deleting the object keeps the stored snapshot in the storage layer.
    Retain,
}

// CEL rules used by several kinds. Regular expressions avoid backslashes
// (CEL string escapes) and every string they run on has a `maxLength`, so the
// apiserver's cost estimate stays small.

/// The longest LSN text: `FFFFFFFF/FFFFFFFF`.
pub const LSN_MAX_LEN: u32 = 17;
/// Generous bound for an RFC 3339 timestamp with fractional seconds.
pub const TIMESTAMP_MAX_LEN: u32 = 64;
/// Longest name of an object referenced in the same namespace (DNS label).
pub const REF_NAME_MAX_LEN: u32 = 63;

/// CEL: the value is a PostgreSQL LSN as `pg_current_wal_lsn()` prints it.
pub const RULE_LSN: &str = "self.matches('^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$')";
/// Message of [`RULE_LSN`].
pub const MSG_LSN: &str =
    "must be an LSN such as 16/B3733C50 (two hex numbers of 1 to 8 digits separated by /)";

/// CEL: the value is an RFC 3339 timestamp (`2026-01-02T15:04:05Z`,
/// optional fraction, `Z` or a numeric offset).
pub const RULE_RFC3339: &str = "self.matches('^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)([.][0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$')";
/// Message of [`RULE_RFC3339`].
pub const MSG_RFC3339: &str = "must be an RFC 3339 timestamp such as 2026-01-02T15:04:05Z";

/// CEL: a DNS-1035 label (what a Service name must be): lowercase letters,
/// digits and `-`, starting with a letter, not ending with `-`.
pub const RULE_DNS_LABEL: &str = "self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
/// Message of [`RULE_DNS_LABEL`].
pub const MSG_DNS_LABEL: &str =
    "must consist of lowercase letters, digits and '-', start with a letter and end with a letter or digit";

/// CEL: a standard 5-field cron expression or one of the `@` macros. The
/// controller parses it fully; this catches the obvious mistakes at apply.
pub const RULE_CRON: &str =
    "self.matches('^@(yearly|annually|monthly|weekly|daily|hourly)$') || self.matches('^ *[^ ]+( +[^ ]+){4} *$')";
/// Message of [`RULE_CRON`].
pub const MSG_CRON: &str =
    "must be a cron expression with 5 fields such as '0 2 * * *' (or @daily, @hourly, @weekly, @monthly, @yearly)";

/// CEL: a span such as `30m`, `12h`, `1d` or `4w` (see [`super::parse_span`]).
pub const RULE_SPAN: &str = "self.matches('^[1-9][0-9]{0,5}[smhdw]$')";
/// Message of [`RULE_SPAN`].
pub const MSG_SPAN: &str =
    "must be a positive number followed by one unit: s, m, h, d or w (such as 30m, 12h, 1d, 4w)";
/// Longest span text accepted by [`RULE_SPAN`].
pub const SPAN_MAX_LEN: u32 = 7;

/// CEL (on an object with optional `lsn` and `timestamp`): at most one is set.
pub const RULE_POINT_EXCLUSIVE: &str = "!(has(self.lsn) && has(self.timestamp))";
/// Message of [`RULE_POINT_EXCLUSIVE`].
pub const MSG_POINT_EXCLUSIVE: &str = "lsn and timestamp are mutually exclusive: set at most one";
