//! Pure checks and derivations of a Branch spec: the point, the expiry, the
//! app identity and the declared roles. No API calls.

use crate::api::{Branch, InitSource, ParentRef};
use crate::compute::secret_suffix;
use crate::storage::Point;

/// A spec problem: a Stalled reason and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

fn invalid(reason: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        message: message.into(),
    }
}

/// The point of the parent's history a child is taken at.
pub fn parse_point(parent: &ParentRef) -> Result<Point, Invalid> {
    crate::point::parse_point(
        "spec.parent.",
        parent.lsn.as_deref(),
        parent.timestamp.as_deref(),
    )
    .map_err(|e| invalid("InvalidPoint", e.to_string()))
}

/// `spec.expiresAt` as a time.
pub fn parse_expires(branch: &Branch) -> Result<Option<jiff::Timestamp>, Invalid> {
    branch
        .spec
        .expires_at
        .as_deref()
        .map(|s| crate::point::parse_time("spec.expiresAt", s))
        .transpose()
        .map_err(|e| invalid("InvalidExpiresAt", e.to_string()))
}

/// Names PostgreSQL would refuse or that collide with the operator's own.
const RESERVED_ROLES: &[&str] = &["postgres", "superuser"];

/// Checks the combination of fields the schema cannot check alone.
pub fn validate_spec(branch: &Branch) -> Result<(), Invalid> {
    if branch.spec.parent.is_none() && branch.spec.init_source == Some(InitSource::SchemaOnly) {
        return Err(invalid(
            "InvalidSpec",
            "spec.initSource schema-only needs spec.parent: the schema is copied from the parent",
        ));
    }
    if let Some(p) = &branch.spec.parent {
        if p.branch == branch.metadata.name.clone().unwrap_or_default() {
            return Err(invalid("InvalidSpec", "a branch cannot be its own parent"));
        }
        if branch.spec.init_source == Some(InitSource::SchemaOnly)
            && (p.lsn.is_some() || p.timestamp.is_some())
        {
            return Err(invalid(
                "InvalidPoint",
                "spec.initSource schema-only copies the parent's current schema; remove spec.parent.lsn/timestamp",
            ));
        }
        parse_point(p)?;
    }
    parse_expires(branch)?;
    if let Some(r) = &branch.spec.refresh {
        if branch.spec.parent.is_none() {
            return Err(invalid(
                "InvalidRefreshSchedule",
                "spec.refresh re-copies the branch from its parent: it needs spec.parent",
            ));
        }
        crate::controller::scheduling::Cadence::cron(&r.schedule, r.time_zone.as_deref()).map_err(
            |e| {
                invalid(
                    "InvalidRefreshSchedule",
                    format!("spec.refresh: {e}; no refresh runs until it is fixed"),
                )
            },
        )?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, r) in branch.spec.roles.iter().enumerate() {
        check_identifier("role", &r.name)?;
        if RESERVED_ROLES.contains(&r.name.as_str()) {
            return Err(invalid(
                "InvalidRole",
                format!(
                    "role {:?} is reserved by the operator; choose another name",
                    r.name
                ),
            ));
        }
        if i > 0 && secret_suffix(&r.name) == "app" {
            return Err(invalid(
                "InvalidRole",
                format!(
                    "role {:?} would share the Secret of the app role; list it first or rename it",
                    r.name
                ),
            ));
        }
        if !seen.insert(secret_suffix(&r.name)) {
            return Err(invalid(
                "InvalidRole",
                format!(
                    "role {:?} is declared twice (or collides after lower-casing)",
                    r.name
                ),
            ));
        }
    }
    for d in &branch.spec.databases {
        check_identifier("database", &d.name)?;
        if let Some(o) = &d.owner {
            check_identifier("database owner", o)?;
        }
    }
    Ok(())
}

fn check_identifier(what: &str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > 63 || s.contains('\0') {
        return Err(invalid(
            "InvalidName",
            format!("{what} name {s:?} must be 1-63 bytes without NUL"),
        ));
    }
    Ok(())
}

/// The application user and database of a branch: the first declared role
/// and database; else the parent's (a child serves the same application);
/// else `postgres`.
pub fn app_identity(branch: &Branch, parent: Option<&Branch>) -> (String, String) {
    let from_parent = parent
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.connection.as_ref());
    let user = branch
        .spec
        .roles
        .first()
        .map(|r| r.name.clone())
        .or_else(|| from_parent.map(|c| c.user.clone()))
        .unwrap_or_else(|| "postgres".into());
    let db = branch
        .spec
        .databases
        .first()
        .map(|d| d.name.clone())
        .or_else(|| from_parent.map(|c| c.database.clone()))
        .unwrap_or_else(|| "postgres".into());
    (user, db)
}

/// A new random password: 32 characters of `[A-Za-z0-9]` (~190 bits).
pub fn generate_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        BranchSpec, BranchStatus, ConnectionStatus, DatabaseSpec, RefreshSpec, RoleSpec,
    };

    fn parent(lsn: Option<&str>, ts: Option<&str>) -> ParentRef {
        ParentRef {
            branch: "main".into(),
            lsn: lsn.map(Into::into),
            timestamp: ts.map(Into::into),
        }
    }

    #[test]
    fn points_parse_or_say_what_is_wrong() {
        assert_eq!(parse_point(&parent(None, None)).unwrap(), Point::Head);
        assert_eq!(
            parse_point(&parent(Some("16/B3733C50"), None)).unwrap(),
            Point::Lsn("16/B3733C50".parse().unwrap())
        );
        assert!(matches!(
            parse_point(&parent(None, Some("2024-05-01T12:00:00Z"))).unwrap(),
            Point::Timestamp(_)
        ));
        let e = parse_point(&parent(Some("zz"), None)).unwrap_err();
        assert_eq!(e.reason, "InvalidPoint");
        assert!(e.message.contains("\"zz\""));
        let e = parse_point(&parent(None, Some("yesterday"))).unwrap_err();
        assert_eq!(e.reason, "InvalidPoint");
        assert!(parse_point(&parent(Some("0/1"), Some("2024-05-01T12:00:00Z"))).is_err());
    }

    fn branch(spec: BranchSpec) -> Branch {
        Branch::new("dev", spec)
    }

    #[test]
    fn spec_checks() {
        let b = branch(BranchSpec {
            init_source: Some(InitSource::SchemaOnly),
            ..Default::default()
        });
        assert_eq!(validate_spec(&b).unwrap_err().reason, "InvalidSpec");
        let b = branch(BranchSpec {
            roles: vec![RoleSpec {
                name: "postgres".into(),
            }],
            ..Default::default()
        });
        assert_eq!(validate_spec(&b).unwrap_err().reason, "InvalidRole");
        let b = branch(BranchSpec {
            roles: vec![
                RoleSpec {
                    name: "shop".into(),
                },
                RoleSpec { name: "APP".into() },
            ],
            ..Default::default()
        });
        assert_eq!(validate_spec(&b).unwrap_err().reason, "InvalidRole");
        let b = branch(BranchSpec {
            expires_at: Some("soon".into()),
            ..Default::default()
        });
        assert_eq!(validate_spec(&b).unwrap_err().reason, "InvalidExpiresAt");
        let refresh = |schedule: &str, tz: Option<&str>| {
            branch(BranchSpec {
                parent: Some(ParentRef {
                    branch: "main".into(),
                    ..Default::default()
                }),
                refresh: Some(RefreshSpec {
                    schedule: schedule.into(),
                    time_zone: tz.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        assert!(validate_spec(&refresh("0 3 * * *", Some("Europe/Paris"))).is_ok());
        let bad = validate_spec(&refresh("every night", None)).unwrap_err();
        assert_eq!(bad.reason, "InvalidRefreshSchedule");
        assert!(bad.message.contains("spec.refresh"), "{}", bad.message);
        let bad = validate_spec(&refresh("0 3 * * *", Some("Mars/Olympus"))).unwrap_err();
        assert_eq!(bad.reason, "InvalidRefreshSchedule");
        assert!(bad.message.contains("Mars/Olympus"), "{}", bad.message);
        let b = branch(BranchSpec {
            roles: vec![
                RoleSpec {
                    name: "shop".into(),
                },
                RoleSpec {
                    name: "reporting_ro".into(),
                },
            ],
            databases: vec![DatabaseSpec {
                name: "shop".into(),
                owner: Some("shop".into()),
            }],
            ..Default::default()
        });
        assert!(validate_spec(&b).is_ok());
        assert_eq!(secret_suffix("reporting_ro"), "reporting-ro");
    }

    #[test]
    fn app_identity_prefers_spec_then_parent() {
        let mut p = branch(BranchSpec::default());
        p.status = Some(BranchStatus {
            connection: Some(ConnectionStatus {
                host: "h".into(),
                port: 5432,
                database: "shop".into(),
                user: "shop".into(),
            }),
            ..Default::default()
        });
        let child = branch(BranchSpec::default());
        assert_eq!(
            app_identity(&child, Some(&p)),
            ("shop".into(), "shop".into())
        );
        assert_eq!(
            app_identity(&child, None),
            ("postgres".into(), "postgres".into())
        );
        let own = branch(BranchSpec {
            roles: vec![RoleSpec { name: "a".into() }],
            databases: vec![DatabaseSpec {
                name: "b".into(),
                owner: None,
            }],
            ..Default::default()
        });
        assert_eq!(app_identity(&own, Some(&p)), ("a".into(), "b".into()));
    }

    #[test]
    fn passwords_are_random_and_long() {
        let a = generate_password();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, generate_password());
    }
}
