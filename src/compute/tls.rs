//! TLS of the computes, as pure functions: the namespace CA (Secret
//! `pgbranch-ca`), the server certificate of a branch (Secret
//! `<branch>-tls`) and the names it covers, when it is due for renewal,
//! the `pg_hba.conf` a TLS compute runs with and the postgres settings that
//! turn TLS on.
//!
//! How a compute gets its files (ARCHITECTURE.md, "Compute TLS"): the
//! Secret is mounted read-only at [`TLS_SECRET_MOUNT`]; an init container
//! copies the certificate and key into the in-memory volume
//! [`TLS_LIVE_DIR`] as the postgres user, mode 0600 (PostgreSQL refuses a
//! key file another user could read, and a Secret volume's files belong to
//! root); postgres reads them from there. A renewed certificate reaches a
//! running compute the same way, without a restart: the operator runs the
//! same copy over SQL and `pg_reload_conf()` once the kubelet has synced
//! the Secret (`controller/tls.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::ResourceExt;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use super::names::meta;
use super::{ro_service_name, ComputeError};
use crate::api::{Branch, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_RESTORE};

/// The namespace CA's Secret (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "pgbranch-ca";
/// Where a compute mounts its certificate Secret (read-only, root's).
pub const TLS_SECRET_MOUNT: &str = "/etc/pgbranch/tls-secret";
/// Where postgres reads its certificate and key from (an in-memory volume,
/// the postgres user's, mode 0600).
pub const TLS_LIVE_DIR: &str = "/run/pgbranch/tls";
/// Set by a restore on the branch it creates: that branch's certificate
/// also covers the target's names, so the compute a finalize hands over
/// keeps serving a certificate valid for the target.
pub const ANNOTATION_TLS_ALSO_FOR: &str = "pgbranch.dev/tls-also-for";

/// The certificate Secret of a branch.
pub fn tls_secret_name(branch: &str) -> String {
    format!("{branch}-tls")
}

/// Operator settings of compute TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// TLS on every compute (`ssl=on`, `hostssl` only, `verify-full`
    /// connection strings). Off: plaintext, as before.
    pub enabled: bool,
    /// Lifetime of a server certificate; renewed when a third is left.
    pub cert_lifetime: Duration,
    /// Lifetime of a CA the operator creates.
    pub ca_lifetime: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cert_lifetime: Duration::from_secs(90 * 24 * 3600),
            ca_lifetime: Duration::from_secs(10 * 365 * 24 * 3600),
        }
    }
}

/// The `pg_hba.conf` of a TLS compute: the local socket as before, TLS
/// with SCRAM for every network connection (replication included),
/// anything else over the network refused.
pub const HBA_CONF: &str = "# Written by pgbranch: TLS for every network connection.\n\
    local      all          all                 trust\n\
    local      replication  all                 trust\n\
    hostssl    all          all  0.0.0.0/0      scram-sha-256\n\
    hostssl    all          all  ::/0           scram-sha-256\n\
    hostssl    replication  all  0.0.0.0/0      scram-sha-256\n\
    hostssl    replication  all  ::/0           scram-sha-256\n\
    hostnossl  all          all  0.0.0.0/0      reject\n\
    hostnossl  all          all  ::/0           reject\n\
    hostnossl  replication  all  0.0.0.0/0      reject\n\
    hostnossl  replication  all  ::/0           reject\n";

/// The `-c` settings that turn TLS on in a compute (after the user's
/// `postgresParameters`, so they win).
pub fn postgres_tls_settings() -> Vec<(String, String)> {
    vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), format!("{TLS_LIVE_DIR}/tls.crt")),
        ("ssl_key_file".into(), format!("{TLS_LIVE_DIR}/tls.key")),
        ("ssl_min_protocol_version".into(), "TLSv1.2".into()),
        ("hba_file".into(), format!("{TLS_SECRET_MOUNT}/pg_hba.conf")),
    ]
}

/// The shell command that copies the mounted Secret's certificate, key and
/// CA into `live` (the postgres user's, 0600), atomically per file. Run by
/// the init container, and by the operator over SQL (`COPY ... TO PROGRAM`)
/// after a renewal.
pub fn copy_command(secret_dir: &str, live: &str) -> String {
    let mut parts = vec!["umask 077".to_string()];
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        parts.push(format!(
            "cp '{secret_dir}/{f}' '{live}/{f}.new' && mv -f '{live}/{f}.new' '{live}/{f}'"
        ));
    }
    parts.join(" && ")
}

/// The DNS names of the Services `<branch>` and `<branch>-ro`: short,
/// `.<ns>`, `.<ns>.svc` and `.<ns>.svc.<cluster domain>`.
pub fn server_names(branch: &str, ns: &str, cluster_domain: &str) -> Vec<String> {
    let domain = cluster_domain.trim_matches('.');
    let mut out = vec![];
    for svc in [branch.to_string(), ro_service_name(branch)] {
        out.push(svc.clone());
        out.push(format!("{svc}.{ns}"));
        out.push(format!("{svc}.{ns}.svc"));
        if !domain.is_empty() {
            out.push(format!("{svc}.{ns}.svc.{domain}"));
        }
    }
    out
}

/// The names a branch's certificate covers: its own and, for a branch a
/// restore made (labelled by it, owned by a SnapshotRestore), the target's
/// its restore names in [`ANNOTATION_TLS_ALSO_FOR`].
pub fn cert_names(branch: &Branch, cluster_domain: &str) -> Result<Vec<String>, ComputeError> {
    let ns = branch
        .namespace()
        .ok_or(ComputeError::MissingMeta("namespace"))?;
    let mut names = server_names(&branch.name_any(), &ns, cluster_domain);
    let made_by_restore = branch.labels().contains_key(LABEL_RESTORE)
        && branch
            .owner_references()
            .iter()
            .any(|o| o.kind == "SnapshotRestore" && o.controller == Some(true));
    if let Some(target) = branch
        .annotations()
        .get(ANNOTATION_TLS_ALSO_FOR)
        .filter(|_| made_by_restore)
    {
        names.extend(server_names(target, &ns, cluster_domain));
    }
    Ok(names)
}

/// A CA: its certificate and key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A server certificate and its key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> ComputeError {
    ComputeError::Tls(format!("{what}: {e}"))
}

fn to_time(t: jiff::Timestamp) -> Result<time::OffsetDateTime, ComputeError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second()).map_err(|e| tls_err("a time", e))
}

/// How far back a new certificate's validity starts (clock skew between
/// the operator and clients): a tenth of its lifetime, at most 5 minutes.
fn backdate(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(300))
}

fn validity(
    params: &mut CertificateParams,
    now: jiff::Timestamp,
    lifetime: Duration,
) -> Result<(), ComputeError> {
    let lifetime_span = |d: Duration| {
        jiff::SignedDuration::try_from(d).map_err(|e| tls_err("a certificate lifetime", e))
    };
    let start = now
        .checked_sub(lifetime_span(backdate(lifetime))?)
        .map_err(|e| tls_err("a certificate's start", e))?;
    let end = now
        .checked_add(lifetime_span(lifetime)?)
        .map_err(|e| tls_err("a certificate's end", e))?;
    params.not_before = to_time(start)?;
    params.not_after = to_time(end)?;
    Ok(())
}

impl Ca {
    /// A new self-signed CA (ECDSA P-256) for namespace `ns`.
    pub fn generate(
        ns: &str,
        now: jiff::Timestamp,
        lifetime: Duration,
    ) -> Result<Ca, ComputeError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| tls_err("generating a CA key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "pgbranch");
        dn.push(DnType::CommonName, format!("pgbranch CA {ns}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, now, lifetime)?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls_err("signing the CA certificate", e))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA a `pgbranch-ca` Secret holds (`ca.crt`, `ca.key`), checked to
    /// be a usable pair.
    pub fn from_secret(secret: &Secret) -> Result<Ca, ComputeError> {
        let get = |k: &str| {
            super::secret_value(secret, k)
                .ok_or_else(|| ComputeError::Tls(format!("Secret {CA_SECRET} has no {k}")))
        };
        let ca = Ca {
            cert_pem: get("ca.crt")?,
            key_pem: get("ca.key")?,
        };
        ca.issuer()?;
        Ok(ca)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, ComputeError> {
        let key = KeyPair::from_pem(&self.key_pem)
            .map_err(|e| tls_err(&format!("the key of Secret {CA_SECRET}"), e))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key)
            .map_err(|e| tls_err(&format!("the certificate of Secret {CA_SECRET}"), e))
    }

    /// A server certificate for `names`, signed by this CA.
    pub fn issue(
        &self,
        names: &[String],
        now: jiff::Timestamp,
        lifetime: Duration,
    ) -> Result<ServerCert, ComputeError> {
        let issuer = self.issuer()?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| tls_err("generating a server key", e))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| tls_err("the certificate's names", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "pgbranch");
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.clone());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, now, lifetime)?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| tls_err("signing a server certificate", e))?;
        Ok(ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: jiff::Timestamp,
    pub not_after: jiff::Timestamp,
    /// Its DNS subject alternative names.
    pub names: Vec<String>,
}

/// The DER of the first certificate of a PEM text.
pub fn first_cert_der(pem: &str) -> Option<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    (p.label == "CERTIFICATE").then_some(p.contents)
}

/// Reads a PEM certificate's validity and DNS names.
pub fn cert_info(pem: &str) -> Result<CertInfo, ComputeError> {
    let der =
        first_cert_der(pem).ok_or_else(|| ComputeError::Tls("not a PEM certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| tls_err("parsing a certificate", e))?;
    let ts = |t: x509_parser::time::ASN1Time| {
        jiff::Timestamp::from_second(t.timestamp()).map_err(|e| tls_err("a certificate time", e))
    };
    let mut names = vec![];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    Ok(CertInfo {
        not_before: ts(cert.validity().not_before)?,
        not_after: ts(cert.validity().not_after)?,
        names,
    })
}

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// once a third of its lifetime is left.
pub fn renew_at(not_before: jiff::Timestamp, not_after: jiff::Timestamp) -> jiff::Timestamp {
    let life = not_after.as_millisecond() - not_before.as_millisecond();
    let at = not_after.as_millisecond() - life.max(0) / 3;
    jiff::Timestamp::from_millisecond(at).unwrap_or(not_before)
}

/// Whether a certificate is due for renewal at `now`.
pub fn renewal_due(info: &CertInfo, now: jiff::Timestamp) -> bool {
    now >= renew_at(info.not_before, info.not_after)
}

/// What to do with a branch's certificate Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertPlan {
    /// It is current; look again at `renew_at`.
    Keep { renew_at: jiff::Timestamp },
    /// Issue a new one, for this reason (for the log).
    Issue(&'static str),
}

/// Decides whether the branch's certificate Secret (if any) still serves:
/// present, from this CA, for exactly these names, not due for renewal.
pub fn plan_cert(
    existing: Option<&Secret>,
    ca: &Ca,
    names: &[String],
    now: jiff::Timestamp,
) -> CertPlan {
    let Some(secret) = existing else {
        return CertPlan::Issue("no certificate yet");
    };
    let get = |k: &str| super::secret_value(secret, k);
    let (Some(cert), Some(_key), Some(ca_pem)) = (get("tls.crt"), get("tls.key"), get("ca.crt"))
    else {
        return CertPlan::Issue("the certificate Secret lacks a key");
    };
    if first_cert_der(&ca_pem) != first_cert_der(&ca.cert_pem) {
        return CertPlan::Issue("the namespace CA changed");
    }
    if get("pg_hba.conf").as_deref() != Some(HBA_CONF) {
        return CertPlan::Issue("the pg_hba.conf changed");
    }
    let Ok(info) = cert_info(&cert) else {
        return CertPlan::Issue("the certificate does not parse");
    };
    let mut have = info.names.clone();
    let mut want = names.to_vec();
    have.sort();
    want.sort();
    if have != want {
        return CertPlan::Issue("the names changed");
    }
    if renewal_due(&info, now) {
        return CertPlan::Issue("a third of its lifetime is left");
    }
    CertPlan::Keep {
        renew_at: renew_at(info.not_before, info.not_after),
    }
}

fn bytes(data: BTreeMap<&str, &str>) -> BTreeMap<String, ByteString> {
    data.into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// The namespace CA's Secret. Owned by nothing: it outlives every branch.
pub fn build_ca_secret(ns: &str, ca: &Ca) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(CA_SECRET.into());
    s.metadata.namespace = Some(ns.into());
    s.metadata.labels = Some(BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), "pgbranch".to_string()),
        (LABEL_COMPONENT.to_string(), "ca".to_string()),
    ]));
    s.type_ = Some("Opaque".into());
    s.data = Some(bytes(BTreeMap::from([
        ("ca.crt", ca.cert_pem.as_str()),
        ("ca.key", ca.key_pem.as_str()),
    ])));
    s
}

/// A branch's certificate Secret (`kubernetes.io/tls`): `tls.crt`,
/// `tls.key`, `ca.crt`, and the `pg_hba.conf` its computes run with.
pub fn build_tls_secret(
    branch: &Branch,
    cert: &ServerCert,
    ca: &Ca,
) -> Result<Secret, ComputeError> {
    let metadata = meta(
        branch,
        tls_secret_name(&branch.name_any()),
        BTreeMap::from([(LABEL_COMPONENT.to_string(), "tls".to_string())]),
    )?;
    Ok(Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(bytes(BTreeMap::from([
            ("tls.crt", cert.cert_pem.as_str()),
            ("tls.key", cert.key_pem.as_str()),
            ("ca.crt", ca.cert_pem.as_str()),
            ("pg_hba.conf", HBA_CONF),
        ]))),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::fixtures::branch;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn now() -> jiff::Timestamp {
        "2026-12-07T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn names_cover_both_services_in_every_form() {
        assert_eq!(
            server_names("dev", "team-a", "cluster.local"),
            vec![
                "dev",
                "dev.team-a",
                "dev.team-a.svc",
                "dev.team-a.svc.cluster.local",
                "dev-ro",
                "dev-ro.team-a",
                "dev-ro.team-a.svc",
                "dev-ro.team-a.svc.cluster.local",
            ]
        );
        assert_eq!(
            server_names("x", "n", "corp.example.")[3],
            "x.n.svc.corp.example"
        );
    }

    #[test]
    fn a_restored_branch_also_covers_its_target_only_when_a_restore_made_it() {
        let mut b = branch("dev-restore");
        b.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_TLS_ALSO_FOR.to_string(),
            "dev".to_string(),
        )]));
        // A user's annotation alone gives nothing.
        assert_eq!(cert_names(&b, "cluster.local").unwrap().len(), 8);
        b.labels_mut().insert(LABEL_RESTORE.into(), "r1".into());
        b.metadata.owner_references = Some(vec![OwnerReference {
            kind: "SnapshotRestore".into(),
            controller: Some(true),
            name: "r1".into(),
            ..Default::default()
        }]);
        let names = cert_names(&b, "cluster.local").unwrap();
        assert_eq!(names.len(), 16);
        assert!(names.contains(&"dev.team-a.svc".to_string()));
        assert!(names.contains(&"dev-restore-ro.team-a.svc.cluster.local".to_string()));
    }

    #[test]
    fn renewal_is_due_when_a_third_is_left() {
        let nb = now();
        let na = nb + jiff::SignedDuration::from_secs(90);
        assert_eq!(renew_at(nb, na), nb + jiff::SignedDuration::from_secs(60));
        let info = CertInfo {
            not_before: nb,
            not_after: na,
            names: vec![],
        };
        assert!(!renewal_due(
            &info,
            nb + jiff::SignedDuration::from_secs(59)
        ));
        assert!(renewal_due(&info, nb + jiff::SignedDuration::from_secs(60)));
        assert!(renewal_due(&info, na + jiff::SignedDuration::from_secs(1)));
    }

    #[test]
    fn issued_certificates_carry_the_names_and_lifetime_and_plan_keeps_them() {
        let ca = Ca::generate("team-a", now(), Duration::from_secs(3650 * 86400)).unwrap();
        assert!(ca.key_pem.contains("PRIVATE KEY"));
        assert!(
            !format!("{ca:?}").contains("PRIVATE KEY"),
            "the key is never in Debug"
        );
        let b = branch("dev");
        let names = cert_names(&b, "cluster.local").unwrap();
        let lifetime = Duration::from_secs(3600);
        let cert = ca.issue(&names, now(), lifetime).unwrap();
        let info = cert_info(&cert.cert_pem).unwrap();
        assert_eq!(info.names, names);
        assert_eq!(
            info.not_after,
            now() + jiff::SignedDuration::from_secs(3600)
        );
        assert_eq!(
            info.not_before,
            now() - jiff::SignedDuration::from_secs(300)
        );

        let secret = build_tls_secret(&b, &cert, &ca).unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("dev-tls"));
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        match plan_cert(Some(&secret), &ca, &names, now()) {
            CertPlan::Keep { renew_at } => {
                assert_eq!(renew_at, now() + jiff::SignedDuration::from_secs(2300))
            }
            other => panic!("{other:?}"),
        }
        let later = now() + jiff::SignedDuration::from_secs(2400);
        assert!(matches!(
            plan_cert(Some(&secret), &ca, &names, later),
            CertPlan::Issue(_)
        ));
        assert!(matches!(
            plan_cert(None, &ca, &names, now()),
            CertPlan::Issue(_)
        ));
        let fewer = &names[..4];
        assert!(matches!(
            plan_cert(Some(&secret), &ca, fewer, now()),
            CertPlan::Issue(_)
        ));
        let other_ca = Ca::generate("team-a", now(), Duration::from_secs(86400)).unwrap();
        assert!(matches!(
            plan_cert(Some(&secret), &other_ca, &names, now()),
            CertPlan::Issue(_)
        ));
    }

    #[test]
    fn a_ca_secret_reads_back_and_garbage_is_refused() {
        let ca = Ca::generate("team-a", now(), Duration::from_secs(86400)).unwrap();
        let s = build_ca_secret("team-a", &ca);
        assert_eq!(s.metadata.name.as_deref(), Some(CA_SECRET));
        assert!(s.metadata.owner_references.is_none());
        assert_eq!(Ca::from_secret(&s).unwrap(), ca);
        let mut bad = s.clone();
        bad.data
            .as_mut()
            .unwrap()
            .insert("ca.key".into(), ByteString(b"nope".to_vec()));
        assert!(Ca::from_secret(&bad).is_err());
    }

    #[test]
    fn hba_requires_tls_for_every_network_connection() {
        for line in HBA_CONF.lines().filter(|l| !l.starts_with('#')) {
            let kind = line.split_whitespace().next().unwrap();
            assert!(matches!(kind, "local" | "hostssl" | "hostnossl"), "{line}");
            if kind == "hostnossl" {
                assert!(line.ends_with("reject"), "{line}");
            }
            if kind == "hostssl" {
                assert!(line.ends_with("scram-sha-256"), "{line}");
            }
        }
        let s = postgres_tls_settings();
        assert!(s.contains(&("ssl".into(), "on".into())));
        assert!(s.contains(&("ssl_min_protocol_version".into(), "TLSv1.2".into())));
        let cmd = copy_command("/a", "/b");
        assert!(cmd.starts_with("umask 077 && "), "{cmd}");
        assert!(cmd.contains("mv -f '/b/tls.key.new' '/b/tls.key'"), "{cmd}");
    }
}
