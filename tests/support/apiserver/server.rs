//! Storage, routing and request handling of the test API server.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State as AxState};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use super::patch::{
    child_schema, get_path, json_patch, leaves, merge_apply, merge_patch, remove_paths, PatchError,
};
use super::selector::{FieldSelector, LabelSelector};
use super::{Change, ChangeKind, Failure, RequestRecord};

/// A kind the server knows: built in, or registered from a CRD.
#[derive(Debug, Clone)]
pub(crate) struct ResourceType {
    pub group: String,
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub status: bool,
    pub short_names: Vec<String>,
    /// Registered from a CRD (custom resources refuse unconditional PUTs).
    pub crd: bool,
    /// The CRD's `openAPIV3Schema` per version.
    pub schemas: Map<String, Value>,
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
        short: &[&str],
    ) -> Self {
        Self {
            group: group.into(),
            versions: vec![version.into()],
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            status,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            crd: false,
            schemas: Map::new(),
        }
    }

    fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.plural == "customresourcedefinitions"
    }
}

pub(crate) fn builtin_types() -> Vec<ResourceType> {
    let b = ResourceType::builtin;
    vec![
        b("", "v1", "pods", "Pod", true, true, &["po"]),
        b("", "v1", "services", "Service", true, true, &["svc"]),
        b("", "v1", "secrets", "Secret", true, false, &[]),
        b("", "v1", "configmaps", "ConfigMap", true, false, &["cm"]),
        b("", "v1", "events", "Event", true, false, &["ev"]),
        b("", "v1", "namespaces", "Namespace", false, true, &["ns"]),
        b(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            false,
            &["sa"],
        ),
        b(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
            true,
            &["pvc"],
        ),
        b("", "v1", "endpoints", "Endpoints", true, false, &["ep"]),
        b(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            true,
            &["deploy"],
        ),
        b(
            "apps",
            "v1",
            "statefulsets",
            "StatefulSet",
            true,
            true,
            &["sts"],
        ),
        b(
            "apps",
            "v1",
            "replicasets",
            "ReplicaSet",
            true,
            true,
            &["rs"],
        ),
        b(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            false,
            &[],
        ),
        b(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            false,
            &["ev"],
        ),
        b(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicies",
            "ValidatingAdmissionPolicy",
            false,
            true,
            &[],
        ),
        b(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicybindings",
            "ValidatingAdmissionPolicyBinding",
            false,
            false,
            &[],
        ),
        b(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
            &["crd", "crds"],
        ),
    ]
}

/// Storage key: group and plural (not version: one object is served at
/// every version of its kind), namespace ("" when cluster scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    group: String,
    plural: String,
    ns: String,
    name: String,
}

#[derive(Debug, Clone, Default)]
struct Stored {
    obj: Value,
    /// Field path → managers owning it (server-side apply bookkeeping).
    owners: BTreeMap<String, BTreeSet<String>>,
    /// Manager → field paths of its last apply.
    applied: BTreeMap<String, BTreeSet<String>>,
}

/// An error answered as a `metav1.Status`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", m)
    }
    fn invalid(rt: &ResourceType, name: &str, m: impl Into<String>) -> Self {
        let m = m.into();
        Self {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.kind})),
            ..Self::new(
                422,
                "Invalid",
                format!("{} {name:?} is invalid: {m}", rt.kind),
            )
        }
    }
    fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..Self::new(404, "NotFound", format!("{} {name:?} not found", gr(rt)))
        }
    }
    fn conflict(rt: &ResourceType, name: &str, m: impl Into<String>) -> Self {
        Self {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: {}",
                    gr(rt),
                    m.into()
                ),
            )
        }
    }
    pub(crate) fn for_code(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(code, reason, message)
    }
    fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

fn gr(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.plural.clone()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    }
}

fn now_ts() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

const FOREGROUND: &str = "foregroundDeletion";

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn valid_name(name: &str, label: bool) -> Result<(), String> {
    let max = if label { 63 } else { 253 };
    if name.is_empty() || name.len() > max {
        return Err(format!(
            "metadata.name: Invalid value: {name:?}: must be 1-{max} characters"
        ));
    }
    let parts: Vec<&str> = if label {
        vec![name]
    } else {
        name.split('.').collect()
    };
    for p in parts {
        let ok = !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !p.starts_with('-')
            && !p.ends_with('-');
        if !ok {
            return Err(format!(
                "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-'{}",
                if label { "label" } else { "subdomain" },
                if label { "" } else { " or '.'" }
            ));
        }
    }
    Ok(())
}

fn qualified_name_ok(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(|p| valid_name(p, false).is_ok())
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// The metadata checks every kind gets: label keys and values, annotation
/// keys and size, finalizer names, owner references.
fn validate_meta(obj: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !qualified_name_ok(k) {
                errs.push(format!("metadata.labels: Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (63 at most), with an optional DNS subdomain prefix and '/'"));
            }
            match v.as_str() {
                Some(v) if label_value_ok(v) => {}
                _ => errs.push(format!("metadata.labels: Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (63 at most)")),
            }
        }
    }
    if let Some(annotations) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut total = 0;
        for (k, v) in annotations {
            if !qualified_name_ok(k) {
                errs.push(format!(
                    "metadata.annotations: Invalid value: {k:?}: not a qualified name"
                ));
            }
            if !v.is_string() {
                errs.push(format!(
                    "metadata.annotations.{k}: Invalid value: annotation values must be strings"
                ));
            }
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > 256 * 1024 {
            errs.push("metadata.annotations: Too long: must have at most 262144 bytes".into());
        }
    }
    for f in finalizers(obj) {
        if !qualified_name_ok(&f) {
            errs.push(format!(
                "metadata.finalizers: Invalid value: {f:?}: not a qualified name"
            ));
        }
    }
    if let Some(refs) = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
    {
        for (i, r) in refs.iter().enumerate() {
            for f in ["apiVersion", "kind", "name", "uid"] {
                if r.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                    errs.push(format!("metadata.ownerReferences[{i}].{f}: Required value"));
                }
            }
        }
        let controllers = refs
            .iter()
            .filter(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
            .count();
        if controllers > 1 {
            errs.push("metadata.ownerReferences: Invalid value: only one reference can have Controller set to true".into());
        }
    }
    errs
}

fn selector_matches_labels(sel: &Value, labels: Option<&Value>) -> bool {
    let labels = labels
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    super::admission::selector_matches(Some(sel), &labels)
}

/// The checks of built-in kinds that catch controller bugs: workload
/// selectors and templates, container names and images, Service ports,
/// ConfigMap/Secret keys, immutable fields.
fn validate_builtin(group: &str, plural: &str, obj: &Value, old: Option<&Value>) -> Vec<String> {
    let mut errs = Vec::new();
    let spec = obj.get("spec");
    match (group, plural) {
        ("apps", "deployments" | "statefulsets" | "replicasets") => {
            let sel = spec.and_then(|s| s.get("selector"));
            let empty = sel.is_none_or(|s| {
                s.get("matchLabels")
                    .and_then(Value::as_object)
                    .is_none_or(Map::is_empty)
                    && s.get("matchExpressions")
                        .and_then(Value::as_array)
                        .is_none_or(Vec::is_empty)
            });
            if empty {
                errs.push("spec.selector: Required value".into());
            } else if let Some(sel) = sel {
                let labels = spec.and_then(|s| s.pointer("/template/metadata/labels"));
                if !selector_matches_labels(sel, labels) {
                    errs.push("spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`".into());
                }
            }
            if let Some(old_sel) = old.and_then(|o| o.pointer("/spec/selector")) {
                if sel != Some(old_sel) {
                    errs.push("spec.selector: Invalid value: field is immutable".into());
                }
            }
            let containers = spec.and_then(|s| s.pointer("/template/spec/containers"));
            validate_containers(containers, "spec.template.spec.containers", &mut errs);
        }
        ("", "pods") => {
            validate_containers(
                spec.and_then(|s| s.get("containers")),
                "spec.containers",
                &mut errs,
            );
        }
        ("", "services") => {
            let ports = spec.and_then(|s| s.get("ports")).and_then(Value::as_array);
            let kind = spec
                .and_then(|s| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP");
            let headless = spec
                .and_then(|s| s.get("clusterIP"))
                .and_then(Value::as_str)
                == Some("None");
            if ports.is_none_or(Vec::is_empty) && kind != "ExternalName" && !headless {
                errs.push("spec.ports: Required value".into());
            }
            let ports = ports.cloned().unwrap_or_default();
            for (i, p) in ports.iter().enumerate() {
                let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    errs.push(format!("spec.ports[{i}].port: Invalid value: {port}: must be between 1 and 65535, inclusive"));
                }
                if ports.len() > 1
                    && p.get("name")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    errs.push(format!("spec.ports[{i}].name: Required value"));
                }
            }
            let old_ip = old.and_then(|o| o.pointer("/spec/clusterIP"));
            if old_ip.is_some() && spec.and_then(|s| s.get("clusterIP")) != old_ip {
                errs.push("spec.clusterIP: Invalid value: field is immutable".into());
            }
        }
        ("", "configmaps" | "secrets") => {
            for field in ["data", "binaryData", "stringData"] {
                if let Some(m) = obj.get(field).and_then(Value::as_object) {
                    for k in m.keys() {
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
                        if !ok {
                            errs.push(format!("{field}[{k:?}]: Invalid value: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
                        }
                    }
                }
            }
            if plural == "secrets" {
                if let (Some(o), Some(n)) = (old.and_then(|o| o.get("type")), obj.get("type")) {
                    if o != n {
                        errs.push("type: Invalid value: field is immutable".into());
                    }
                }
            }
        }
        _ => {}
    }
    errs
}

fn validate_containers(containers: Option<&Value>, path: &str, errs: &mut Vec<String>) {
    let list = containers
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if list.is_empty() {
        errs.push(format!("{path}: Required value"));
    }
    let mut names = BTreeSet::new();
    for (i, c) in list.iter().enumerate() {
        match c.get("name").and_then(Value::as_str) {
            Some(n) if valid_name(n, true).is_ok() => {
                if !names.insert(n.to_string()) {
                    errs.push(format!("{path}[{i}].name: Duplicate value: {n:?}"));
                }
            }
            other => errs.push(format!(
                "{path}[{i}].name: Invalid value: {other:?}: must be a DNS label"
            )),
        }
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.push(format!("{path}[{i}].image: Required value"));
        }
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// The part of an object that is tracked for field ownership.
fn tracked(obj: &Value, rt: &ResourceType, sub: Option<&str>) -> Value {
    let mut out = Map::new();
    let Some(m) = obj.as_object() else {
        return Value::Object(out);
    };
    for (k, v) in m {
        match (k.as_str(), sub) {
            ("apiVersion" | "kind", _) => {}
            ("status", Some("status")) => {
                out.insert(k.clone(), v.clone());
            }
            (_, Some("status")) => {}
            ("status", None) if rt.status => {}
            ("metadata", None) => {
                let mut md = Map::new();
                for f in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(x) = v.get(f) {
                        md.insert(f.into(), x.clone());
                    }
                }
                if !md.is_empty() {
                    out.insert(k.clone(), Value::Object(md));
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// Field paths and values of `v` (see [`leaves`]); `schema` is the
/// object's CRD schema, when it has one.
fn leaf_map(v: &Value, schema: Option<&Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Value::Object(m) = v {
        for (k, child) in m {
            leaves(
                child,
                child_schema(schema, k),
                &format!("/{}", k.replace('~', "~0").replace('/', "~1")),
                &mut out,
            );
        }
    }
    out
}

impl ResourceType {
    /// The schema used for field ownership (the first version's).
    fn ownership_schema(&self) -> Option<&Value> {
        self.schemas.values().next()
    }
}

/// Everything but metadata (and status when it is a subresource): changes
/// here bump `metadata.generation`.
fn spec_part(obj: &Value, rt: &ResourceType) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if rt.status {
            m.remove("status");
        }
    }
    v
}

/// How a write changes field ownership.
enum Ownership {
    /// A create/update/patch by this manager: it owns what it changed.
    Update(String),
    /// A server-side apply: ownership already computed.
    Apply {
        owners: BTreeMap<String, BTreeSet<String>>,
        applied: BTreeMap<String, BTreeSet<String>>,
    },
}

pub(crate) struct State {
    rv: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<Arc<Change>>,
    pub(crate) history_limit: usize,
    compacted_rv: u64,
    pub(crate) requests: Vec<RequestRecord>,
    pub(crate) failures: Vec<Failure>,
    pub(crate) mutations: u64,
    pub(crate) bookmark_interval: Duration,
    pub(crate) validate_schemas: bool,
    pub(crate) delays: Vec<super::Delay>,
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<State>,
    pub(crate) tx: broadcast::Sender<Arc<Change>>,
    /// A message here ends every open watch stream.
    pub(crate) disconnect: broadcast::Sender<()>,
}

impl Inner {
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(16_384);
        let inner = Self {
            state: Mutex::new(State {
                rv: 1,
                types: builtin_types(),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: 5_000,
                compacted_rv: 0,
                requests: Vec::new(),
                failures: Vec::new(),
                mutations: 0,
                bookmark_interval: Duration::from_secs(1),
                validate_schemas: true,
                delays: Vec::new(),
            }),
            tx,
            disconnect: broadcast::channel(16).0,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let _ = inner.create_direct(
                "",
                "v1",
                "namespaces",
                None,
                json!({"metadata": {"name": ns}}),
            );
        }
        inner
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Creates an object named by its own apiVersion/kind (namespace from
    /// its metadata, else `default_ns` for namespaced kinds), without going
    /// through HTTP (not counted as a request).
    pub(crate) fn create_by_kind(&self, obj: Value, default_ns: &str) -> Result<Value, String> {
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .ok_or("apiVersion is required")?;
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .ok_or("kind is required")?;
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), api_version.to_string()),
        };
        let mut st = self.lock();
        let rt = st
            .types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.contains(&version))
            .cloned()
            .ok_or_else(|| format!("unknown kind {kind} in {api_version}"))?;
        let ns = rt.namespaced.then(|| {
            meta_str(&obj, "namespace")
                .unwrap_or(default_ns)
                .to_string()
        });
        st.create(
            &self.tx,
            &rt,
            &version,
            ns.as_deref(),
            obj,
            "pgbranch-test-support",
            false,
        )
        .map_err(|e| e.message)
    }

    /// Creates an object without going through HTTP (not counted as a request).
    pub(crate) fn create_direct(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        ns: Option<&str>,
        obj: Value,
    ) -> Result<Value, String> {
        let mut st = self.lock();
        let rt = st
            .find_type(group, version, plural)
            .ok_or_else(|| format!("unknown resource {plural}.{group}/{version}"))?;
        st.create(
            &self.tx,
            &rt,
            version,
            ns,
            obj,
            "pgbranch-test-support",
            false,
        )
        .map_err(|e| e.message)
    }

    pub(crate) fn get_direct(
        &self,
        group: &str,
        plural: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.lock();
        st.objects
            .get(&Key {
                group: group.into(),
                plural: plural.into(),
                ns: ns.unwrap_or("").into(),
                name: name.into(),
            })
            .map(|s| s.obj.clone())
    }

    pub(crate) fn list_direct(&self, group: &str, plural: &str) -> Vec<Value> {
        let st = self.lock();
        st.objects
            .iter()
            .filter(|(k, _)| k.group == group && k.plural == plural)
            .map(|(_, s)| s.obj.clone())
            .collect()
    }
}

impl State {
    pub(crate) fn current_rv(&self) -> u64 {
        self.rv
    }

    pub(crate) fn compact(&mut self) {
        self.compacted_rv = self.rv;
        self.history.clear();
    }

    /// Removes a CRD object (its kind stays registered until re-created).
    pub(crate) fn delete_crd_direct(&mut self, tx: &broadcast::Sender<Arc<Change>>, name: &str) {
        let key = Key {
            group: "apiextensions.k8s.io".into(),
            plural: "customresourcedefinitions".into(),
            ns: String::new(),
            name: name.into(),
        };
        if let Some(s) = self.objects.get(&key) {
            let last = s.obj.clone();
            self.remove_object(tx, &key, last);
        }
    }

    /// Schema pruning, defaulting and validation (CEL included) of a
    /// custom resource, as the apiserver does on every write.
    fn admit_obj(
        &self,
        rt: &ResourceType,
        obj: Value,
        old: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let meta_errors = validate_meta(&obj);
        if !meta_errors.is_empty() {
            let name = meta_str(&obj, "name").unwrap_or("").to_string();
            return Err(ApiError {
                details: Some(json!({"name": name, "group": rt.group, "kind": rt.kind,
                    "causes": meta_errors.iter().map(|m| json!({"reason": "FieldValueInvalid", "message": m})).collect::<Vec<_>>()})),
                ..ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} {name:?} is invalid: [{}]",
                        rt.kind,
                        meta_errors.join(", ")
                    ),
                )
            });
        }
        let obj = match rt.group.as_str() {
            "" => builtin_defaults(&rt.plural, obj, old, self.rv + 1),
            "apps" => workload_defaults(&rt.plural, obj),
            _ => obj,
        };
        if !rt.crd {
            let errors = validate_builtin(&rt.group, &rt.plural, &obj, old);
            if !errors.is_empty() {
                let name = meta_str(&obj, "name").unwrap_or("").to_string();
                return Err(ApiError {
                    details: Some(json!({"name": name, "group": rt.group, "kind": rt.kind,
                        "causes": errors.iter().map(|m| json!({"reason": "FieldValueInvalid", "message": m})).collect::<Vec<_>>()})),
                    ..ApiError::new(
                        422,
                        "Invalid",
                        format!("{} {name:?} is invalid: [{}]", rt.kind, errors.join(", ")),
                    )
                });
            }
        }
        if !rt.crd || !self.validate_schemas {
            return Ok(obj);
        }
        let version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .and_then(|av| av.rsplit('/').next())
            .unwrap_or("")
            .to_string();
        let Some(schema) = rt
            .schemas
            .get(&version)
            .or_else(|| rt.schemas.values().next())
        else {
            return Ok(obj);
        };
        super::schema::admit(schema, &obj, old).map_err(|causes| {
            let name = meta_str(&obj, "name").unwrap_or("").to_string();
            let list: Vec<String> = causes.iter().map(|c| c.message.clone()).collect();
            ApiError {
                code: 422,
                reason: "Invalid",
                message: format!("{}.{} {name:?} is invalid: [{}]", rt.kind, rt.group, list.join(", ")),
                details: Some(json!({
                    "name": name, "group": rt.group, "kind": rt.kind,
                    "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
                })),
            }
        })
    }

    /// ValidatingAdmissionPolicies with a `Deny` binding, for one request.
    #[allow(clippy::too_many_arguments)]
    fn vap_check(
        &self,
        rt: &ResourceType,
        operation: &str,
        key: &Key,
        sub: Option<&str>,
        object: Option<&Value>,
        old_object: Option<&Value>,
        dry_run: bool,
    ) -> Result<(), ApiError> {
        const GROUP: &str = "admissionregistration.k8s.io";
        let bindings: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.group == GROUP && k.plural == "validatingadmissionpolicybindings")
            .map(|(_, s)| s.obj.clone())
            .collect();
        if bindings.is_empty() {
            return Ok(());
        }
        let version = object
            .or(old_object)
            .and_then(|o| o.get("apiVersion"))
            .and_then(Value::as_str)
            .and_then(|av| av.rsplit('/').next())
            .map(String::from)
            .unwrap_or_else(|| rt.versions[0].clone());
        let resource = match sub {
            Some(sub) => format!("{}/{sub}", rt.plural),
            None => rt.plural.clone(),
        };
        let ns_obj = (!key.ns.is_empty())
            .then(|| {
                self.objects.get(&Key {
                    group: String::new(),
                    plural: "namespaces".into(),
                    ns: String::new(),
                    name: key.ns.clone(),
                })
            })
            .flatten()
            .map(|s| s.obj.clone());
        let attrs = super::admission::Attributes {
            operation,
            group: &rt.group,
            version: &version,
            kind: &rt.kind,
            resource: &resource,
            namespace: &key.ns,
            name: &key.name,
            object,
            old_object,
            namespace_object: ns_obj.as_ref(),
            dry_run,
        };
        let lookup = |name: &str| {
            self.objects
                .get(&Key {
                    group: GROUP.into(),
                    plural: "validatingadmissionpolicies".into(),
                    ns: String::new(),
                    name: name.into(),
                })
                .map(|s| s.obj.clone())
        };
        super::admission::check(&bindings, lookup, &attrs).map_err(|d| ApiError {
            details: Some(json!({"name": key.name, "group": rt.group, "kind": rt.plural})),
            ..ApiError::new(d.code, d.reason, d.message)
        })
    }

    fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| {
                t.group == group && t.plural == plural && t.versions.iter().any(|v| v == version)
            })
            .cloned()
    }

    fn type_of(&self, key: &Key) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == key.group && t.plural == key.plural)
            .cloned()
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(
        &mut self,
        tx: &broadcast::Sender<Arc<Change>>,
        kind: ChangeKind,
        key: &Key,
        old: Option<Value>,
        obj: Value,
        rv: u64,
    ) {
        self.mutations += 1;
        let change = Arc::new(Change {
            kind,
            resource_version: rv,
            group: key.group.clone(),
            resource: key.plural.clone(),
            namespace: (!key.ns.is_empty()).then(|| key.ns.clone()),
            name: key.name.clone(),
            object: obj,
            old,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.compacted_rv = c.resource_version;
            }
        }
        let _ = tx.send(change);
    }

    fn register_crd(&mut self, crd: &Value) -> Result<ResourceType, String> {
        let spec = crd.get("spec").ok_or("spec is required")?;
        let s = |p: &str| spec.pointer(p).and_then(Value::as_str).map(String::from);
        let group = s("/group").ok_or("spec.group is required")?;
        let plural = s("/names/plural").ok_or("spec.names.plural is required")?;
        let kind = s("/names/kind").ok_or("spec.names.kind is required")?;
        let singular = s("/names/singular").unwrap_or_else(|| kind.to_lowercase());
        let namespaced = match s("/scope").as_deref() {
            Some("Namespaced") => true,
            Some("Cluster") => false,
            other => return Err(format!("spec.scope: Unsupported value: {other:?}")),
        };
        let versions = spec
            .get("versions")
            .and_then(Value::as_array)
            .ok_or("spec.versions is required")?;
        let names: Vec<String> = versions
            .iter()
            .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
            .filter_map(|v| v.get("name").and_then(Value::as_str).map(String::from))
            .collect();
        if names.is_empty() {
            return Err("spec.versions: at least one served version is required".into());
        }
        let status = versions
            .iter()
            .any(|v| v.pointer("/subresources/status").is_some());
        let short_names = spec
            .pointer("/names/shortNames")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let rt = ResourceType {
            group,
            versions: names,
            plural,
            singular,
            kind,
            namespaced,
            status,
            short_names,
            crd: true,
            schemas: super::schema::schemas_of(crd),
        };
        self.types
            .retain(|t| !(t.group == rt.group && t.plural == rt.plural));
        self.types.push(rt.clone());
        Ok(rt)
    }

    fn namespace_state(&self, ns: &str) -> Option<bool> {
        self.objects
            .get(&Key {
                group: String::new(),
                plural: "namespaces".into(),
                ns: String::new(),
                name: ns.into(),
            })
            .map(|s| s.obj.pointer("/metadata/deletionTimestamp").is_some())
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        tx: &broadcast::Sender<Arc<Change>>,
        rt: &ResourceType,
        version: &str,
        ns: Option<&str>,
        mut obj: Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        self.create_with(
            tx,
            rt,
            version,
            ns,
            &mut obj,
            Ownership::Update(manager.into()),
            dry_run,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn create_with(
        &mut self,
        tx: &broadcast::Sender<Arc<Change>>,
        rt: &ResourceType,
        version: &str,
        ns: Option<&str>,
        obj: &mut Value,
        ownership: Ownership,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_type_meta(obj, rt)?;
        let ns = if rt.namespaced {
            let ns = ns.ok_or_else(|| ApiError::bad_request("a namespace is required"))?;
            if let Some(body_ns) = meta_str(obj, "namespace") {
                if !body_ns.is_empty() && body_ns != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
            match self.namespace_state(ns) {
                None => {
                    return Err(ApiError {
                        details: Some(json!({"name": ns, "kind": "namespaces"})),
                        ..ApiError::new(404, "NotFound", format!("namespaces {ns:?} not found"))
                    })
                }
                Some(true) => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!("{} is forbidden: unable to create new content in namespace {ns} because it is being terminated", gr(rt)),
                    ))
                }
                Some(false) => {}
            }
            ns.to_string()
        } else {
            String::new()
        };
        let name = match meta_str(obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(obj, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            },
        };
        let label_name = matches!(rt.plural.as_str(), "namespaces" | "services");
        valid_name(&name, label_name).map_err(|m| ApiError::invalid(rt, &name, m))?;
        let key = Key {
            group: rt.group.clone(),
            plural: rt.plural.clone(),
            ns: ns.clone(),
            name: name.clone(),
        };
        if self.objects.contains_key(&key) {
            return Err(ApiError {
                details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
                ..ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} {name:?} already exists", gr(rt)),
                )
            });
        }
        if rt.is_crd() {
            let expected = format!(
                "{}.{}",
                obj.pointer("/spec/names/plural")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                obj.pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            );
            if expected != name {
                return Err(ApiError::invalid(rt, &name, format!("metadata.name: Invalid value: must be spec.names.plural+\".\"+spec.group ({expected})")));
            }
        }
        let rv = self.rv + 1;
        obj["apiVersion"] = json!(rt.api_version(version));
        obj["kind"] = json!(rt.kind);
        if rt.status {
            if let Value::Object(m) = &mut *obj {
                m.remove("status");
            }
        }
        let md = meta_mut(obj);
        md.insert("name".into(), json!(name));
        if rt.namespaced {
            md.insert("namespace".into(), json!(ns));
        } else {
            md.remove("namespace");
        }
        md.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        md.insert("creationTimestamp".into(), json!(now_ts()));
        md.insert("resourceVersion".into(), json!(rv.to_string()));
        md.insert("generation".into(), json!(1));
        md.remove("deletionTimestamp");
        md.remove("deletionGracePeriodSeconds");
        md.remove("managedFields");
        md.remove("selfLink");
        if rt.plural == "namespaces" && rt.group.is_empty() {
            obj["status"] = json!({"phase": "Active"});
        }
        if rt.is_crd() {
            obj["status"] = json!({
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now_ts()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now_ts()},
                ],
                "acceptedNames": obj.pointer("/spec/names").cloned().unwrap_or(json!({})),
                "storedVersions": obj.pointer("/spec/versions").and_then(Value::as_array)
                    .map(|vs| vs.iter().filter(|v| v.get("storage").and_then(Value::as_bool).unwrap_or(false))
                        .filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>()).unwrap_or_default(),
            });
        }
        *obj = self.admit_obj(rt, obj.clone(), None)?;
        self.vap_check(rt, "CREATE", &key, None, Some(obj), None, dry_run)?;
        if dry_run {
            return Ok(obj.clone());
        }
        if rt.is_crd() {
            self.register_crd(obj)
                .map_err(|m| ApiError::invalid(rt, &name, m))?;
        }
        let mut stored = Stored {
            obj: obj.clone(),
            ..Default::default()
        };
        match ownership {
            Ownership::Update(manager) => {
                for p in leaf_map(&tracked(obj, rt, None), rt.ownership_schema()).into_keys() {
                    stored.owners.entry(p).or_default().insert(manager.clone());
                }
            }
            Ownership::Apply { owners, applied } => {
                stored.owners = owners;
                stored.applied = applied;
            }
        }
        self.rv = rv;
        self.objects.insert(key.clone(), stored);
        self.emit(tx, ChangeKind::Added, &key, None, obj.clone(), rv);
        Ok(obj.clone())
    }

    /// Writes `candidate` over the existing object at `key` (update, patch,
    /// apply, status writes).
    #[allow(clippy::too_many_arguments)]
    fn write_existing(
        &mut self,
        tx: &broadcast::Sender<Arc<Change>>,
        rt: &ResourceType,
        key: &Key,
        candidate: Value,
        sub: Option<&str>,
        ownership: Ownership,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let Some(cur) = self.objects.get(key) else {
            return Err(ApiError::not_found(rt, &key.name));
        };
        let old = cur.obj.clone();
        if !candidate.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_type_meta(&candidate, rt)?;
        if let Some(n) = meta_str(&candidate, "name") {
            if n != key.name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({})",
                    key.name
                )));
            }
        }
        if let Some(n) = meta_str(&candidate, "namespace") {
            if rt.namespaced && !n.is_empty() && n != key.ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        if let Some(rv) = meta_str(&candidate, "resourceVersion").filter(|r| !r.is_empty()) {
            if Some(rv) != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(
                    rt,
                    &key.name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
        }
        if let Some(uid) = meta_str(&candidate, "uid").filter(|r| !r.is_empty()) {
            if Some(uid) != meta_str(&old, "uid") {
                return Err(ApiError::conflict(
                    rt,
                    &key.name,
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid").unwrap_or("")
                    ),
                ));
            }
        }
        let mut new = if sub == Some("status") {
            let mut n = old.clone();
            match candidate.get("status") {
                Some(s) => n["status"] = s.clone(),
                None => {
                    if let Value::Object(m) = &mut n {
                        m.remove("status");
                    }
                }
            }
            n
        } else {
            let mut n = candidate;
            if rt.status {
                match old.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut n {
                            m.remove("status");
                        }
                    }
                }
            }
            n
        };
        new["apiVersion"] = old["apiVersion"].clone();
        new["kind"] = old["kind"].clone();
        {
            let old_md = old
                .get("metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let md = meta_mut(&mut new);
            md.remove("managedFields");
            md.remove("selfLink");
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
                "name",
                "namespace",
                "generateName",
            ] {
                match old_md.get(f) {
                    Some(v) => {
                        md.insert(f.into(), v.clone());
                    }
                    None => {
                        md.remove(f);
                    }
                }
            }
        }
        let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
        if deleting {
            let before = finalizers(&old);
            if finalizers(&new).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    rt,
                    &key.name,
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                ));
            }
        }
        // Empty finalizer lists and maps are equivalent to absent ones.
        if let Some(Value::Object(md)) = new.get_mut("metadata") {
            for f in ["finalizers", "ownerReferences"] {
                if md
                    .get(f)
                    .is_some_and(|v| v.as_array().is_some_and(Vec::is_empty) || v.is_null())
                {
                    md.remove(f);
                }
            }
            for f in ["labels", "annotations"] {
                if md
                    .get(f)
                    .is_some_and(|v| v.as_object().is_some_and(Map::is_empty) || v.is_null())
                {
                    md.remove(f);
                }
            }
        }
        let mut new = self.admit_obj(rt, new, Some(&old))?;
        self.vap_check(rt, "UPDATE", key, sub, Some(&new), Some(&old), dry_run)?;
        let cur = self.objects.get(key).cloned().unwrap_or_default();
        let (owners, applied) = match ownership {
            Ownership::Update(manager) => {
                let mut owners = cur.owners.clone();
                let mut applied = cur.applied.clone();
                let before = leaf_map(&tracked(&old, rt, sub), rt.ownership_schema());
                let after = leaf_map(&tracked(&new, rt, sub), rt.ownership_schema());
                for (p, v) in &after {
                    if before.get(p) != Some(v) {
                        // An update takes the field over; appliers lose it.
                        owners.insert(p.clone(), BTreeSet::from([manager.clone()]));
                        for (m, set) in applied.iter_mut() {
                            if *m != manager {
                                set.remove(p);
                            }
                        }
                    }
                }
                for p in before.keys() {
                    if !after.contains_key(p) {
                        owners.remove(p);
                        for set in applied.values_mut() {
                            set.remove(p);
                        }
                    }
                }
                (owners, applied)
            }
            Ownership::Apply { owners, applied } => (owners, applied),
        };
        if new == old {
            if !dry_run {
                if let Some(s) = self.objects.get_mut(key) {
                    s.owners = owners;
                    s.applied = applied;
                }
            }
            return Ok(old);
        }
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if spec_part(&new, rt) != spec_part(&old, rt) {
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let rv = self.rv + 1;
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        if dry_run {
            return Ok(new);
        }
        if deleting && finalizers(&new).is_empty() {
            self.remove_object(tx, key, new.clone());
            return Ok(new);
        }
        if rt.is_crd() && sub.is_none() {
            // An updated CRD (new version, schema, scope) serves at once.
            self.register_crd(&new)
                .map_err(|m| ApiError::invalid(rt, &key.name, m))?;
        }
        self.rv = rv;
        self.objects.insert(
            key.clone(),
            Stored {
                obj: new.clone(),
                owners,
                applied,
            },
        );
        self.emit(tx, ChangeKind::Modified, key, Some(old), new.clone(), rv);
        Ok(new)
    }

    /// Removes an object for good, then collects garbage that depended on it.
    fn remove_object(&mut self, tx: &broadcast::Sender<Arc<Change>>, key: &Key, mut last: Value) {
        let Some(old) = self.objects.remove(key) else {
            return;
        };
        let rv = self.next_rv();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(
            tx,
            ChangeKind::Deleted,
            key,
            Some(old.obj),
            last.clone(),
            rv,
        );
        if let Some(uid) = meta_str(&last, "uid") {
            let uid = uid.to_string();
            let live: BTreeSet<String> = self
                .objects
                .values()
                .filter_map(|s| meta_str(&s.obj, "uid").map(String::from))
                .collect();
            let dependents: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, s)| {
                    let owners = owner_uids(&s.obj);
                    owners.contains(&uid) && owners.iter().all(|o| !live.contains(o))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for dep in dependents {
                let _ = self.delete_object(tx, &dep, "Background", None, false);
            }
        }
        self.finish_foreground(tx);
        // A terminating namespace goes away once it is empty.
        if !key.ns.is_empty()
            && self.namespace_state(&key.ns) == Some(true)
            && !self.objects.keys().any(|k| k.ns == key.ns)
        {
            let ns_key = Key {
                group: String::new(),
                plural: "namespaces".into(),
                ns: String::new(),
                name: key.ns.clone(),
            };
            if let Some(s) = self.objects.get(&ns_key) {
                let last = s.obj.clone();
                self.remove_object(tx, &ns_key, last);
            }
        }
    }

    /// Drops the `foregroundDeletion` finalizer of owners whose
    /// dependents are all gone (which removes them if nothing else holds).
    fn finish_foreground(&mut self, tx: &broadcast::Sender<Arc<Change>>) {
        let live_owner_refs: BTreeSet<String> = self
            .objects
            .values()
            .flat_map(|s| owner_uids(&s.obj))
            .collect();
        let done: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, s)| {
                s.obj.pointer("/metadata/deletionTimestamp").is_some()
                    && finalizers(&s.obj).iter().any(|f| f == FOREGROUND)
                    && !meta_str(&s.obj, "uid").is_some_and(|u| live_owner_refs.contains(u))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            let (Some(rt), Some(s)) = (self.type_of(&k), self.objects.get(&k)) else {
                continue;
            };
            let mut n = s.obj.clone();
            let fins: Vec<String> = finalizers(&n)
                .into_iter()
                .filter(|f| f != FOREGROUND)
                .collect();
            n["metadata"]["finalizers"] = json!(fins);
            let _ = self.write_existing(
                tx,
                &rt,
                &k,
                n,
                None,
                Ownership::Update("garbage-collector".into()),
                false,
            );
        }
    }

    /// Deletes (or marks for deletion) one object.
    fn delete_object(
        &mut self,
        tx: &broadcast::Sender<Arc<Change>>,
        key: &Key,
        policy: &str,
        preconditions: Option<&Value>,
        dry_run: bool,
    ) -> Result<(bool, Value), ApiError> {
        let rt = self
            .type_of(key)
            .ok_or_else(|| ApiError::for_code(404, "unknown resource"))?;
        let Some(cur) = self.objects.get(key) else {
            return Err(ApiError::not_found(&rt, &key.name));
        };
        let obj = cur.obj.clone();
        if let Some(p) = preconditions {
            if let Some(uid) = p.get("uid").and_then(Value::as_str) {
                if Some(uid) != meta_str(&obj, "uid") {
                    return Err(ApiError::conflict(&rt, &key.name, format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", meta_str(&obj, "uid").unwrap_or(""))));
                }
            }
            if let Some(rv) = p.get("resourceVersion").and_then(Value::as_str) {
                if Some(rv) != meta_str(&obj, "resourceVersion") {
                    return Err(ApiError::conflict(&rt, &key.name, format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", meta_str(&obj, "resourceVersion").unwrap_or(""))));
                }
            }
        }
        self.vap_check(&rt, "DELETE", key, None, None, Some(&obj), dry_run)?;
        if dry_run {
            return Ok((finalizers(&obj).is_empty(), obj));
        }
        let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
        if policy == "Orphan" {
            let deps: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, s)| owner_uids(&s.obj).contains(&uid))
                .map(|(k, _)| k.clone())
                .collect();
            for dep in deps {
                if let (Some(drt), Some(s)) = (self.type_of(&dep), self.objects.get(&dep)) {
                    let mut n = s.obj.clone();
                    if let Some(Value::Array(refs)) = n.pointer_mut("/metadata/ownerReferences") {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                    }
                    let _ = self.write_existing(
                        tx,
                        &drt,
                        &dep,
                        n,
                        None,
                        Ownership::Update("garbage-collector".into()),
                        false,
                    );
                }
            }
        }
        let is_ns = rt.group.is_empty() && rt.plural == "namespaces";
        if is_ns {
            let mut marked = obj.clone();
            if obj.pointer("/metadata/deletionTimestamp").is_none() {
                marked["metadata"]["deletionTimestamp"] = json!(now_ts());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                marked["status"] = json!({"phase": "Terminating"});
                let rv = self.next_rv();
                marked["metadata"]["resourceVersion"] = json!(rv.to_string());
                if let Some(s) = self.objects.get_mut(key) {
                    s.obj = marked.clone();
                }
                self.emit(
                    tx,
                    ChangeKind::Modified,
                    key,
                    Some(obj.clone()),
                    marked.clone(),
                    rv,
                );
            }
            let contents: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| k.ns == key.name)
                .cloned()
                .collect();
            for k in contents {
                let _ = self.delete_object(tx, &k, "Background", None, false);
            }
            if !self.objects.keys().any(|k| k.ns == key.name) && finalizers(&marked).is_empty() {
                self.remove_object(tx, key, marked.clone());
                return Ok((true, marked));
            }
            return Ok((false, marked));
        }
        let has_dependents = self
            .objects
            .values()
            .any(|s| owner_uids(&s.obj).contains(&uid));
        if policy == "Foreground" && has_dependents {
            // The owner waits, marked and held by `foregroundDeletion`,
            // until its dependents are gone.
            let mut marked = obj.clone();
            let mut fins = finalizers(&obj);
            if !fins.iter().any(|f| f == FOREGROUND) {
                fins.push(FOREGROUND.into());
            }
            marked["metadata"]["finalizers"] = json!(fins);
            if marked.pointer("/metadata/deletionTimestamp").is_none() {
                marked["metadata"]["deletionTimestamp"] = json!(now_ts());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
            if marked != obj {
                let rv = self.next_rv();
                marked["metadata"]["resourceVersion"] = json!(rv.to_string());
                if let Some(s) = self.objects.get_mut(key) {
                    s.obj = marked.clone();
                }
                self.emit(
                    tx,
                    ChangeKind::Modified,
                    key,
                    Some(obj.clone()),
                    marked.clone(),
                    rv,
                );
            }
            let deps: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, s)| owner_uids(&s.obj).contains(&uid))
                .map(|(k, _)| k.clone())
                .collect();
            for dep in deps {
                let _ = self.delete_object(tx, &dep, "Foreground", None, false);
            }
            self.finish_foreground(tx);
            let current = self.objects.get(key).map(|s| s.obj.clone());
            return Ok(match current {
                Some(o) => (false, o),
                None => (true, marked),
            });
        }
        if !finalizers(&obj).is_empty() {
            if obj.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok((false, obj));
            }
            let mut marked = obj.clone();
            marked["metadata"]["deletionTimestamp"] = json!(now_ts());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let rv = self.next_rv();
            marked["metadata"]["resourceVersion"] = json!(rv.to_string());
            if let Some(s) = self.objects.get_mut(key) {
                s.obj = marked.clone();
            }
            self.emit(tx, ChangeKind::Modified, key, Some(obj), marked.clone(), rv);
            return Ok((false, marked));
        }
        self.remove_object(tx, key, obj.clone());
        if rt.is_crd() {
            // Deleting a CRD deletes every object of its kind, then the kind.
            let group = obj
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let plural = obj
                .pointer("/spec/names/plural")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let instances: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| k.group == group && k.plural == plural)
                .cloned()
                .collect();
            for k in instances {
                if let Some(s) = self.objects.get(&k) {
                    let last = s.obj.clone();
                    self.remove_object(tx, &k, last);
                }
            }
            self.types
                .retain(|t| !(t.group == group && t.plural == plural));
        }
        Ok((true, obj))
    }

    /// Server-side apply of `config` by `manager`.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        tx: &broadcast::Sender<Arc<Change>>,
        rt: &ResourceType,
        version: &str,
        key: &Key,
        mut config: Value,
        sub: Option<&str>,
        manager: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<(u16, Value), ApiError> {
        if !config.is_object() {
            return Err(ApiError::bad_request("an apply patch must be an object"));
        }
        if config
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(
                "apiVersion must be set in an apply patch",
            ));
        }
        if config
            .get("kind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request("kind must be set in an apply patch"));
        }
        check_type_meta(&config, rt)?;
        if let Some(n) = meta_str(&config, "name") {
            if n != key.name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({})",
                    key.name
                )));
            }
        }
        let applied_part = tracked(&config, rt, sub);
        let new_leaves = leaf_map(&applied_part, rt.ownership_schema());
        let Some(cur) = self.objects.get(key).cloned() else {
            if sub.is_some() {
                return Err(ApiError::not_found(rt, &key.name));
            }
            meta_mut(&mut config).insert("name".into(), json!(key.name));
            let mut owners: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for p in new_leaves.keys() {
                owners
                    .entry(p.clone())
                    .or_default()
                    .insert(manager.to_string());
            }
            let applied =
                BTreeMap::from([(manager.to_string(), new_leaves.keys().cloned().collect())]);
            let ns = (!key.ns.is_empty()).then_some(key.ns.as_str());
            let obj = self.create_with(
                tx,
                rt,
                version,
                ns,
                &mut config,
                Ownership::Apply { owners, applied },
                dry_run,
            )?;
            return Ok((201, obj));
        };
        let live = cur.obj.clone();
        let mut conflicts = Vec::new();
        for (p, v) in &new_leaves {
            let live_v = get_path(&live, p);
            if live_v.is_some_and(|lv| lv != v) {
                if let Some(os) = cur.owners.get(p) {
                    for o in os.iter().filter(|o| o.as_str() != manager) {
                        conflicts.push(format!("conflict with {o:?}: {}", p.replace('/', ".")));
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(ApiError {
                details: Some(
                    json!({"name": key.name, "group": rt.group, "kind": rt.plural,
                    "causes": conflicts.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": c})).collect::<Vec<_>>()}),
                ),
                ..ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Apply failed with {} conflict(s): {}",
                        conflicts.len(),
                        conflicts.join("; ")
                    ),
                )
            });
        }
        let mut owners = cur.owners.clone();
        let mut applied = cur.applied.clone();
        let prev = applied.get(manager).cloned().unwrap_or_default();
        let mut new = live.clone();
        let mut to_remove = Vec::new();
        for p in prev.iter().filter(|p| !new_leaves.contains_key(*p)) {
            let others = owners
                .get(p)
                .is_some_and(|os| os.iter().any(|o| o != manager));
            if let Some(os) = owners.get_mut(p) {
                os.remove(manager);
                if os.is_empty() {
                    owners.remove(p);
                }
            }
            if !others {
                to_remove.push(p.clone());
            }
        }
        remove_paths(&mut new, &to_remove);
        merge_apply(&mut new, &applied_part, rt.ownership_schema());
        for (p, v) in &new_leaves {
            let changed = get_path(&live, p) != Some(v);
            if force || changed {
                owners.insert(p.clone(), BTreeSet::from([manager.to_string()]));
                for (m, set) in applied.iter_mut() {
                    if m != manager {
                        set.remove(p);
                    }
                }
            } else {
                owners
                    .entry(p.clone())
                    .or_default()
                    .insert(manager.to_string());
            }
        }
        applied.insert(manager.to_string(), new_leaves.keys().cloned().collect());
        let after = leaf_map(&tracked(&new, rt, sub), rt.ownership_schema());
        owners.retain(|p, _| after.contains_key(p) || sub.is_none() && p.starts_with("/status"));
        let obj = self.write_existing(
            tx,
            rt,
            key,
            new,
            sub,
            Ownership::Apply { owners, applied },
            dry_run,
        )?;
        Ok((200, obj))
    }
}

/// The few built-in defaults and conversions a real apiserver applies that
/// controllers notice: Secret `stringData` folded into base64 `data` and
/// `type: Opaque`; Service `type: ClusterIP`, an allocated (or kept)
/// `clusterIP`, port `protocol: TCP` and `targetPort` = `port`.
/// Sets `v[key]` to `default` when absent or null.
fn default_field(v: &mut Value, key: &str, default: Value) {
    if let Value::Object(m) = v {
        if m.get(key).is_none_or(Value::is_null) {
            m.insert(key.to_string(), default);
        }
    }
}

fn probe_defaults(probe: &mut Value) {
    if !probe.is_object() {
        return;
    }
    default_field(probe, "timeoutSeconds", json!(1));
    default_field(probe, "periodSeconds", json!(10));
    default_field(probe, "successThreshold", json!(1));
    default_field(probe, "failureThreshold", json!(3));
    if let Some(get) = probe.get_mut("httpGet") {
        default_field(get, "scheme", json!("HTTP"));
        default_field(get, "path", json!("/"));
    }
}

/// The defaults a real apiserver gives a PodSpec and its containers.
fn pod_spec_defaults(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    default_field(spec, "restartPolicy", json!("Always"));
    default_field(spec, "terminationGracePeriodSeconds", json!(30));
    default_field(spec, "dnsPolicy", json!("ClusterFirst"));
    default_field(spec, "securityContext", json!({}));
    default_field(spec, "schedulerName", json!("default-scheduler"));
    default_field(spec, "enableServiceLinks", json!(true));
    for list in ["initContainers", "containers"] {
        let Some(Value::Array(containers)) = spec.get_mut(list) else {
            continue;
        };
        for c in containers {
            default_field(c, "terminationMessagePath", json!("/dev/termination-log"));
            default_field(c, "terminationMessagePolicy", json!("File"));
            let image = c
                .get("image")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let tag = image
                .rsplit('/')
                .next()
                .and_then(|last| last.split_once(':'))
                .map(|(_, t)| t.to_string());
            let pull = if image.contains('@') || tag.as_deref().is_some_and(|t| t != "latest") {
                "IfNotPresent"
            } else {
                "Always"
            };
            default_field(c, "imagePullPolicy", json!(pull));
            if let Some(Value::Array(ports)) = c.get_mut("ports") {
                for p in ports {
                    default_field(p, "protocol", json!("TCP"));
                }
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(p) = c.get_mut(probe) {
                    probe_defaults(p);
                }
            }
        }
    }
}

/// The defaults of apps/v1 workloads and their pod templates.
fn workload_defaults(plural: &str, mut obj: Value) -> Value {
    let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) else {
        return obj;
    };
    match plural {
        "deployments" => {
            default_field(spec, "replicas", json!(1));
            default_field(spec, "revisionHistoryLimit", json!(10));
            default_field(spec, "progressDeadlineSeconds", json!(600));
            default_field(spec, "strategy", json!({}));
            let strategy = &mut spec["strategy"];
            default_field(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                default_field(strategy, "rollingUpdate", json!({}));
                default_field(
                    &mut strategy["rollingUpdate"],
                    "maxUnavailable",
                    json!("25%"),
                );
                default_field(&mut strategy["rollingUpdate"], "maxSurge", json!("25%"));
            }
        }
        "statefulsets" => {
            default_field(spec, "replicas", json!(1));
            default_field(spec, "revisionHistoryLimit", json!(10));
            default_field(spec, "podManagementPolicy", json!("OrderedReady"));
            default_field(spec, "updateStrategy", json!({}));
            let strategy = &mut spec["updateStrategy"];
            default_field(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                default_field(strategy, "rollingUpdate", json!({}));
                default_field(&mut strategy["rollingUpdate"], "partition", json!(0));
            }
            default_field(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
        }
        "replicasets" => default_field(spec, "replicas", json!(1)),
        _ => {}
    }
    if let Some(pod) = spec.pointer_mut("/template/spec") {
        pod_spec_defaults(pod);
    }
    obj
}

fn builtin_defaults(plural: &str, mut obj: Value, old: Option<&Value>, serial: u64) -> Value {
    use base64::Engine;
    match plural {
        "secrets" => {
            let string_data = obj.as_object_mut().and_then(|m| m.remove("stringData"));
            if let Some(Value::Object(sd)) = string_data {
                if !obj.get("data").is_some_and(Value::is_object) {
                    obj["data"] = json!({});
                }
                for (k, v) in sd {
                    let text = v.as_str().unwrap_or_default().to_string();
                    obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                }
            }
            if obj.get("type").is_none_or(Value::is_null) {
                obj["type"] = json!("Opaque");
            }
        }
        "pods" => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec_defaults(spec);
            }
        }
        "services" => {
            if !obj.get("spec").is_some_and(Value::is_object) {
                obj["spec"] = json!({});
            }
            let spec = &mut obj["spec"];
            if spec.get("type").is_none_or(Value::is_null) {
                spec["type"] = json!("ClusterIP");
            }
            if spec.get("clusterIP").is_none_or(|v| v.is_null() || v == "") {
                let ip = old
                    .and_then(|o| o.pointer("/spec/clusterIP"))
                    .cloned()
                    .unwrap_or_else(|| {
                        json!(format!(
                            "10.96.{}.{}",
                            (serial / 250) % 250,
                            serial % 250 + 1
                        ))
                    });
                spec["clusterIP"] = ip.clone();
                spec["clusterIPs"] = json!([ip]);
            }
            if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                for p in ports {
                    if p.get("protocol").is_none_or(Value::is_null) {
                        p["protocol"] = json!("TCP");
                    }
                    if p.get("targetPort").is_none_or(Value::is_null) {
                        if let Some(port) = p.get("port").cloned() {
                            p["targetPort"] = port;
                        }
                    }
                }
            }
        }
        _ => {}
    }
    obj
}

fn check_type_meta(obj: &Value, rt: &ResourceType) -> Result<(), ApiError> {
    if let Some(av) = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        let ok = rt.versions.iter().any(|v| rt.api_version(v) == av);
        if !ok {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                rt.api_version(&rt.versions[0])
            )));
        }
    }
    if let Some(k) = obj
        .get("kind")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        if k != rt.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
    }
    Ok(())
}

/// The `meta.k8s.io/v1` PartialObjectMetadata(List) form of an object or
/// list, as served for `Accept: ...;as=PartialObjectMetadata...`.
fn partial_metadata(body: Value) -> Value {
    let one = |o: &Value| {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": o.get("metadata").cloned().unwrap_or(json!({}))})
    };
    match body.get("kind").and_then(Value::as_str) {
        Some("Status") => body,
        Some(k) if k.ends_with("List") && body.get("items").is_some() => json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": body.get("metadata").cloned().unwrap_or(json!({})),
            "items": body["items"].as_array().map(|a| a.iter().map(one).collect::<Vec<_>>()).unwrap_or_default(),
        }),
        _ => one(&body),
    }
}

fn with_version(mut obj: Value, rt: &ResourceType, version: &str) -> Value {
    obj["apiVersion"] = json!(rt.api_version(version));
    obj
}

fn respond(code: u16, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(bytes))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn error_response(e: &ApiError) -> Response {
    respond(e.code, &e.status())
}

/// What a request addresses.
struct Target {
    group: String,
    version: String,
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

enum Route {
    Version,
    Api,
    Apis,
    Group(String),
    Resources(String, String),
    Resource(Target),
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::Api),
        ["apis"] => return Some(Route::Apis),
        ["apis", g] => return Some(Route::Group(g.to_string())),
        ["api", v] => return Some(Route::Resources(String::new(), v.to_string())),
        ["apis", g, v] => return Some(Route::Resources(g.to_string(), v.to_string())),
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (ns, rest) = if rest.len() >= 3
        && rest[0] == "namespaces"
        && !matches!(rest[2], "status" | "finalize")
    {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    if rest.is_empty() || rest.len() > 3 {
        return None;
    }
    Some(Route::Resource(Target {
        group,
        version,
        plural: rest[0].to_string(),
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    }))
}

fn discovery_resources(st: &State, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = st
        .types
        .iter()
        .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in types {
        resources.push(json!({
            "name": t.plural, "singularName": t.singular, "namespaced": t.namespaced, "kind": t.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": t.short_names,
        }));
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": t.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn api_group(st: &State, group: &str) -> Option<Value> {
    let mut versions: Vec<String> = Vec::new();
    for t in st.types.iter().filter(|t| t.group == group) {
        for v in &t.versions {
            if !versions.contains(v) {
                versions.push(v.clone());
            }
        }
    }
    let first = versions.first()?.clone();
    Some(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group,
        "versions": versions.iter().map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v})).collect::<Vec<_>>(),
        "preferredVersion": {"groupVersion": format!("{group}/{first}"), "version": first},
    }))
}

fn verb_of(method: &Method, t: &Target, q: &HashMap<String, String>) -> &'static str {
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    match *method {
        Method::GET if watch => "watch",
        Method::GET if t.name.is_some() => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if t.name.is_some() => "delete",
        Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// Selectors of a list or watch.
#[derive(Clone)]
struct Filter {
    group: String,
    plural: String,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn from_query(t: &Target, q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        Ok(Self {
            group: t.group.clone(),
            plural: t.plural.clone(),
            ns: t.ns.clone(),
            labels,
            fields,
        })
    }

    fn key_matches(&self, group: &str, plural: &str, ns: Option<&str>) -> bool {
        self.group == group
            && self.plural == plural
            && (self.ns.is_none() || self.ns.as_deref() == ns)
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The watch event this change is for this watcher, if any.
    fn translate(&self, c: &Change) -> Option<&'static str> {
        if !self.key_matches(&c.group, &c.resource, c.namespace.as_deref()) {
            return None;
        }
        let new_m = self.matches(&c.object);
        let old_m = c.old.as_ref().is_some_and(|o| self.matches(o));
        match c.kind {
            ChangeKind::Added => new_m.then_some("ADDED"),
            ChangeKind::Deleted => (new_m || old_m).then_some("DELETED"),
            ChangeKind::Modified => match (old_m, new_m) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        }
    }
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The axum fallback handler: every request lands here.
pub(crate) async fn handle(
    AxState(inner): AxState<Arc<Inner>>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading the body: {e}"))),
    };
    let q: HashMap<String, String> = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let Some(r) = route(parts.uri.path()) else {
        return error_response(&ApiError::for_code(
            404,
            "the server could not find the requested resource",
        ));
    };
    let t = match r {
        Route::Version => {
            return respond(
                200,
                &json!({
                    "major": "1", "minor": "33", "gitVersion": "v1.33.0-pgbranch-test",
                    "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
                    "platform": "linux/amd64",
                }),
            )
        }
        Route::Api => {
            return respond(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
            )
        }
        Route::Apis => {
            let st = inner.lock();
            let mut groups: Vec<String> = Vec::new();
            for t in st.types.iter().filter(|t| !t.group.is_empty()) {
                if !groups.contains(&t.group) {
                    groups.push(t.group.clone());
                }
            }
            let list: Vec<Value> = groups.iter().filter_map(|g| api_group(&st, g)).collect();
            return respond(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
            );
        }
        Route::Group(g) => {
            let st = inner.lock();
            return match api_group(&st, &g) {
                Some(v) => respond(200, &v),
                None => error_response(&ApiError::for_code(
                    404,
                    "the server could not find the requested resource",
                )),
            };
        }
        Route::Resources(g, v) => {
            let st = inner.lock();
            return match discovery_resources(&st, &g, &v) {
                Some(v) => respond(200, &v),
                None => error_response(&ApiError::for_code(
                    404,
                    "the server could not find the requested resource",
                )),
            };
        }
        Route::Resource(t) => t,
    };
    let verb = verb_of(&parts.method, &t, &q);
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let user_agent = parts
        .headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .and_then(|u| u.split('/').next())
        .filter(|u| !u.is_empty())
        .unwrap_or("unknown")
        .to_string();

    let accept = parts
        .headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let meta_only = accept.contains("as=PartialObjectMetadata");
    let delay = {
        let mut st = inner.lock();
        let idx = st.delays.iter().position(|d| d.matches(verb, &t.plural));
        idx.map(|i| {
            let d = &mut st.delays[i];
            d.remaining = d.remaining.saturating_sub(1);
            let by = d.by;
            if d.remaining == 0 {
                st.delays.remove(i);
            }
            by
        })
    };
    if let Some(by) = delay {
        tokio::time::sleep(by).await;
    }
    let mut st = inner.lock();
    // Failure injection and the request log.
    let mut record = RequestRecord {
        verb: verb.to_string(),
        group: t.group.clone(),
        resource: t.plural.clone(),
        subresource: t.sub.clone(),
        namespace: t.ns.clone(),
        name: t.name.clone(),
        code: 200,
        injected: false,
    };
    if let Some(idx) = st.failures.iter().position(|f| f.matches(&record)) {
        let f = &mut st.failures[idx];
        f.remaining = f.remaining.saturating_sub(1);
        let code = f.code;
        if f.remaining == 0 {
            st.failures.remove(idx);
        }
        record.code = code;
        record.injected = true;
        st.requests.push(record);
        return error_response(&ApiError::for_code(code, "injected failure (test hook)"));
    }
    let Some(rt) = st.find_type(&t.group, &t.version, &t.plural) else {
        record.code = 404;
        st.requests.push(record);
        return error_response(&ApiError::for_code(
            404,
            "the server could not find the requested resource",
        ));
    };
    if rt.namespaced != t.ns.is_some()
        && !(t.ns.is_none() && matches!(verb, "list" | "watch" | "deletecollection"))
    {
        record.code = 404;
        st.requests.push(record);
        return error_response(&ApiError::for_code(
            404,
            "the server could not find the requested resource",
        ));
    }
    if let Some(sub) = &t.sub {
        if !(sub == "status" && rt.status) {
            record.code = 404;
            st.requests.push(record);
            return error_response(&ApiError::for_code(
                404,
                "the server could not find the requested resource",
            ));
        }
    }
    let dry_run = q.get("dryRun").is_some_and(|d| d == "All");
    let manager = q.get("fieldManager").cloned().unwrap_or(user_agent);
    let key = |name: &str| Key {
        group: rt.group.clone(),
        plural: rt.plural.clone(),
        ns: t.ns.clone().unwrap_or_default(),
        name: name.to_string(),
    };
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the body could not be decoded: {e}")))
    };
    let tx = inner.tx.clone();
    let result: Result<(u16, Value), ApiError> = match verb {
        "get" => {
            let name = t.name.clone().unwrap_or_default();
            match st.objects.get(&key(&name)) {
                Some(s) => Ok((200, with_version(s.obj.clone(), &rt, &t.version))),
                None => Err(ApiError::not_found(&rt, &name)),
            }
        }
        "list" => Filter::from_query(&t, &q).map(|f| {
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, s)| {
                    f.key_matches(&k.group, &k.plural, Some(&k.ns)) && f.matches(&s.obj)
                })
                .map(|(_, s)| with_version(s.obj.clone(), &rt, &t.version))
                .collect();
            (
                200,
                json!({
                    "apiVersion": rt.api_version(&t.version), "kind": format!("{}List", rt.kind),
                    "metadata": {"resourceVersion": st.rv.to_string()}, "items": items,
                }),
            )
        }),
        "watch" => {
            let filter = match Filter::from_query(&t, &q) {
                Ok(f) => f,
                Err(e) => {
                    record.code = e.code;
                    st.requests.push(record);
                    return error_response(&e);
                }
            };
            st.requests.push(record);
            return start_watch(&inner, st, rt, t.version.clone(), filter, &q, meta_only);
        }
        "create" => parse_body().and_then(|b| {
            st.create(&tx, &rt, &t.version, t.ns.as_deref(), b, &manager, dry_run)
                .map(|o| (201, with_version(o, &rt, &t.version)))
        }),
        "update" => parse_body().and_then(|b| {
            let name = t.name.clone().unwrap_or_default();
            if rt.crd && meta_str(&b, "resourceVersion").is_none_or(str::is_empty) {
                return Err(ApiError::invalid(
                    &rt,
                    &name,
                    "metadata.resourceVersion: Invalid value: 0: must be specified for an update",
                ));
            }
            st.write_existing(
                &tx,
                &rt,
                &key(&name),
                b,
                t.sub.as_deref(),
                Ownership::Update(manager.clone()),
                dry_run,
            )
            .map(|o| (200, with_version(o, &rt, &t.version)))
        }),
        "patch" => {
            let name = t.name.clone().unwrap_or_default();
            let k = key(&name);
            match content_type.as_str() {
                "application/apply-patch+yaml" => {
                    match (serde_yaml::from_slice::<Value>(&bytes), q.get("fieldManager")) {
                        (Err(e), _) => Err(ApiError::bad_request(format!("error decoding YAML: {e}"))),
                        (Ok(_), None) => Err(ApiError::invalid(&rt, &name, "metadata.managedFields.fieldManager: Required value: is required for apply patch")),
                        (Ok(cfg), Some(m)) => {
                            let force = q.get("force").is_some_and(|f| f == "true");
                            st.apply(&tx, &rt, &t.version, &k, cfg, t.sub.as_deref(), m, force, dry_run)
                                .map(|(c, o)| (c, with_version(o, &rt, &t.version)))
                        }
                    }
                }
                "application/strategic-merge-patch+json" if rt.crd => Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "strategic merge patch is not supported for custom resources: use a JSON merge patch, a JSON patch or server-side apply",
                )),
                "application/json-patch+json" | "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    match (parse_body(), st.objects.get(&k).map(|s| s.obj.clone())) {
                        (Err(e), _) => Err(e),
                        (Ok(_), None) => Err(ApiError::not_found(&rt, &name)),
                        (Ok(p), Some(cur)) => {
                            let candidate = if content_type == "application/json-patch+json" {
                                json_patch(&cur, &p).map_err(|e| match e {
                                    PatchError::Decode(m) => ApiError::bad_request(m),
                                    PatchError::Apply(m) => ApiError::for_code(422, m),
                                })
                            } else if !p.is_object() {
                                Err(ApiError::bad_request("a merge patch must be a JSON object"))
                            } else {
                                let mut c = cur.clone();
                                merge_patch(&mut c, &p);
                                Ok(c)
                            };
                            candidate.and_then(|c| {
                                st.write_existing(&tx, &rt, &k, c, t.sub.as_deref(), Ownership::Update(manager.clone()), dry_run)
                                    .map(|o| (200, with_version(o, &rt, &t.version)))
                            })
                        }
                    }
                }
                other => Err(ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {other:?}"))),
            }
        }
        "delete" | "deletecollection" => {
            let opts: Value = if bytes.is_empty() {
                json!({})
            } else {
                serde_json::from_slice(&bytes).unwrap_or(json!({}))
            };
            let policy = opts
                .get("propagationPolicy")
                .and_then(Value::as_str)
                .map(String::from)
                .or_else(|| q.get("propagationPolicy").cloned())
                .or_else(
                    || match opts.get("orphanDependents").and_then(Value::as_bool) {
                        Some(true) => Some("Orphan".into()),
                        _ => None,
                    },
                )
                .unwrap_or_else(|| "Background".into());
            let dry = dry_run
                || opts
                    .get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|d| d == "All"));
            if verb == "delete" {
                let name = t.name.clone().unwrap_or_default();
                st.delete_object(&tx, &key(&name), &policy, opts.get("preconditions"), dry).map(|(gone, obj)| {
                    if gone {
                        (200, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                            "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": meta_str(&obj, "uid")}}))
                    } else {
                        (200, with_version(obj, &rt, &t.version))
                    }
                })
            } else {
                Filter::from_query(&t, &q).map(|f| {
                    let keys: Vec<Key> = st
                        .objects
                        .iter()
                        .filter(|(k, s)| f.key_matches(&k.group, &k.plural, Some(&k.ns)) && f.matches(&s.obj))
                        .map(|(k, _)| k.clone())
                        .collect();
                    let mut items = Vec::new();
                    for k in keys {
                        if let Ok((_, o)) = st.delete_object(&tx, &k, &policy, None, dry) {
                            items.push(with_version(o, &rt, &t.version));
                        }
                    }
                    (200, json!({"apiVersion": rt.api_version(&t.version), "kind": format!("{}List", rt.kind),
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}))
                })
            }
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    };
    match result {
        Ok((code, body)) => {
            record.code = code;
            st.requests.push(record);
            if meta_only {
                respond(code, &partial_metadata(body))
            } else {
                respond(code, &body)
            }
        }
        Err(e) => {
            record.code = e.code;
            st.requests.push(record);
            error_response(&e)
        }
    }
}

struct WatchState {
    disconnect: broadcast::Receiver<()>,
    meta_only: bool,
    initial: VecDeque<Bytes>,
    rx: broadcast::Receiver<Arc<Change>>,
    filter: Filter,
    rt: ResourceType,
    version: String,
    last_rv: u64,
    bookmarks: Option<tokio::time::Interval>,
    deadline: tokio::time::Instant,
    done: bool,
}

fn shape(obj: Value, meta_only: bool) -> Value {
    if meta_only {
        partial_metadata(obj)
    } else {
        obj
    }
}

fn bookmark(rt: &ResourceType, version: &str, rv: u64, initial_end: bool) -> Bytes {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"apiVersion": rt.api_version(version), "kind": rt.kind, "metadata": md}),
    )
}

fn start_watch(
    inner: &Arc<Inner>,
    st: MutexGuard<'_, State>,
    rt: ResourceType,
    version: String,
    filter: Filter,
    q: &HashMap<String, String>,
    meta_only: bool,
) -> Response {
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = q.get("sendInitialEvents").is_some_and(|s| s == "true");
    let allow_bookmarks = q.get("allowWatchBookmarks").is_some_and(|s| s == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(3600));
    let mut initial = VecDeque::new();
    let mut done = false;
    if send_initial || rv_param.is_empty() || rv_param == "0" {
        for (k, s) in st.objects.iter() {
            if filter.key_matches(&k.group, &k.plural, Some(&k.ns)) && filter.matches(&s.obj) {
                initial.push_back(line(
                    "ADDED",
                    &shape(with_version(s.obj.clone(), &rt, &version), meta_only),
                ));
            }
        }
        if send_initial && allow_bookmarks {
            initial.push_back(bookmark(&rt, &version, st.rv, true));
        }
    } else {
        match rv_param.parse::<u64>() {
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version {rv_param:?}"
                )));
            }
            Ok(n) if n < st.compacted_rv => {
                let status = ApiError::for_code(
                    410,
                    format!("too old resource version: {n} ({})", st.compacted_rv + 1),
                )
                .status();
                initial.push_back(line("ERROR", &status));
                done = true;
            }
            Ok(n) => {
                for c in st.history.iter().filter(|c| c.resource_version > n) {
                    if let Some(kind) = filter.translate(c) {
                        initial.push_back(line(
                            kind,
                            &shape(with_version(c.object.clone(), &rt, &version), meta_only),
                        ));
                    }
                }
            }
        }
    }
    let interval = st.bookmark_interval;
    let state = WatchState {
        disconnect: inner.disconnect.subscribe(),
        meta_only,
        initial,
        rx: inner.tx.subscribe(),
        filter,
        rt,
        version,
        last_rv: st.rv,
        bookmarks: allow_bookmarks
            .then(|| tokio::time::interval_at(tokio::time::Instant::now() + interval, interval)),
        deadline: tokio::time::Instant::now() + timeout,
        done,
    };
    drop(st);
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(b) = s.initial.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), s));
            }
            if s.done {
                return None;
            }
            let tick = async {
                match s.bookmarks.as_mut() {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => futures::future::pending::<()>().await,
                }
            };
            tokio::select! {
                // A broken connection or the deadline wins over pending events.
                biased;
                _ = s.disconnect.recv() => return None,
                _ = tokio::time::sleep_until(s.deadline) => return None,
                _ = tick => {
                    let b = bookmark(&s.rt, &s.version, s.last_rv, false);
                    return Some((Ok(b), s));
                }
                r = s.rx.recv() => match r {
                    Ok(c) => {
                        s.last_rv = c.resource_version;
                        if let Some(kind) = s.filter.translate(&c) {
                            let b = line(kind, &shape(with_version(c.object.clone(), &s.rt, &s.version), s.meta_only));
                            return Some((Ok(b), s));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let status = ApiError::for_code(410, "watch fell behind; too old resource version").status();
                        s.done = true;
                        return Some((Ok(line("ERROR", &status)), s));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
