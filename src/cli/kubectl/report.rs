//! `kubectl pgbranch report [BRANCH]`: a support bundle (tar.gz) of a
//! namespace, or of one branch and what touches it: the pgbranch objects,
//! the computes' Deployments, Services and Pods, the Secrets' names and keys
//! (never their values), the namespace's Events, the compute and operator
//! Pods' logs, and the status tree.
//!
//! Nothing secret leaves: every value of every Secret the bundle mentions
//! is replaced by `[REDACTED]` wherever it appears, and so is the password
//! of any `scheme://user:password@host` URI. What could not be read (logs
//! a cluster does not serve, namespaces the user may not list) is listed in
//! `errors.txt` instead of failing the report.

use std::collections::BTreeSet;
use std::io::Write;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Secret, Service};
use kube::api::{ListParams, LogParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{Branch, Snapshot, SnapshotRestore, SnapshotSchedule, LABEL_BRANCH};
use crate::cli::CliError;

const REDACTED: &str = "[REDACTED]";

/// Values shorter than this are not searched for (a one-letter value would
/// redact half the bundle); passwords and tokens the operator makes are
/// far longer.
const MIN_SECRET_LEN: usize = 6;

/// The files of a bundle, before redaction.
#[derive(Debug, Default)]
pub struct Bundle {
    pub files: Vec<(String, String)>,
    pub errors: Vec<String>,
    /// Every secret value seen.
    pub secrets: BTreeSet<String>,
}

impl Bundle {
    fn add(&mut self, name: impl Into<String>, text: impl Into<String>) {
        self.files.push((name.into(), text.into()));
    }

    fn yaml<T: Serialize>(&mut self, name: &str, items: &[T]) {
        match serde_yaml::to_string(items) {
            Ok(y) => self.add(name, y),
            Err(e) => self.errors.push(format!("{name}: {e}")),
        }
    }

    /// The bundle's files with every secret taken out.
    pub fn redacted(&self) -> Vec<(String, String)> {
        let mut files: Vec<(String, String)> = self
            .files
            .iter()
            .map(|(n, t)| (n.clone(), redact(t, &self.secrets)))
            .collect();
        if !self.errors.is_empty() {
            files.push((
                "errors.txt".into(),
                redact(&(self.errors.join("\n") + "\n"), &self.secrets),
            ));
        }
        files
    }
}

/// `text` without any of `secrets` and without URI passwords.
pub fn redact(text: &str, secrets: &BTreeSet<String>) -> String {
    let mut out = text.to_string();
    // Longest first, so a value containing another goes whole.
    let mut values: Vec<&String> = secrets
        .iter()
        .filter(|s| s.len() >= MIN_SECRET_LEN)
        .collect();
    values.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for v in values {
        out = out.replace(v.as_str(), REDACTED);
    }
    redact_uri_passwords(&out)
}

/// `scheme://user:password@` → `scheme://user:[REDACTED]@`.
fn redact_uri_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(a), Some(c)) if c < a => {
                out.push_str(&authority[..=c]);
                out.push_str(REDACTED);
                out.push_str(&authority[a..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Every value of a Secret, decoded (and, for URIs, the password in it).
fn secret_values(s: &Secret) -> Vec<String> {
    let mut v: Vec<String> = s
        .data
        .iter()
        .flatten()
        .filter_map(|(_, b)| String::from_utf8(b.0.clone()).ok())
        .collect();
    v.extend(s.string_data.iter().flatten().map(|(_, x)| x.clone()));
    v
}

fn strip<K: Resource>(mut items: Vec<K>) -> Vec<K> {
    for i in &mut items {
        i.meta_mut().managed_fields = None;
    }
    items
}

async fn list<K>(api: &Api<K>, lp: &ListParams, b: &mut Bundle, what: &str) -> Vec<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.list(lp).await {
        Ok(l) => strip(l.items),
        Err(e) => {
            b.errors.push(format!("list {what}: {e}"));
            Vec::new()
        }
    }
}

/// Collects the bundle of `ns` (one branch's share of it with `only`).
pub async fn collect(client: &Client, ns: &str, only: Option<&str>) -> Bundle {
    let mut b = Bundle::default();
    let lp = ListParams::default();
    let branches = list(
        &Api::<Branch>::namespaced(client.clone(), ns),
        &lp,
        &mut b,
        "branches",
    )
    .await;
    let snapshots = list(
        &Api::<Snapshot>::namespaced(client.clone(), ns),
        &lp,
        &mut b,
        "snapshots",
    )
    .await;
    let restores = list(
        &Api::<SnapshotRestore>::namespaced(client.clone(), ns),
        &lp,
        &mut b,
        "snapshotrestores",
    )
    .await;
    let schedules = list(
        &Api::<SnapshotSchedule>::namespaced(client.clone(), ns),
        &lp,
        &mut b,
        "snapshotschedules",
    )
    .await;

    // The branches in scope: all, or the named one and its descendants.
    let rows = super::status::tree(&branches, &snapshots, &restores, only);
    let names: BTreeSet<String> = rows.iter().map(|r| r.name.clone()).collect();
    let in_scope = |n: &str| only.is_none() || names.contains(n);
    b.add("status.txt", super::status::render(&rows));
    b.yaml(
        "objects/branches.yaml",
        &branches
            .into_iter()
            .filter(|x| in_scope(&x.name_any()))
            .collect::<Vec<_>>(),
    );
    b.yaml(
        "objects/snapshots.yaml",
        &snapshots
            .into_iter()
            .filter(|s| in_scope(&s.spec.branch))
            .collect::<Vec<_>>(),
    );
    b.yaml(
        "objects/snapshotrestores.yaml",
        &restores
            .into_iter()
            .filter(|r| {
                r.spec.target.as_deref().is_some_and(in_scope)
                    || r.spec.source.branch.as_deref().is_some_and(in_scope)
                    || only.is_none()
            })
            .collect::<Vec<_>>(),
    );
    b.yaml(
        "objects/snapshotschedules.yaml",
        &schedules
            .into_iter()
            .filter(|s| in_scope(&s.spec.branch))
            .collect::<Vec<_>>(),
    );

    let owned = ListParams::default().labels(LABEL_BRANCH);
    let branch_of = |o: &dyn Fn() -> Option<String>| o().is_some_and(|n| in_scope(&n));
    let deployments = list(
        &Api::<Deployment>::namespaced(client.clone(), ns),
        &owned,
        &mut b,
        "deployments",
    )
    .await;
    let deployments: Vec<Deployment> = deployments
        .into_iter()
        .filter(|d| branch_of(&|| d.labels().get(LABEL_BRANCH).cloned()))
        .collect();
    b.yaml("computes/deployments.yaml", &deployments);
    let services = list(
        &Api::<Service>::namespaced(client.clone(), ns),
        &owned,
        &mut b,
        "services",
    )
    .await;
    b.yaml(
        "computes/services.yaml",
        &services
            .into_iter()
            .filter(|s| branch_of(&|| s.labels().get(LABEL_BRANCH).cloned()))
            .collect::<Vec<_>>(),
    );
    let pods = list(
        &Api::<Pod>::namespaced(client.clone(), ns),
        &owned,
        &mut b,
        "pods",
    )
    .await;
    let pods: Vec<Pod> = pods
        .into_iter()
        .filter(|p| branch_of(&|| p.labels().get(LABEL_BRANCH).cloned()))
        .collect();
    b.yaml("computes/pods.yaml", &pods);

    // Secrets: names and keys only; their values are what gets redacted.
    let secrets = list(
        &Api::<Secret>::namespaced(client.clone(), ns),
        &owned,
        &mut b,
        "secrets",
    )
    .await;
    let mut listing = String::new();
    for s in &secrets {
        let keys: Vec<&String> = s.data.iter().flatten().map(|(k, _)| k).collect();
        listing.push_str(&format!("{}: {keys:?}\n", s.name_any()));
        b.secrets.extend(secret_values(s));
    }
    b.add("secrets.txt", listing);

    let events = list(
        &Api::<Event>::namespaced(client.clone(), ns),
        &lp,
        &mut b,
        "events",
    )
    .await;
    b.yaml("events.yaml", &events);

    // Logs: the computes here, and the operator and storage wherever the
    // chart or kustomize put them.
    let mut log_pods: Vec<(String, String)> = pods
        .iter()
        .map(|p| (ns.to_string(), p.name_any()))
        .collect();
    let all: Api<Pod> = Api::all(client.clone());
    match all
        .list(&ListParams::default().labels("app.kubernetes.io/name=pgbranch"))
        .await
    {
        Ok(l) => log_pods.extend(
            l.items
                .iter()
                .map(|p| (p.namespace().unwrap_or_default(), p.name_any())),
        ),
        Err(e) => b
            .errors
            .push(format!("list the operator's pods in all namespaces: {e}")),
    }
    for (pns, pod) in log_pods {
        let api: Api<Pod> = Api::namespaced(client.clone(), &pns);
        let lp = LogParams {
            tail_lines: Some(2000),
            ..Default::default()
        };
        match api.logs(&pod, &lp).await {
            Ok(text) => b.add(format!("logs/{pns}/{pod}.log"), text),
            Err(e) => b.errors.push(format!("logs of {pns}/{pod}: {e}")),
        }
    }
    b
}

/// Writes the redacted bundle as a gzip'd tar under `report/`.
pub fn write_tar_gz(bundle: &Bundle, out: impl Write) -> std::io::Result<()> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let now = jiff::Timestamp::now().as_second().max(0) as u64;
    for (name, text) in bundle.redacted() {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(now);
        h.set_cksum();
        tar.append_data(&mut h, format!("report/{name}"), text.as_bytes())?;
    }
    tar.into_inner()?.finish()?.flush()
}

/// `kubectl pgbranch report`: collects, redacts and writes the bundle.
pub async fn run(
    client: &Client,
    ns: &str,
    only: Option<&str>,
    output: Option<&str>,
) -> Result<String, CliError> {
    let bundle = collect(client, ns, only).await;
    let path = output.map(String::from).unwrap_or_else(|| {
        format!(
            "pgbranch-report-{ns}-{}.tar.gz",
            jiff::Timestamp::now().strftime("%Y%m%d%H%M%S")
        )
    });
    let file = std::fs::File::create(&path)?;
    write_tar_gz(&bundle, std::io::BufWriter::new(file))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_uri_passwords_are_taken_out() {
        let secrets: BTreeSet<String> = ["s3cr3tPassw0rd".to_string(), "abc".into()].into();
        let text = "password: s3cr3tPassw0rd\nuri: postgresql://app:other-pass@dev.ns:5432/app?sslmode=require\nhost: abc.example\n";
        let out = redact(text, &secrets);
        assert!(!out.contains("s3cr3tPassw0rd"), "{out}");
        assert!(!out.contains("other-pass"), "{out}");
        assert!(
            out.contains("postgresql://app:[REDACTED]@dev.ns:5432/app"),
            "{out}"
        );
        // Too short to search for: kept.
        assert!(out.contains("abc.example"), "{out}");
        // URIs without a password are left alone.
        assert_eq!(
            redact(
                "see https://example.com/x and postgres://u@h/db",
                &BTreeSet::new()
            ),
            "see https://example.com/x and postgres://u@h/db"
        );
    }

    #[test]
    fn the_archive_holds_the_redacted_files_and_the_errors() {
        let mut b = Bundle::default();
        b.add("status.txt", "prod Ready token=abcdefgh1234\n");
        b.errors.push("logs of ns/p: not served".into());
        b.secrets.insert("abcdefgh1234".into());
        let mut bytes = Vec::new();
        write_tar_gz(&b, &mut bytes).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            assert!(!text.contains("abcdefgh1234"), "{name}: {text}");
            seen.push(name);
        }
        assert_eq!(seen, ["report/status.txt", "report/errors.txt"]);
    }
}
