//! The `BackupDestination` kind: an S3-compatible bucket that branches back
//! up to, checked by a real write, read and delete of a probe object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition reasons of a destination that cannot be used.
pub mod reasons {
    /// The bucket does not exist at the endpoint.
    pub const BUCKET_NOT_FOUND: &str = "BucketNotFound";
    /// The credentials were refused.
    pub const ACCESS_DENIED: &str = "AccessDenied";
    /// No answer from the endpoint.
    pub const ENDPOINT_UNREACHABLE: &str = "EndpointUnreachable";
    /// The TLS handshake with the endpoint failed.
    pub const TLS_ERROR: &str = "TLSError";
    /// The credentials Secret or one of its keys is missing.
    pub const SECRET_NOT_FOUND: &str = "CredentialsSecretNotFound";
    /// Ready: the probe object was written, read back and deleted.
    pub const PROBE_SUCCEEDED: &str = "ProbeSucceeded";
}

/// Where backups go: an S3-compatible bucket (AWS S3, Cloudflare R2,
/// Backblaze B2, MinIO, Garage, any custom endpoint), with credentials from
/// a Secret in the same namespace.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "pgbranch.dev",
    version = "v1alpha1",
    kind = "BackupDestination",
    namespaced,
    status = "BackupDestinationStatus",
    shortname = "pgdest",
    category = "pgbranch",
    cel,
    selectable = ".spec.bucket",
    selectable = ".spec.credentials.secretName",
    doc = "An S3-compatible bucket that Branches back up to (WAL archive and base backups, in barman-cloud's format). Ready only after a probe object was written, read back and deleted with the given credentials.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(name = "Bucket", type_ = "string", json_path = ".spec.bucket"),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        priority = 1,
        json_path = ".status.endpoint"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.provider == 's3' || has(self.endpoint)").message("endpoint is required unless provider is s3 (AWS)").field_path(".endpoint"),
    validation = Rule::new("self.provider in ['s3', 'minio', 'custom'] || !has(self.pathStyle) || !self.pathStyle").message("pathStyle is for s3, minio and custom endpoints").field_path(".pathStyle")
)]
pub struct BackupDestinationSpec {
    /// The kind of object store: `s3` (AWS), `r2` (Cloudflare), `b2`
    /// (Backblaze), `minio`, or `custom` (any S3-compatible endpoint, such
    /// as Garage or Ceph RGW).
    pub provider: Provider,
    /// Base URL of the S3 API, such as
    /// `https://<account>.r2.cloudflarestorage.com`,
    /// `https://s3.us-west-004.backblazeb2.com` or `http://minio.minio:9000`.
    /// Required unless `provider` is `s3`, where it defaults to
    /// `https://s3.<region>.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#]+(/[^?#]*)?$')").message("must be an http:// or https:// URL without query or fragment"))]
    pub endpoint: Option<String>,
    /// The bucket (it must exist; pgbranch never creates buckets).
    #[schemars(length(min = 3, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]*[a-z0-9]$')").message("must be an S3 bucket name: lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"))]
    pub bucket: String,
    /// The region requests are signed for. Defaults: `us-east-1` for s3,
    /// minio and custom endpoints, `auto` for r2; b2 needs its region
    /// (such as `us-west-004`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
    /// Key prefix inside the bucket under which every backup of this
    /// destination goes (each branch then under its own UID), such as
    /// `prod/pgbranch`. Empty: the bucket's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("!self.contains('..') && !self.contains('//')").message("must not contain '..' or '//'"))]
    pub path_prefix: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) instead of
    /// virtual-hosted style (`bucket.endpoint/key`). Defaults to true for
    /// minio and custom endpoints (and needed for an endpoint given as an
    /// IP address), false otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// PEM certificates (a CA bundle) to trust for the endpoint besides the
    /// system's roots, for an endpoint with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("self.contains('-----BEGIN CERTIFICATE-----')").message("must hold PEM certificates (-----BEGIN CERTIFICATE-----)"))]
    pub ca_bundle: Option<String>,
    /// The Secret (same namespace) holding the access key id and secret.
    pub credentials: CredentialsRef,
}

/// An S3-compatible provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Amazon S3.
    #[default]
    S3,
    /// Cloudflare R2.
    R2,
    /// Backblaze B2 (its S3-compatible API).
    B2,
    /// MinIO.
    Minio,
    /// Any other S3-compatible endpoint (Garage, Ceph RGW, ...).
    Custom,
}

/// A Secret with S3 credentials.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsRef {
    /// Name of the Secret (same namespace as the BackupDestination).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key of the access key id in the Secret's data (default
    /// `accessKeyId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub access_key_id_key: Option<String>,
    /// Key of the secret access key in the Secret's data (default
    /// `secretAccessKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_access_key_key: Option<String>,
}

/// Default key of the access key id in the credentials Secret.
pub const DEFAULT_ACCESS_KEY_ID_KEY: &str = "accessKeyId";
/// Default key of the secret access key in the credentials Secret.
pub const DEFAULT_SECRET_ACCESS_KEY_KEY: &str = "secretAccessKey";

impl BackupDestinationSpec {
    /// The endpoint in use: the given one, or AWS's for the region.
    pub fn effective_endpoint(&self) -> Option<String> {
        match (&self.endpoint, self.provider) {
            (Some(e), _) => Some(e.trim_end_matches('/').to_string()),
            (None, Provider::S3) => Some(format!(
                "https://s3.{}.amazonaws.com",
                self.effective_region()
            )),
            (None, _) => None,
        }
    }

    /// The region in use (see `region`).
    pub fn effective_region(&self) -> String {
        match (&self.region, self.provider) {
            (Some(r), _) => r.clone(),
            (None, Provider::R2) => "auto".into(),
            (None, _) => "us-east-1".into(),
        }
    }

    /// The addressing style in use (see `pathStyle`).
    pub fn effective_path_style(&self) -> bool {
        self.path_style
            .unwrap_or(matches!(self.provider, Provider::Minio | Provider::Custom))
    }
}

/// Observed state of a BackupDestination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupDestinationStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` conditions. Stalled reasons:
    /// `BucketNotFound`, `AccessDenied`, `EndpointUnreachable`, `TLSError`,
    /// `CredentialsSecretNotFound`, `ObjectStoreError`,
    /// `InvalidDestination`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The endpoint the probe used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// When the last probe ran (RFC 3339), successful or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<String>,
    /// When a probe last succeeded (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
}
