//! Backups to S3-compatible object storage (S3, R2, Backblaze B2, MinIO,
//! Garage, any custom endpoint).
//!
//! * [`ObjectStore`]: where backups go (endpoint, bucket, region, prefix,
//!   addressing style, CA bundle) and the credentials to get there. Its
//!   `Debug` never prints the secret key, and [`ObjectStore::redact`]
//!   removes both keys from any text that is about to reach a log, a
//!   status or an Event.
//! * [`probe`]: the check behind a `BackupDestination`'s `Ready`: a real
//!   write, read and delete of a probe object, with the failure classified
//!   (`BucketNotFound`, `AccessDenied`, `EndpointUnreachable`, `TLSError`).
//! * [`barman`]: the backup format and transfer are barman-cloud's
//!   (`barman-cloud-wal-archive`, `-backup`, `-restore`, `-wal-restore`,
//!   `-backup-list`): a DBA can recover with those tools alone. Credentials
//!   reach them through the environment, never through their arguments.
//!
//! Each backed-up timeline has its own barman "server" under the
//! destination's prefix, so sibling branches never share a WAL archive
//! (the shared-archive trap of STORAGE-FACTS.md).

pub mod barman;
pub mod probe;

use std::fmt;

use serde::{Deserialize, Serialize};

/// An object store as the backup tools and the probe reach it.
/// Serialized only as the body of the storage API's backup call (the
/// engine does the uploads); `Debug` never shows the credentials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStore {
    /// Base URL of the S3 API (`https://s3.eu-west-1.amazonaws.com`,
    /// `http://127.0.0.1:3900`).
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// The region requests are signed for.
    pub region: String,
    /// Key prefix inside the bucket, without leading or trailing `/`
    /// (empty: the bucket's root).
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`) instead of
    /// virtual-hosted style (`bucket.endpoint/key`).
    pub path_style: bool,
    /// PEM certificates to trust for the endpoint (besides the system's).
    pub ca_bundle: Option<String>,
    /// Access key id and secret.
    pub credentials: Credentials,
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("ca_bundle", &self.ca_bundle.as_ref().map(|_| "<pem>"))
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// S3 credentials. `Debug` shows neither key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl ObjectStore {
    /// The `s3://bucket/prefix` URL barman-cloud takes.
    pub fn s3_url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// `prefix/rest` (or `rest` for an empty prefix).
    pub fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// `text` with the access key id and the secret replaced by `***`:
    /// whatever an object store or a tool says goes through this before
    /// it is logged or shown.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in [
            &self.credentials.secret_access_key,
            &self.credentials.access_key_id,
        ] {
            if s.len() >= 4 {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }

    /// Where the store is, for messages: endpoint, bucket and prefix.
    pub fn describe(&self) -> String {
        format!("{} at {}", self.s3_url(), self.endpoint)
    }
}

/// Normalizes a user's path prefix: no leading, trailing or doubled `/`.
pub fn normalize_prefix(p: &str) -> String {
    p.split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// Why talking to an object store failed, as a condition reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// The bucket does not exist (or the endpoint serves no such bucket).
    BucketNotFound,
    /// The credentials were refused (unknown key, wrong secret, no
    /// permission on the bucket or prefix).
    AccessDenied,
    /// No answer: DNS, connection refused, timeout.
    EndpointUnreachable,
    /// The TLS handshake failed: an untrusted or wrong certificate, or an
    /// endpoint that does not speak TLS.
    TlsError,
    /// The store answered, but not as S3 should (a 5xx, a read that
    /// returned something else than was written).
    ObjectStoreError,
    /// The destination cannot be used as given (a malformed endpoint, a
    /// CA bundle that is not PEM).
    InvalidDestination,
    /// A backup tool failed for another reason (see the message).
    ToolFailed,
}

impl Failure {
    /// Every failure, in the order [`Failure::named_in`] tries them.
    pub const ALL: [Failure; 7] = [
        Failure::BucketNotFound,
        Failure::AccessDenied,
        Failure::EndpointUnreachable,
        Failure::TlsError,
        Failure::ObjectStoreError,
        Failure::InvalidDestination,
        Failure::ToolFailed,
    ];

    /// The failure a message names as `<Reason>: ...` (a [`BackupError`]
    /// that went through another error type on its way), if any.
    pub fn named_in(text: &str) -> Option<Failure> {
        Self::ALL
            .into_iter()
            .find(|f| text.contains(&format!("{}: ", f.reason())))
    }

    /// The CamelCase reason of a condition.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::BucketNotFound => "BucketNotFound",
            Failure::AccessDenied => "AccessDenied",
            Failure::EndpointUnreachable => "EndpointUnreachable",
            Failure::TlsError => "TLSError",
            Failure::ObjectStoreError => "ObjectStoreError",
            Failure::InvalidDestination => "InvalidDestination",
            Failure::ToolFailed => "BackupToolFailed",
        }
    }
}

/// A failure to reach or use an object store. The message never carries
/// a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{}: {message}", failure.reason())]
pub struct BackupError {
    pub failure: Failure,
    pub message: String,
}

impl BackupError {
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> ObjectStore {
        ObjectStore {
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "b".into(),
            region: "garage".into(),
            prefix: "team/pg".into(),
            path_style: true,
            ca_bundle: None,
            credentials: Credentials {
                access_key_id: "GK1234567890".into(),
                secret_access_key: "very-secret-key".into(),
            },
        }
    }

    #[test]
    fn debug_and_redact_never_show_the_keys() {
        let s = store();
        let d = format!("{s:?}");
        assert!(
            !d.contains("very-secret-key") && !d.contains("GK1234567890"),
            "{d}"
        );
        assert_eq!(
            s.redact("key GK1234567890 secret very-secret-key"),
            "key *** secret ***"
        );
    }

    #[test]
    fn urls_and_prefixes() {
        let s = store();
        assert_eq!(s.s3_url(), "s3://b/team/pg");
        assert_eq!(s.key("x/y"), "team/pg/x/y");
        assert_eq!(normalize_prefix("/a//b/"), "a/b");
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(Failure::TlsError.reason(), "TLSError");
        assert_eq!(
            Failure::named_in("unavailable: EndpointUnreachable: refused"),
            Some(Failure::EndpointUnreachable)
        );
        assert_eq!(Failure::named_in("something else"), None);
    }
}
