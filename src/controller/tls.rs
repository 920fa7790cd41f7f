//! Compute TLS for every controller (ARCHITECTURE.md, "Compute TLS"): the
//! namespace CA (Secret `pgbranch-ca`, created when absent, never
//! overwritten), a branch's certificate Secret kept current (issued,
//! renewed when a third of its lifetime is left), the client side of the
//! operator's own SQL connections to computes (verified against the
//! namespace CA under the Service's DNS name), and getting a renewed
//! certificate served by a running compute without restarting it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::apply::apply_owned;
use super::{secrets, Context, Error};
use crate::api::Branch;
use crate::compute::tls::{
    build_ca_secret, build_tls_secret, cert_names, copy_command, first_cert_der, plan_cert, Ca,
    CertPlan,
};
use crate::compute::{secret_value, service_host, tls_secret_name, CA_SECRET};

/// How the operator reaches a compute over TLS: the CA it trusts and the
/// name the certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca_pem: String,
    pub server_name: String,
}

/// The certificate a server presented in the last handshake of a
/// connector (its DER).
#[derive(Debug, Clone, Default)]
pub struct Served(Arc<Mutex<Option<Vec<u8>>>>);

impl Served {
    pub fn get(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// WebPKI verification against the namespace CA, remembering the
/// certificate it verified.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    served: Served,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        *self.served.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A tokio-postgres TLS connector that trusts only `ca_pem` (the server
/// name is the host the connection names), and what it was served.
pub fn connector(ca_pem: &str) -> Result<(MakeRustlsConnect, Served), Error> {
    let bad = |m: String| Error::stalled("InvalidCA", m);
    let der = first_cert_der(ca_pem).ok_or_else(|| {
        bad(format!(
            "Secret {CA_SECRET} has no PEM certificate in ca.crt"
        ))
    })?;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(der))
        .map_err(|e| bad(format!("Secret {CA_SECRET}: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(format!("Secret {CA_SECRET}: {e}")))?;
    let served = Served::default();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Sql(format!("TLS set-up: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording {
            inner,
            served: served.clone(),
        }))
        .with_no_client_auth();
    Ok((MakeRustlsConnect::new(config), served))
}

/// The namespace CA, created when absent (never overwritten: a CA the user
/// put there is used as it is). A CA that cannot be read is Stalled
/// `InvalidCA`.
pub async fn ensure_ca(ctx: &Context, ns: &str) -> Result<Ca, Error> {
    if let Some(ca) = namespace_ca(ctx, ns).await? {
        return Ok(ca);
    }
    let now = jiff::Timestamp::now();
    let ca = Ca::generate(ns, now, ctx.config.compute.tls.ca_lifetime)?;
    match ctx
        .create(ns, "create the namespace CA", &build_ca_secret(ns, &ca))
        .await
    {
        Ok(_) => {
            tracing::info!(
                namespace = ns,
                secret = CA_SECRET,
                "created the namespace CA"
            );
            Ok(ca)
        }
        // Another pass (or the user) made one meanwhile: that one counts.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => namespace_ca(ctx, ns)
            .await?
            .ok_or_else(|| Error::Waiting(format!("Secret {CA_SECRET} is being created"))),
        Err(e) => Err(e),
    }
}

/// The namespace CA if its Secret exists.
pub async fn namespace_ca(ctx: &Context, ns: &str) -> Result<Option<Ca>, Error> {
    match secrets::get(ctx, ns, CA_SECRET).await? {
        Some(s) => Ca::from_secret(&s)
            .map(Some)
            .map_err(|e| Error::stalled("InvalidCA", e.to_string())),
        None => Ok(None),
    }
}

/// How the operator connects to the computes of namespace `ns`'s Service
/// `service`: `None` when compute TLS is off.
pub async fn client_tls(
    ctx: &Context,
    ns: &str,
    service: &str,
) -> Result<Option<ClientTls>, Error> {
    if !ctx.config.compute.tls.enabled {
        return Ok(None);
    }
    let ca = ensure_ca(ctx, ns).await?;
    Ok(Some(ClientTls {
        ca_pem: ca.cert_pem,
        server_name: service_host(service, ns),
    }))
}

/// A branch's TLS as the reconcile left it.
#[derive(Debug, Clone)]
pub struct BranchTls {
    pub ca: Ca,
    /// The certificate its Secret holds (PEM).
    pub cert_pem: String,
    /// When it is due for renewal.
    pub renew_at: jiff::Timestamp,
}

/// Issues or renews the branch's certificate Secret as [`plan_cert`]
/// decides. `None` when compute TLS is off.
pub async fn ensure_branch_cert(
    ctx: &Context,
    branch: &Branch,
    uid: &str,
    now: jiff::Timestamp,
) -> Result<Option<BranchTls>, Error> {
    let cfg = &ctx.config.compute;
    if !cfg.tls.enabled {
        return Ok(None);
    }
    let ns = branch.namespace().unwrap_or_default();
    let ca = ensure_ca(ctx, &ns).await?;
    let names = cert_names(branch, &cfg.cluster_domain)?;
    let name = tls_secret_name(&branch.name_any());
    let existing: Option<Secret> = secrets::get(ctx, &ns, &name).await?;
    match plan_cert(existing.as_ref(), &ca, &names, now) {
        CertPlan::Keep { renew_at } => {
            let cert_pem = existing
                .as_ref()
                .and_then(|s| secret_value(s, "tls.crt"))
                .unwrap_or_default();
            Ok(Some(BranchTls {
                ca,
                cert_pem,
                renew_at,
            }))
        }
        CertPlan::Issue(reason) => {
            let cert = ca.issue(&names, now, cfg.tls.cert_lifetime)?;
            apply_owned(ctx, build_tls_secret(branch, &cert, &ca)?, uid).await?;
            tracing::info!(secret = %name, reason, "issued the branch's server certificate");
            let renew_at = crate::compute::tls::cert_info(&cert.cert_pem)
                .map(|i| crate::compute::tls::renew_at(i.not_before, i.not_after))
                .unwrap_or(now);
            Ok(Some(BranchTls {
                ca,
                cert_pem: cert.cert_pem,
                renew_at,
            }))
        }
    }
}

/// Certificates confirmed served, by branch UID (so a Ready branch is not
/// connected to on every pass; after a restart of the operator each is
/// checked once).
#[derive(Debug, Default)]
pub struct ServedCache(Mutex<HashMap<String, Vec<u8>>>);

impl ServedCache {
    fn is(&self, uid: &str, der: &[u8]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .is_some_and(|d| d == der)
    }

    fn set(&self, uid: &str, der: Vec<u8>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), der);
    }

    /// Forgets a branch (deleted).
    pub fn forget(&self, uid: &str) {
        let prefix = format!("{uid}/");
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !k.starts_with(&prefix));
    }
}

/// Makes the computes behind the branch's Service `service` (its primary's
/// or its replicas') serve the certificate its Secret holds: when it serves another (a renewal), and once the kubelet has
/// synced the mounted Secret, the compute copies the files in (the init
/// container's command, over `COPY ... TO PROGRAM`) and reloads its
/// configuration; no restart, no dropped connection. Returns when to look
/// again (`None`: it serves the current one).
pub async fn ensure_served(
    ctx: &Context,
    branch: &Branch,
    service: &str,
    uid: &str,
    tls: &BranchTls,
    superuser_password: &str,
) -> Result<Option<Duration>, Error> {
    let Some(want) = first_cert_der(&tls.cert_pem) else {
        return Ok(None);
    };
    let key = format!("{uid}/{service}");
    if ctx.tls_served.is(&key, &want) {
        return Ok(None);
    }
    let ns = branch.namespace().unwrap_or_default();
    let service = service.to_string();
    let (host, port) = ctx.resolver.resolve(&ns, &service).await?;
    let client_tls = ClientTls {
        ca_pem: tls.ca.cert_pem.clone(),
        server_name: service_host(&service, &ns),
    };
    let timeout = ctx.config.step_timeout;
    let (client, served) =
        super::sql::connect_superuser(&host, port, superuser_password, Some(&client_tls), timeout)
            .await?;
    if served.get().as_deref() == Some(want.as_slice()) {
        ctx.tls_served.set(&key, want);
        return Ok(None);
    }
    let step = async {
        let row = client
            .query_one(
                "SELECT current_setting('hba_file'), current_setting('ssl_cert_file')",
                &[],
            )
            .await?;
        let hba: String = row.get(0);
        let cert_file: String = row.get(1);
        let dir = |p: &str| p.rsplit_once('/').map(|(d, _)| d.to_string());
        let (Some(secret_dir), Some(live_dir)) = (dir(&hba), dir(&cert_file)) else {
            return Ok::<_, tokio_postgres::Error>(false);
        };
        let synced: String = client
            .query_one(
                "SELECT pg_read_file($1)",
                &[&format!("{secret_dir}/tls.crt")],
            )
            .await?
            .get(0);
        if first_cert_der(&synced).as_deref() != Some(want.as_slice()) {
            return Ok(false);
        }
        let copy = copy_command(&secret_dir, &live_dir);
        client
            .batch_execute(&format!(
                "COPY (SELECT 1) TO PROGRAM {}; SELECT pg_reload_conf();",
                super::sql::quote_literal(&copy)
            ))
            .await?;
        Ok(true)
    };
    let reloaded = match tokio::time::timeout(timeout, step).await {
        Ok(r) => r.map_err(|e| Error::Sql(format!("reloading the certificate: {e}")))?,
        Err(_) => {
            return Err(Error::Timeout {
                step: "reload the compute's certificate",
                secs: timeout.as_secs(),
            })
        }
    };
    if reloaded {
        tracing::info!("the compute reloaded its renewed certificate");
        Ok(Some(Duration::from_secs(1)))
    } else {
        tracing::debug!("waiting for the kubelet to sync the renewed certificate");
        Ok(Some(ctx.config.poll_interval))
    }
}
