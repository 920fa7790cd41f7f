//! The destination probe: writes a small object under the destination's
//! prefix, reads it back, compares, and deletes it. Only a store that does
//! all three is usable for backups; any failure is classified into a
//! [`Failure`] and described without credentials.
//!
//! Requests are signed (AWS Signature V4, presigned URLs) by `rusty-s3`
//! and sent with `reqwest` over rustls, trusting the destination's CA
//! bundle besides the system's roots.

use std::time::Duration;

use rusty_s3::{Bucket, S3Action, UrlStyle};

use super::{BackupError, Failure, ObjectStore};

/// How long one probe request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What a successful probe did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The key written, read and deleted.
    pub key: String,
    /// How long the three requests took.
    pub elapsed: Duration,
}

/// Writes, reads back and deletes a probe object in `store`.
pub async fn probe(store: &ObjectStore) -> Result<ProbeReport, BackupError> {
    let started = std::time::Instant::now();
    let client = http_client(store)?;
    let bucket = bucket(store)?;
    let creds = rusty_s3::Credentials::new(
        store.credentials.access_key_id.clone(),
        store.credentials.secret_access_key.clone(),
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let key = store.key(&format!(".pgbranch-probe/{id}"));
    let body = format!("pgbranch destination probe {id}\n");
    let ttl = Duration::from_secs(300);

    let url = bucket.put_object(Some(&creds), &key).sign(ttl);
    let resp = client
        .put(url)
        .body(body.clone())
        .send()
        .await
        .map_err(|e| transport(store, "writing the probe object", e))?;
    expect_ok(store, "writing the probe object", resp).await?;

    let url = bucket.get_object(Some(&creds), &key).sign(ttl);
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| transport(store, "reading the probe object back", e))?;
    let resp = expect_ok(store, "reading the probe object back", resp).await?;
    let got = resp
        .bytes()
        .await
        .map_err(|e| transport(store, "reading the probe object back", e))?;
    if got.as_ref() != body.as_bytes() {
        return Err(BackupError::new(
            Failure::ObjectStoreError,
            format!(
                "the probe object {key} read back from {} differs from what was written ({} bytes instead of {})",
                store.describe(),
                got.len(),
                body.len()
            ),
        ));
    }

    let url = bucket.delete_object(Some(&creds), &key).sign(ttl);
    let resp = client
        .delete(url)
        .send()
        .await
        .map_err(|e| transport(store, "deleting the probe object", e))?;
    expect_ok(store, "deleting the probe object", resp).await?;
    Ok(ProbeReport {
        key,
        elapsed: started.elapsed(),
    })
}

/// An HTTP client for `store`: its CA bundle trusted besides the system's
/// roots, a deadline per request.
pub fn http_client(store: &ObjectStore) -> Result<reqwest::Client, BackupError> {
    let mut b = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5));
    if let Some(pem) = &store.ca_bundle {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
            BackupError::new(
                Failure::InvalidDestination,
                format!("the CA bundle is not a PEM certificate bundle: {e}"),
            )
        })?;
        if certs.is_empty() {
            return Err(BackupError::new(
                Failure::InvalidDestination,
                "the CA bundle holds no PEM certificate",
            ));
        }
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| {
        BackupError::new(
            Failure::InvalidDestination,
            format!("building an HTTP client: {e}"),
        )
    })
}

fn bucket(store: &ObjectStore) -> Result<Bucket, BackupError> {
    let endpoint = url::Url::parse(&store.endpoint).map_err(|e| {
        BackupError::new(
            Failure::InvalidDestination,
            format!("the endpoint {:?} is not a URL: {e}", store.endpoint),
        )
    })?;
    let style = if store.path_style {
        UrlStyle::Path
    } else {
        UrlStyle::VirtualHost
    };
    Bucket::new(endpoint, style, store.bucket.clone(), store.region.clone()).map_err(|e| {
        BackupError::new(
            Failure::InvalidDestination,
            format!(
                "bucket {:?} at endpoint {}: {e} (an IP address or a bucket name with dots needs pathStyle: true)",
                store.bucket, store.endpoint
            ),
        )
    })
}

/// A 2xx response, or the S3 error it carries, classified.
async fn expect_ok(
    store: &ObjectStore,
    what: &str,
    resp: reqwest::Response,
) -> Result<reqwest::Response, BackupError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let code = xml_field(&text, "Code");
    let message = xml_field(&text, "Message");
    let failure = classify_status(status.as_u16(), code.as_deref());
    let detail = match (&code, &message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => "no S3 error in the answer".into(),
    };
    Err(BackupError::new(
        failure,
        store.redact(&format!(
            "{what} in {} failed: HTTP {} ({})",
            store.describe(),
            status.as_u16(),
            cut(&detail, 300)
        )),
    ))
}

/// The failure an S3 error answer stands for.
pub fn classify_status(status: u16, code: Option<&str>) -> Failure {
    match code {
        Some("NoSuchBucket") => Failure::BucketNotFound,
        Some(
            "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "InvalidToken"
            | "ExpiredToken"
            | "AllAccessDisabled"
            | "AccountProblem"
            | "NotSignedUp",
        ) => Failure::AccessDenied,
        _ => match status {
            401 | 403 => Failure::AccessDenied,
            404 => Failure::BucketNotFound,
            _ => Failure::ObjectStoreError,
        },
    }
}

/// A request that got no HTTP answer: TLS or unreachable.
fn transport(store: &ObjectStore, what: &str, e: reqwest::Error) -> BackupError {
    // A presigned URL carries the access key id and a signature.
    let e = e.without_url();
    let chain = error_chain(&e);
    let failure = if is_tls(&e) {
        Failure::TlsError
    } else {
        Failure::EndpointUnreachable
    };
    let hint = match failure {
        Failure::TlsError => {
            " (is the endpoint's certificate signed by a CA in caBundle, and does the endpoint speak HTTPS?)"
        }
        _ => "",
    };
    BackupError::new(
        failure,
        store.redact(&format!(
            "{what} in {} failed: {chain}{hint}",
            store.describe()
        )),
    )
}

/// Whether a transport error is a TLS failure: a rustls error anywhere in
/// its sources.
fn is_tls(e: &reqwest::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        cur = err.source();
    }
    // rustls's errors, as hyper-rustls wraps them (the chain goes through
    // boxed connector errors that hide the type).
    let text = error_chain(e).to_ascii_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "corrupt message",
        "invalidcontenttype",
        "peer is incompatible",
        "received fatal alert",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// An error and its sources, joined with `: `.
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// At most `max` bytes of `s`, on a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The text of the first `<name>…</name>` element of an XML answer.
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    let v = xml[start..start + len].trim();
    (!v.is_empty()).then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_error_codes_map_to_reasons() {
        assert_eq!(
            classify_status(404, Some("NoSuchBucket")),
            Failure::BucketNotFound
        );
        assert_eq!(
            classify_status(403, Some("InvalidAccessKeyId")),
            Failure::AccessDenied
        );
        assert_eq!(
            classify_status(403, Some("SignatureDoesNotMatch")),
            Failure::AccessDenied
        );
        assert_eq!(classify_status(403, None), Failure::AccessDenied);
        assert_eq!(classify_status(500, None), Failure::ObjectStoreError);
    }

    #[test]
    fn xml_fields_are_read() {
        let x = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>Bucket not found: b</Message></Error>";
        assert_eq!(xml_field(x, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(
            xml_field(x, "Message").as_deref(),
            Some("Bucket not found: b")
        );
        assert_eq!(xml_field(x, "Resource"), None);
    }
}
