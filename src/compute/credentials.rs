//! The credentials Secrets of a branch (`<branch>-app`,
//! `<branch>-superuser`, `<branch>-<role>`): every connection key
//! CloudNativePG and Crunchy users expect, the Service Binding keys, and the
//! one reader of a Secret's value.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::ResourceExt;

use super::names::meta;
use super::{
    desired_replicas, ro_service_name, service_host, ComputeConfig, ComputeError, PG_PORT,
};
use crate::api::{Branch, LABEL_COMPONENT};

/// Credentials of one role, as stored in a Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub user: String,
    pub password: String,
    pub database: String,
}

impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .finish()
    }
}

/// Percent-encodes a URI userinfo or path component (RFC 3986 unreserved
/// characters stay as they are).
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Escapes a `.pgpass` field (`:` and `\`).
fn pgpass_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

/// The connection keys of a credentials Secret for `host` (the Service's DNS
/// name) and its fully qualified form. With `tls` (the computes serve TLS),
/// every URI asks for `sslmode=verify-full` and `sslmode` is a key of its
/// own (the CA is the Secret's `ca.crt`).
pub fn connection_data(
    creds: &RoleCredentials,
    host: &str,
    fqdn_host: &str,
    tls: bool,
) -> BTreeMap<String, String> {
    let port = PG_PORT.to_string();
    let user = uri_escape(&creds.user);
    let pass = uri_escape(&creds.password);
    let db = uri_escape(&creds.database);
    let ssl = if tls { "?sslmode=verify-full" } else { "" };
    let uri = |h: &str| format!("postgresql://{user}:{pass}@{h}:{port}/{db}{ssl}");
    let jdbc_ssl = if tls { "&sslmode=verify-full" } else { "" };
    let jdbc = |h: &str| {
        format!("jdbc:postgresql://{h}:{port}/{db}?password={pass}&user={user}{jdbc_ssl}")
    };
    let mut data = BTreeMap::from([
        ("host".into(), host.to_string()),
        ("port".into(), port.clone()),
        ("dbname".into(), creds.database.clone()),
        ("database".into(), creds.database.clone()),
        ("user".into(), creds.user.clone()),
        ("username".into(), creds.user.clone()),
        ("password".into(), creds.password.clone()),
        ("uri".into(), uri(host)),
        ("jdbc-uri".into(), jdbc(host)),
        ("fqdn-uri".into(), uri(fqdn_host)),
        ("fqdn-jdbc-uri".into(), jdbc(fqdn_host)),
        (
            "pgpass".into(),
            format!(
                "{}:{port}:{}:{}:{}\n",
                pgpass_escape(host),
                pgpass_escape(&creds.database),
                pgpass_escape(&creds.user),
                pgpass_escape(&creds.password)
            ),
        ),
        // Service Binding for Kubernetes (servicebinding.io) well-known keys.
        ("type".into(), "postgresql".into()),
        ("provider".into(), "pgbranch".into()),
    ]);
    if tls {
        data.insert("sslmode".into(), "verify-full".into());
    }
    data
}

/// A credentials Secret of a branch: `name` holds `creds` with every
/// connection key. `annotations` are extra (e.g. the SQL-applied marker).
/// `ca_pem`: the namespace CA when the computes serve TLS, written as
/// `ca.crt` (the URIs then ask for `sslmode=verify-full`).
pub fn build_credentials_secret(
    branch: &Branch,
    name: String,
    creds: &RoleCredentials,
    cfg: &ComputeConfig,
    annotations: BTreeMap<String, String>,
    ca_pem: Option<&str>,
) -> Result<Secret, ComputeError> {
    let branch_name = branch.name_any();
    let namespace = branch
        .namespace()
        .ok_or(ComputeError::MissingMeta("namespace"))?;
    let host = service_host(&branch_name, &namespace);
    let fqdn = format!("{host}.{}", cfg.cluster_domain);
    let mut metadata = meta(
        branch,
        name,
        BTreeMap::from([(LABEL_COMPONENT.to_string(), "credentials".to_string())]),
    )?;
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations);
    }
    let tls = ca_pem.is_some();
    let mut data = connection_data(creds, &host, &fqdn, tls);
    if let Some(ca) = ca_pem {
        data.insert("ca.crt".into(), ca.to_string());
    }
    if desired_replicas(branch).0 > 0 {
        let ro_host = format!("{}.{namespace}.svc", ro_service_name(&branch_name));
        let ro = connection_data(creds, &ro_host, &ro_host, tls);
        data.insert("ro-host".into(), ro_host.clone());
        if let Some(uri) = ro.get("uri") {
            data.insert("ro-uri".into(), uri.clone());
        }
    }
    let data = data
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect();
    Ok(Secret {
        metadata,
        type_: Some("servicebinding.io/postgresql".into()),
        data: Some(data),
        ..Default::default()
    })
}

/// Reads a key of a Secret as UTF-8.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key).cloned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::app_secret_name;
    use crate::compute::fixtures::{branch, cfg, with_replicas};

    #[test]
    fn app_secret_has_every_connection_key() {
        let creds = RoleCredentials {
            user: "app".into(),
            password: "p@ss:w/rd".into(),
            database: "shop".into(),
        };
        let sec = build_credentials_secret(
            &branch("dev"),
            app_secret_name("dev"),
            &creds,
            &cfg(),
            BTreeMap::new(),
            None,
        )
        .unwrap();
        assert_eq!(sec.metadata.name.as_deref(), Some("dev-app"));
        let get = |k: &str| secret_value(&sec, k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(get("host"), "dev.team-a.svc");
        assert_eq!(get("port"), "5432");
        assert_eq!(get("dbname"), "shop");
        assert_eq!(get("user"), "app");
        assert_eq!(get("username"), "app");
        assert_eq!(get("password"), "p@ss:w/rd");
        assert_eq!(
            get("uri"),
            "postgresql://app:p%40ss%3Aw%2Frd@dev.team-a.svc:5432/shop"
        );
        assert_eq!(
            get("fqdn-uri"),
            "postgresql://app:p%40ss%3Aw%2Frd@dev.team-a.svc.cluster.local:5432/shop"
        );
        assert_eq!(
            get("jdbc-uri"),
            "jdbc:postgresql://dev.team-a.svc:5432/shop?password=p%40ss%3Aw%2Frd&user=app"
        );
        assert!(get("fqdn-jdbc-uri")
            .starts_with("jdbc:postgresql://dev.team-a.svc.cluster.local:5432/"));
        assert_eq!(get("pgpass"), "dev.team-a.svc:5432:shop:app:p@ss\\:w/rd\n");
        assert_eq!(get("type"), "postgresql");
        assert_eq!(get("provider"), "pgbranch");
    }

    #[test]
    fn credentials_name_the_ro_service_only_with_replicas() {
        let creds = RoleCredentials {
            user: "app".into(),
            password: "pw".into(),
            database: "shop".into(),
        };
        let mk = |b: &Branch| {
            build_credentials_secret(
                b,
                app_secret_name("dev"),
                &creds,
                &cfg(),
                BTreeMap::new(),
                None,
            )
            .unwrap()
        };
        let sec = mk(&with_replicas("dev", 1));
        assert_eq!(secret_value(&sec, "ro-host").unwrap(), "dev-ro.team-a.svc");
        assert_eq!(
            secret_value(&sec, "ro-uri").unwrap(),
            "postgresql://app:pw@dev-ro.team-a.svc:5432/shop"
        );
        let sec = mk(&branch("dev"));
        assert!(secret_value(&sec, "ro-host").is_none());
    }

    #[test]
    fn with_tls_every_uri_verifies_the_server_and_the_ca_is_there() {
        let creds = RoleCredentials {
            user: "app".into(),
            password: "pw".into(),
            database: "shop".into(),
        };
        let sec = build_credentials_secret(
            &with_replicas("dev", 1),
            app_secret_name("dev"),
            &creds,
            &cfg(),
            BTreeMap::new(),
            Some("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"),
        )
        .unwrap();
        let get = |k: &str| secret_value(&sec, k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(
            get("uri"),
            "postgresql://app:pw@dev.team-a.svc:5432/shop?sslmode=verify-full"
        );
        assert!(get("fqdn-uri").ends_with("svc.cluster.local:5432/shop?sslmode=verify-full"));
        assert_eq!(
            get("jdbc-uri"),
            "jdbc:postgresql://dev.team-a.svc:5432/shop?password=pw&user=app&sslmode=verify-full"
        );
        assert!(get("fqdn-jdbc-uri").ends_with("&sslmode=verify-full"));
        assert!(get("ro-uri").ends_with("?sslmode=verify-full"));
        assert_eq!(get("sslmode"), "verify-full");
        assert!(get("ca.crt").starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
