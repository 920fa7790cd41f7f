//! What the operator does inside a branch's PostgreSQL once its compute is
//! up: take over the superuser (new password for a child), set the app and
//! declared roles' passwords from the branch's Secrets, create declared
//! databases, and drop the roles it made for this branch that are no longer
//! declared. Every statement is idempotent; identifiers are quoted; no
//! password is logged (the session also turns statement logging off).
//!
//! The roles a branch manages carry the comment `pgbranch.dev/branch
//! <uid>` (its UID): a role removed from `spec.roles` is dropped, or, when
//! it still owns objects or holds privileges somewhere (PostgreSQL refuses
//! to drop it), made `NOLOGIN` without a password and reported. Roles a
//! branch inherited in its copy of another branch's data carry that
//! branch's UID (or none) and are left alone.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::controller::tls::{connector, ClientTls, Served};
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
    /// The owning branch's UID: `roles` are tagged as its own, and roles
    /// tagged as its own that `roles` no longer lists are dropped (`None`:
    /// neither).
    pub manage_roles_of: Option<String>,
    /// TLS to the compute (`None`: compute TLS is off).
    pub tls: Option<ClientTls>,
}

/// The comment that marks a role as managed for the branch `uid`.
pub fn role_tag(uid: &str) -> String {
    format!("pgbranch.dev/branch {uid}")
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
    /// Roles removed from the spec and dropped.
    pub roles_dropped: Vec<String>,
    /// Roles removed from the spec that still own objects or hold
    /// privileges: `NOLOGIN` now, with PostgreSQL's reason.
    pub roles_retained: Vec<(String, String)>,
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

/// Connects as `postgres`. With `tls`, over TLS only (`sslmode=require`
/// and the certificate verified against `tls.ca_pem` under
/// `tls.server_name`, whatever address `host` is); the certificate the
/// server presented is in the returned [`Served`].
async fn connect(
    host: &str,
    port: u16,
    password: &str,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> Result<(Client, Served), ConnectError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.port(port)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .application_name("pgbranch-operator")
        .connect_timeout(timeout);
    fn spawn<F>(conn: F)
    where
        F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
    {
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
    }
    match tls {
        None => {
            cfg.host(host);
            let (client, conn) = cfg.connect(NoTls).await?;
            spawn(conn);
            Ok((client, Served::default()))
        }
        Some(tls) => {
            // The certificate names the Service: an address the resolver
            // found is connected to under that name (libpq's `hostaddr`);
            // a DNS name (the Service's, in a cluster) is the name itself.
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) => cfg.host(&tls.server_name).hostaddr(ip),
                Err(_) => cfg.host(host),
            };
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (make, served) = connector(&tls.ca_pem).map_err(ConnectError::Setup)?;
            let (client, conn) = cfg.connect(make).await?;
            spawn(conn);
            Ok((client, served))
        }
    }
}

/// Why a connection failed: its set-up, or postgres.
#[derive(Debug)]
enum ConnectError {
    Setup(Error),
    Pg(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for ConnectError {
    fn from(e: tokio_postgres::Error) -> Self {
        ConnectError::Pg(e)
    }
}

/// A superuser session to a compute (see [`connect`]) and the certificate
/// it served.
pub async fn connect_superuser(
    host: &str,
    port: u16,
    password: &str,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> Result<(Client, Served), Error> {
    match connect(host, port, password, tls, timeout).await {
        Ok(c) => Ok(c),
        Err(ConnectError::Setup(e)) => Err(e),
        Err(ConnectError::Pg(e)) => Err(sql_err(e)),
    }
}

/// Logs in as `postgres` with the branch's password, else a fallback one,
/// and moves the superuser to the branch's password.
async fn superuser_session(plan: &SqlPlan, timeout: Duration) -> Result<(Client, bool), Error> {
    let mut last: Option<tokio_postgres::Error> = None;
    let candidates =
        std::iter::once(&plan.superuser_password).chain(plan.fallback_passwords.iter());
    for (i, pw) in candidates.enumerate() {
        match connect(&plan.host, plan.port, pw, plan.tls.as_ref(), timeout).await {
            Ok((c, _)) => {
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
            Err(ConnectError::Pg(e)) if is_auth_failure(&e) => last = Some(e),
            Err(ConnectError::Pg(e)) => return Err(sql_err(e)),
            Err(ConnectError::Setup(e)) => return Err(e),
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
    if let Some(uid) = &plan.manage_roles_of {
        manage_roles(&client, plan, uid, &mut report).await?;
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

/// Tags the declared roles as the branch's, then drops (or disables) the
/// roles tagged as the branch's that are no longer declared.
async fn manage_roles(
    client: &Client,
    plan: &SqlPlan,
    uid: &str,
    report: &mut SqlReport,
) -> Result<(), Error> {
    let tag = role_tag(uid);
    for (role, _) in &plan.roles {
        client
            .batch_execute(&format!(
                "COMMENT ON ROLE {} IS {}",
                quote_ident(role),
                quote_literal(&tag)
            ))
            .await
            .map_err(sql_err)?;
    }
    let declared: Vec<String> = plan.roles.iter().map(|r| r.0.clone()).collect();
    let rows = client
        .query(
            "SELECT r.rolname::text FROM pg_roles r \
             JOIN pg_shdescription d ON d.objoid = r.oid AND d.classoid = 'pg_authid'::regclass \
             WHERE d.description = $1 AND NOT (r.rolname = ANY($2)) AND r.rolname <> 'postgres' \
             ORDER BY 1",
            &[&tag, &declared],
        )
        .await
        .map_err(sql_err)?;
    for r in rows {
        let role: String = r.get(0);
        match client
            .batch_execute(&format!("DROP ROLE {}", quote_ident(&role)))
            .await
        {
            Ok(()) => report.roles_dropped.push(role),
            Err(e) if e.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST) => {
                let why = e
                    .as_db_error()
                    .map(|d| {
                        let detail = d.detail().unwrap_or_default().replace('\n', "; ");
                        format!("{} ({detail})", d.message())
                    })
                    .unwrap_or_else(|| e.to_string());
                client
                    .batch_execute(&format!(
                        "ALTER ROLE {} WITH NOLOGIN PASSWORD NULL",
                        quote_ident(&role)
                    ))
                    .await
                    .map_err(sql_err)?;
                report.roles_retained.push((role, why));
            }
            Err(e) => return Err(sql_err(e)),
        }
    }
    Ok(())
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
            manage_roles_of: None,
            tls: None,
        };
        let s = format!("{p:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("app"));
    }
}
