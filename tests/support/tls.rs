//! TLS helpers of the operator tests: a client that takes any server
//! certificate (for tests about rows), and `psql` with `sslmode`s for tests
//! about the certificates themselves (tests/operator_tls.rs).

use std::path::Path;

/// TLS when the server offers it (a compute with TLS on accepts nothing
/// else), its certificate not checked: for tests about rows, not about
/// TLS (tests/operator_tls.rs checks the certificates).
pub fn any_tls() -> tokio_postgres_rustls::MakeRustlsConnect {
    pgbranch::storage::tls::unverified_client().expect("a TLS client configuration")
}

/// Runs `psql` with `conninfo` (a libpq connection string or URI) and the
/// password in the environment; `Ok(stdout)` or `Err(stderr)`.
pub fn psql(conninfo: &str, password: &str, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new("psql")
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .output()
        .map_err(|e| format!("running psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Writes `pem` to `dir/name` and returns its path.
pub fn write_pem(dir: &Path, name: &str, pem: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, pem).expect("write a PEM file");
    p.display().to_string()
}
