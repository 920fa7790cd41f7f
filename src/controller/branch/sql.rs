//! What the operator does inside a branch's PostgreSQL once its compute is
//! up: take over the superuser (new password for a child), set the app and
//! declared roles' passwords from the branch's Secrets, create declared
//! databases. Every statement is idempotent; identifiers are quoted; no
//! password is logged (the session also turns statement logging off).

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::controller::Error;

/// Everything the SQL step needs. Passwords are already stored in Secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct SqlPlan {
    pub host: String,
    pub port: u16,
    /// The branch's own superuser password (its Secret).
    pub superuser_password: String,
    /// Passwords the data may still carry (the parent's, for a byte copy),
    /// tried after the branch's own.
    pub fallback_passwords: Vec<String>,
    /// `(role, password)`: login roles to create or update.
    pub roles: Vec<(String, String)>,
    /// `(database, owner)`: databases to create.
    pub databases: Vec<(String, Option<String>)>,
    /// Remove the password of every other login role (a child's copy of its
    /// parent's users must not keep the parent's passwords).
    pub reset_other_logins: bool,
}

impl std::fmt::Debug for SqlPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlPlan")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "roles",
                &self.roles.iter().map(|r| &r.0).collect::<Vec<_>>(),
            )
            .field("databases", &self.databases)
            .finish_non_exhaustive()
    }
}

/// What happened, for logs and events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqlReport {
    /// The superuser password was changed away from an inherited one.
    pub rotated_superuser: bool,
    pub roles_created: Vec<String>,
    pub databases_created: Vec<String>,
    /// Login roles whose copied password was removed.
    pub passwords_removed: Vec<String>,
}

/// `"ident"` with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'literal'` with embedded quotes doubled (standard_conforming_strings).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn sql_err(e: tokio_postgres::Error) -> Error {
    // The Display of a tokio_postgres error never includes statement text.
    Error::Sql(match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    })
}

fn is_auth_failure(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    )
}

async fn connect(
    host: &str,
    port: u16,
    password: &str,
    timeout: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host)
        .port(port)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .application_name("pgbranch-operator")
        .connect_timeout(timeout);
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Logs in as `postgres` with the branch's password, else a fallback one,
/// and moves the superuser to the branch's password.
async fn superuser_session(plan: &SqlPlan, timeout: Duration) -> Result<(Client, bool), Error> {
    let mut last: Option<tokio_postgres::Error> = None;
    let candidates =
        std::iter::once(&plan.superuser_password).chain(plan.fallback_passwords.iter());
    for (i, pw) in candidates.enumerate() {
        match connect(&plan.host, plan.port, pw, timeout).await {
            Ok(c) => {
                c.batch_execute("SET log_statement = 'none'")
                    .await
                    .map_err(sql_err)?;
                let rotated = i > 0 && *pw != plan.superuser_password;
                if rotated {
                    tracing::info!(host = %plan.host, "setting the branch's own superuser password");
                    c.batch_execute(&format!(
                        "ALTER ROLE postgres WITH PASSWORD {}",
                        quote_literal(&plan.superuser_password)
                    ))
                    .await
                    .map_err(sql_err)?;
                }
                return Ok((c, rotated));
            }
            Err(e) if is_auth_failure(&e) => last = Some(e),
            Err(e) => return Err(sql_err(e)),
        }
    }
    Err(Error::stalled(
        "CredentialsRejected",
        format!(
            "PostgreSQL refused the superuser password of the branch's Secret and its parent's ({}); restore the Secret's password or reset it in the database",
            last.map(|e| e.code().map(|c| c.code().to_string()).unwrap_or_default())
                .unwrap_or_default()
        ),
    ))
}

/// Runs the plan.
pub async fn apply(plan: &SqlPlan, timeout: Duration) -> Result<SqlReport, Error> {
    let (client, rotated) = superuser_session(plan, timeout).await?;
    let mut report = SqlReport {
        rotated_superuser: rotated,
        ..Default::default()
    };
    for (role, password) in &plan.roles {
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[role])
            .await
            .map_err(sql_err)?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        client
            .batch_execute(&format!(
                "{verb} ROLE {} WITH LOGIN PASSWORD {}",
                quote_ident(role),
                quote_literal(password)
            ))
            .await
            .map_err(sql_err)?;
        if !exists {
            report.roles_created.push(role.clone());
        }
    }
    if plan.reset_other_logins {
        let keep: Vec<String> = plan
            .roles
            .iter()
            .map(|r| r.0.clone())
            .chain(std::iter::once("postgres".to_string()))
            .collect();
        let rows = client
            .query(
                "SELECT rolname::text FROM pg_authid \
                 WHERE rolcanlogin AND rolpassword IS NOT NULL AND NOT (rolname = ANY($1))",
                &[&keep],
            )
            .await
            .map_err(sql_err)?;
        for r in rows {
            let role: String = r.get(0);
            client
                .batch_execute(&format!(
                    "ALTER ROLE {} WITH PASSWORD NULL",
                    quote_ident(&role)
                ))
                .await
                .map_err(sql_err)?;
            report.passwords_removed.push(role);
        }
    }
    for (db, owner) in &plan.databases {
        let current_owner: Option<String> = client
            .query_opt(
                "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
                &[db],
            )
            .await
            .map_err(sql_err)?
            .map(|r| r.get(0));
        match (current_owner, owner) {
            (None, _) => {
                let owner_clause = owner
                    .as_ref()
                    .map(|o| format!(" OWNER {}", quote_ident(o)))
                    .unwrap_or_default();
                client
                    .batch_execute(&format!(
                        "CREATE DATABASE {}{owner_clause}",
                        quote_ident(db)
                    ))
                    .await
                    .map_err(sql_err)?;
                report.databases_created.push(db.clone());
            }
            (Some(cur), Some(want)) if cur != *want => {
                client
                    .batch_execute(&format!(
                        "ALTER DATABASE {} OWNER TO {}",
                        quote_ident(db),
                        quote_ident(want)
                    ))
                    .await
                    .map_err(sql_err)?;
            }
            _ => {}
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_neutralises_injection() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_literal("x'; DROP TABLE t; --"),
            "'x''; DROP TABLE t; --'"
        );
    }

    #[test]
    fn plan_debug_hides_passwords() {
        let p = SqlPlan {
            host: "h".into(),
            port: 1,
            superuser_password: "supersecret".into(),
            fallback_passwords: vec!["parentsecret".into()],
            roles: vec![("app".into(), "appsecret".into())],
            databases: vec![],
            reset_other_logins: true,
        };
        let s = format!("{p:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("app"));
    }
}
