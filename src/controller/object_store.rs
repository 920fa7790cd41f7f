//! What two controllers need of a `BackupDestination`: the object store it
//! names, with the credentials read from its Secret. The BackupDestination
//! controller probes it; the Branch controller hands it to the storage
//! engine to archive a branch (`spec.backup`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::ResourceExt;

use super::{Context, Error};
use crate::api::destination::{reasons, DEFAULT_ACCESS_KEY_ID_KEY, DEFAULT_SECRET_ACCESS_KEY_KEY};
use crate::api::BackupDestination;
use crate::backup::{normalize_prefix, Credentials, Failure, ObjectStore};

/// The destination as the probe and the backup tools reach it, or why it
/// cannot be built (a Stalled reason and message).
pub async fn for_destination(
    ctx: &Context,
    dest: &BackupDestination,
) -> Result<Result<ObjectStore, (String, String)>, Error> {
    let ns = dest.namespace().unwrap_or_default();
    let spec = &dest.spec;
    let Some(endpoint) = spec.effective_endpoint() else {
        return Ok(Err((
            Failure::InvalidDestination.reason().into(),
            format!("spec.endpoint is required for provider {:?}", spec.provider),
        )));
    };
    let name = &spec.credentials.secret_name;
    let Some(secret) = super::secrets::get(ctx, &ns, name).await? else {
        return Ok(Err((
            reasons::SECRET_NOT_FOUND.into(),
            format!("the credentials Secret {name:?} does not exist in namespace {ns}"),
        )));
    };
    let id_key = spec
        .credentials
        .access_key_id_key
        .as_deref()
        .unwrap_or(DEFAULT_ACCESS_KEY_ID_KEY);
    let secret_key = spec
        .credentials
        .secret_access_key_key
        .as_deref()
        .unwrap_or(DEFAULT_SECRET_ACCESS_KEY_KEY);
    let data = secret_data(&secret);
    let (Some(access_key_id), Some(secret_access_key)) =
        (data.get(id_key).cloned(), data.get(secret_key).cloned())
    else {
        return Ok(Err((
            reasons::SECRET_NOT_FOUND.into(),
            format!(
                "the credentials Secret {name:?} lacks the key {id_key:?} or {secret_key:?} (or one is empty)"
            ),
        )));
    };
    Ok(Ok(ObjectStore {
        endpoint,
        bucket: spec.bucket.clone(),
        region: spec.effective_region(),
        prefix: normalize_prefix(spec.path_prefix.as_deref().unwrap_or("")),
        path_style: spec.effective_path_style(),
        ca_bundle: spec.ca_bundle.clone(),
        credentials: Credentials {
            access_key_id,
            secret_access_key,
        },
    }))
}

/// The Secret's non-empty string values (`data`, then `stringData`).
fn secret_data(s: &Secret) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, ByteString(v)) in s.data.iter().flatten() {
        if let Ok(text) = String::from_utf8(v.clone()) {
            let text = text.trim().to_string();
            if !text.is_empty() {
                out.insert(k.clone(), text);
            }
        }
    }
    for (k, v) in s.string_data.iter().flatten() {
        let v = v.trim();
        if !v.is_empty() {
            out.entry(k.clone()).or_insert_with(|| v.to_string());
        }
    }
    out
}
