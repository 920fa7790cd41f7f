//! An in-process Kubernetes API server for tests.
//!
//! The real [`kube::Client`] talks to it through its tower service (no
//! sockets), so controllers built on `kube_runtime::Controller`, the
//! finalizer helper, server-side apply, the event `Recorder` and
//! `kube-lease-manager` run unchanged against it.
//!
//! # Use
//!
//! ```ignore
//! mod support;
//! use support::apiserver::{ApiServer, Failure};
//!
//! let server = ApiServer::new();                 // namespaces default, kube-system, ... exist
//! server.install_crd(&pgbranch::api::Branch::crd()); // or create the CRD through the API
//! server.create_namespace("team-a");
//! server.create_manifests(include_str!("../../config/admission/protected-branch.yaml"))?;
//! let client: kube::Client = server.client();    // default namespace "default"
//! // ... run controllers / make requests with `client` ...
//! let writes = server.writes_during(Duration::from_secs(60)).await; // steady state:
//! assert!(writes.is_empty(), "{writes:?}");      // no writes at all
//! server.reset_counts();                         // or count from here: write_count(), writes_by_verb()
//! server.fail(Failure::new("patch", "branches").times(2).code(500));
//! server.delay(Delay::new("create", "deployments").by(Duration::from_secs(3)));
//! server.break_watches();                        // every watch stream ends; watchers resume
//! let mut changes = server.subscribe();          // every stored change, in order
//! let cm = server.wait_for("", "configmaps", Some("default"), "x",
//!     Duration::from_secs(10), |o| o.is_some()).await;  // poll-free waiting
//! let served = server.serve().await;             // optional: 127.0.0.1:<port>, plain HTTP
//! let config: kube::Config = served.config();    // or served.kubeconfig_yaml() for a binary
//! let tcp_client = served.client();              // kube::Client over TCP
//! ```
//!
//! To run one scenario on this server and also on a real kube-apiserver
//! where envtest binaries exist (`KUBEBUILDER_ASSETS`), use
//! [`envtest::TestCluster`] (`TestCluster::all().await`, `.client()`,
//! `.install_crds(..)`, `.create_namespace(..)`, `.server()` for the hooks
//! above); tests/apiserver_parity.rs does so.
//!
//! `kube::Client::try_from(config)` builds kube's TLS stack, and this crate
//! compiles two rustls crypto providers (ring via kube, aws-lc-rs via
//! reqwest): a process must install one before that, or rustls panics.
//! [`install_crypto_provider`] does (and [`Served::client`] calls it); the
//! in-process [`ApiServer::client`] needs none.
//!
//! Everything is in memory; an `ApiServer` is cheap, make one per test.
//! `ApiServer` is `Clone` (all clones share one store). Request handling
//! needs a tokio runtime (watches use timers); construction does not.
//!
//! # What it does
//!
//! * Kinds: core/v1 pods, services, secrets, configmaps, events,
//!   namespaces, serviceaccounts, endpoints, persistentvolumeclaims;
//!   apps/v1 deployments, statefulsets, replicasets; coordination.k8s.io/v1
//!   leases; events.k8s.io/v1 events; apiextensions.k8s.io/v1
//!   customresourcedefinitions; admissionregistration.k8s.io/v1
//!   validatingadmissionpolicies and validatingadmissionpolicybindings.
//!   Creating a CRD (through the API or [`ApiServer::install_crd`])
//!   registers its kind: group, served versions,
//!   scope, short names and the status subresource come from the CRD. The
//!   CRD reports `Established` at once.
//! * Metadata: `uid`, `creationTimestamp`, `resourceVersion` (one global
//!   counter), `generation` (1 on create, +1 when anything outside
//!   `metadata` — and outside `status` for kinds with a status subresource —
//!   changes), `generateName`, `deletionTimestamp`.
//! * Verbs: get; list (all namespaces too) with `labelSelector` (`=`, `==`,
//!   `!=`, `in`, `notin`, exists, `!`) and `fieldSelector` (`=`, `==`, `!=`
//!   on any dotted path, e.g. `metadata.name`, `metadata.namespace`);
//!   create (409 AlreadyExists, 404 when the namespace is missing, 403 when
//!   it is terminating, 422 on a missing/invalid name); update/PUT (409
//!   Conflict on a stale `resourceVersion` or a different `uid`; without a
//!   `resourceVersion` it is unconditional for built-in kinds and 422 for
//!   custom resources, as on a real apiserver); delete with
//!   `preconditions`, finalizers (sets `deletionTimestamp`, the object goes
//!   once the last finalizer is removed; no new finalizers may be added
//!   meanwhile: 422), `propagationPolicy` and owner-reference cascade;
//!   deletecollection; `dryRun=All` on writes.
//! * Patches: JSON patch (all six ops, `test` failures → 422 Invalid),
//!   merge patch, strategic merge patch (treated as a merge patch: lists
//!   are replaced, never merged by key; `$patch` directives are not
//!   understood; refused with 415 for custom resources, as on a real
//!   apiserver), server-side apply (below).
//! * Status subresource: `/status` PUT/PATCH/apply change only `status`
//!   (other changes in the body are ignored) and never bump `generation`;
//!   the main endpoint ignores changes to `status`; `status` is dropped on
//!   create.
//! * Writes that change nothing are no-ops: no new `resourceVersion`, no
//!   watch event (as on a real apiserver). They still count as write
//!   *requests* in [`ApiServer::writes`]; [`ApiServer::mutation_count`]
//!   counts real changes.
//! * Watch: `?watch=true` streams JSON lines `ADDED`/`MODIFIED`/`DELETED`
//!   filtered by namespace and selectors (an object that stops matching a
//!   selector arrives as `DELETED`, one that starts matching as `ADDED`).
//!   `resourceVersion` absent or `0` → synthetic `ADDED` for the current
//!   state, then live; `resourceVersion=N` → replay of the history after N,
//!   then live; N older than the retained history (see
//!   [`ApiServer::compact_history`], [`ApiServer::set_history_limit`],
//!   default 5000 changes) → an `ERROR` event carrying a 410 `Expired`
//!   Status (as a real apiserver sends it), and the stream ends.
//!   `allowWatchBookmarks=true` → a `BOOKMARK` every
//!   [`ApiServer::set_bookmark_interval`] (default 1 s).
//!   `sendInitialEvents=true` → `ADDED` for the current state then a
//!   `BOOKMARK` annotated `k8s.io/initial-events-end`. `timeoutSeconds`
//!   ends the stream.
//! * Errors are `metav1.Status` JSON with code and reason: 400 BadRequest,
//!   403 Forbidden, 404 NotFound, 409 AlreadyExists / Conflict, 410
//!   Expired, 415 UnsupportedMediaType, 422 Invalid.
//! * Metadata is validated on every kind (422 Invalid): names (DNS
//!   subdomain; DNS label for namespaces and services), label keys and
//!   values, annotation keys and total size, finalizer names, owner
//!   references (required fields, at most one controller).
//! * Built-in kinds: Deployments/StatefulSets/ReplicaSets need a selector
//!   that matches the template labels (immutable afterwards) and
//!   containers with DNS-label names and images (Pods too); Services need
//!   ports in 1..=65535, named when several, and keep their `clusterIP`;
//!   ConfigMap/Secret keys must be valid config keys; a Secret's `type` is
//!   immutable.
//! * Deleting a CRD deletes every object of its kind, then the kind.
//! * Schema pass on every write of a custom resource: null dropping,
//!   pruning, defaults, structural checks and CEL rules from the CRD's
//!   `openAPIV3Schema` (details and gaps below), 422 Invalid with one cause
//!   per failure.
//! * ValidatingAdmissionPolicy + Binding (admissionregistration.k8s.io/v1)
//!   with a `Deny` action are evaluated on CREATE, UPDATE (status writes
//!   included, as `resource/status`) and DELETE — also on the deletes the
//!   garbage collector and namespace deletion make, so a protected object
//!   keeps its namespace `Terminating`: `matchConstraints` (resource rules
//!   with wildcards and subresources, `excludeResourceRules`,
//!   `namespaceSelector`, `objectSelector`), the binding's
//!   `matchResources`, `matchConditions`, `validations` with `message`,
//!   `messageExpression` and `reason` (Forbidden → 403, default Invalid →
//!   422), `failurePolicy`.
//! * Metadata-only requests (`Accept: ...;as=PartialObjectMetadata[List]`,
//!   i.e. `Api<PartialObjectMeta<K>>`, `get_metadata`, `list_metadata`,
//!   metadata watches) answer `meta.k8s.io/v1` PartialObjectMetadata.
//! * Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{g}`,
//!   `/apis/{g}/{v}` (the legacy, non-aggregated form).
//!
//! # Server-side apply
//!
//! Each object keeps, out of band, which field manager owns which field
//! (objects are walked; so are associative lists — `x-kubernetes-list-type:
//! map` in a CRD schema, e.g. `status.conditions` keyed by `type` — whose
//! entries are merged by key and owned field by field; other lists and
//! scalars are whole fields) and what each manager applied last. An apply: creates the object when missing (201);
//! 409 Conflict (reason `Conflict`, one `FieldManagerConflict` cause per
//! field) when it would change a field another manager owns, unless
//! `force=true`, which takes the fields over; removes fields this manager
//! applied before and no longer applies, when no other manager owns them;
//! merges the rest in. Creates, updates and patches make their manager
//! (`fieldManager`, else the User-Agent's product) the sole owner of the
//! fields they change. A `fieldManager` is required (422 without).
//!
//! # Where it differs from a real kube-apiserver
//!
//! * No authentication or authorization (every request is
//!   `system:admin`), no admission webhooks, no mutating admission, no
//!   quotas, no rate limits. ValidatingAdmissionPolicy: parameterised
//!   policies (`paramKind`) and `variables` are not supported (such
//!   policies are skipped), `auditAnnotations` and `Warn`/`Audit` actions
//!   have no effect, `authorizer` is not bound, an expression that fails to
//!   evaluate counts as a failure (`failurePolicy: Ignore` lets it pass).
//! * CRD schemas: covered are dropping nulls of non-nullable fields,
//!   pruning unknown fields (`x-kubernetes-preserve-unknown-fields` and
//!   embedded resources respected), `default`s, `type`, `required`,
//!   `enum`, `minimum`/`maximum`, `minLength`/`maxLength`,
//!   `minItems`/`maxItems`, `maxProperties`, `nullable`,
//!   `x-kubernetes-int-or-string`, and the CEL `x-kubernetes-validations`
//!   (transition rules with `oldSelf` included) through kube's client-side
//!   CEL engine (which refuses, fail-closed, the few CEL functions it lacks;
//!   it does not estimate rule cost, so a CRD a real apiserver refuses for
//!   cost is accepted here). Not covered: `pattern`, `format`,
//!   `oneOf`/`anyOf`/`allOf`/`not`, `uniqueItems`, `x-kubernetes-list-type`
//!   uniqueness, `messageExpression` evaluation details, validation
//!   ratcheting of unchanged fields. Built-in kinds get only the checks
//!   listed above (a real apiserver validates far more: resource
//!   quantities, probes, volumes, security contexts, ...). [`ApiServer::set_schema_validation`] turns the
//!   pass off.
//! * No conversion between versions: an object is stored once per
//!   group/resource and served at any version of its kind with
//!   `apiVersion` rewritten. core/v1 and events.k8s.io/v1 events are
//!   separate stores (a real apiserver serves one store in both shapes).
//! * No `metadata.managedFields` in objects (ownership is kept out of
//!   band). Associative lists are understood only from CRD schemas: lists
//!   of built-in kinds (containers, ports, env, ...) and `listType=set` are
//!   atomic for apply, so two managers cannot share one. Apply conflicts
//!   are reported against managers by name only, not by API
//!   version/operation.
//! * Strategic merge patch = JSON merge patch.
//! * Garbage collection runs synchronously inside the request that removes
//!   an owner (a real one is asynchronous, so a test sees dependents gone
//!   sooner than on a cluster); dependents go when all their owners are
//!   gone. It only reacts to removals: a dependent created with an owner
//!   reference to a UID that never existed stays (a real GC deletes it).
//!   `Foreground` marks the owner with the `foregroundDeletion` finalizer,
//!   deletes the dependents and removes the owner once none is left — every
//!   dependent blocks, `blockOwnerDeletion` is not consulted. `Orphan`
//!   strips the owner reference from dependents right away (no `orphan`
//!   finalizer). Namespace deletion deletes the contents and removes the
//!   namespace once empty (no `kubernetes` spec finalizer).
//! * `metadata.generation` is kept on every kind (a real apiserver keeps
//!   it only where the kind's strategy does, e.g. not on ConfigMaps).
//! * Built-in defaulting covers Secrets (`stringData` folded into base64
//!   `data`, `type: Opaque`), Services (`type: ClusterIP`, an allocated
//!   `clusterIP` kept across updates, port `protocol: TCP`, `targetPort` =
//!   `port`), Deployments/StatefulSets/ReplicaSets (`replicas`,
//!   `revisionHistoryLimit`, `progressDeadlineSeconds`, update strategies,
//!   `podManagementPolicy`, PVC retention policy) and pod specs in Pods and
//!   templates (`restartPolicy`, `terminationGracePeriodSeconds`,
//!   `dnsPolicy`, `securityContext`, `schedulerName`,
//!   `enableServiceLinks`, container
//!   `terminationMessagePath`/`Policy`, `imagePullPolicy`, port
//!   `protocol`, probe timings). Not covered: quantity canonicalisation
//!   (`"1000m"` stays `"1000m"`, a real apiserver stores `"1"`),
//!   `volumeClaimTemplates`/volume defaults, field defaults added by newer
//!   Kubernetes versions. A controller comparing
//!   such fields one by one with its desired state may still churn on a
//!   cluster and not here — prefer server-side apply.
//! * No controllers: Deployments get no pods or status, Services no
//!   endpoints, pods never run; tests play those parts themselves.
//! * When the last finalizer is removed from a deleting object, watchers see
//!   `DELETED` with the final object (finalizers empty).
//! * list: `limit`/`continue` are ignored (everything in one page);
//!   `resourceVersion`/`resourceVersionMatch` on list are ignored (always
//!   the current state); `watch` history is bounded by count, not time.
//! * Timestamps have second precision; `deletionGracePeriodSeconds` is
//!   always 0; pods are removed at once (no graceful termination).
//! * No protobuf, no table output (`kubectl get` printer columns), no
//!   `/openapi`, no aggregated discovery, no `exec`/`logs`/`portforward`/
//!   `scale`/`eviction`/`binding` subresources.

mod admission;
pub mod envtest;
mod patch;
mod schema;
mod selector;
mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use server::Inner;

/// Installs ring as the process-wide rustls crypto provider (idempotent).
/// Needed before `kube::Client::try_from(config)` in this crate.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What happened to a stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created.
    Added,
    /// Changed (including getting a `deletionTimestamp`).
    Modified,
    /// Removed from the store.
    Deleted,
}

/// One stored change, in `resourceVersion` order (see [`ApiServer::subscribe`]).
#[derive(Debug, Clone)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The resourceVersion of this change.
    pub resource_version: u64,
    /// API group ("" for core).
    pub group: String,
    /// Resource plural, e.g. `configmaps`.
    pub resource: String,
    /// Namespace, `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    /// Object name.
    pub name: String,
    /// The object after the change (the last state for `Deleted`).
    pub object: Value,
    /// The object before the change.
    pub old: Option<Value>,
}

/// One request the server answered (see [`ApiServer::requests`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// Resource plural.
    pub resource: String,
    /// `Some("status")` for the status subresource.
    pub subresource: Option<String>,
    /// Namespace in the path.
    pub namespace: Option<String>,
    /// Name in the path.
    pub name: Option<String>,
    /// HTTP status code answered.
    pub code: u16,
    /// Whether the answer was an injected failure.
    pub injected: bool,
}

impl RequestRecord {
    /// Whether the verb writes.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// A failure to inject: the next `times` requests matching `verb` and
/// `resource` (`"*"` matches anything) are answered with `code` and a
/// `metav1.Status` (reason from the code: 409 Conflict, 500 InternalError,
/// 503 ServiceUnavailable, ...) without touching the store.
#[derive(Debug, Clone)]
pub struct Failure {
    verb: String,
    resource: String,
    name: Option<String>,
    pub(crate) remaining: usize,
    pub(crate) code: u16,
}

impl Failure {
    /// Fails the next matching request once with 500.
    pub fn new(verb: &str, resource: &str) -> Self {
        Self {
            verb: verb.into(),
            resource: resource.into(),
            name: None,
            remaining: 1,
            code: 500,
        }
    }
    /// How many matching requests fail.
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = n;
        self
    }
    /// The HTTP status code answered.
    pub fn code(mut self, code: u16) -> Self {
        self.code = code;
        self
    }
    /// Only requests naming this object.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }
    pub(crate) fn matches(&self, r: &RequestRecord) -> bool {
        self.remaining > 0
            && (self.verb == "*" || self.verb == r.verb)
            && (self.resource == "*" || self.resource == r.resource)
            && (self.name.is_none() || self.name == r.name)
    }
}

/// A delay to inject: the next `times` requests matching `verb` and
/// `resource` (`"*"` matches anything) wait `by` before being handled.
#[derive(Debug, Clone)]
pub struct Delay {
    verb: String,
    resource: String,
    pub(crate) remaining: usize,
    pub(crate) by: Duration,
}

impl Delay {
    /// Delays the next matching request once by one second.
    pub fn new(verb: &str, resource: &str) -> Self {
        Self {
            verb: verb.into(),
            resource: resource.into(),
            remaining: 1,
            by: Duration::from_secs(1),
        }
    }
    /// How long each matching request waits.
    pub fn by(mut self, by: Duration) -> Self {
        self.by = by;
        self
    }
    /// How many matching requests wait.
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = n;
        self
    }
    pub(crate) fn matches(&self, verb: &str, resource: &str) -> bool {
        self.remaining > 0
            && (self.verb == "*" || self.verb == verb)
            && (self.resource == "*" || self.resource == resource)
    }
}

/// The in-process API server. Cheap to clone; clones share one store.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// An empty server with the built-in kinds and the namespaces
    /// `default`, `kube-system`, `kube-public` and `kube-node-lease`.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner::new()),
        }
    }

    /// The HTTP service (an axum `Router`) answering the Kubernetes API.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .fallback(server::handle)
            .with_state(self.inner.clone())
    }

    /// A real `kube::Client` talking to this server in-process, default
    /// namespace `default`.
    pub fn client(&self) -> kube::Client {
        self.client_in("default")
    }

    /// A real `kube::Client` whose default namespace is `namespace`.
    pub fn client_in(&self, namespace: &str) -> kube::Client {
        kube::Client::new(self.router(), namespace)
    }

    /// Registers a CRD (as `kubectl apply` of the CRD would). Installing
    /// a CRD whose name already exists replaces the registration.
    ///
    /// # Panics
    /// When the CRD is malformed (this is test support).
    pub fn install_crd(&self, crd: &CustomResourceDefinition) {
        let value = serde_json::to_value(crd).expect("a CRD serializes");
        let name = crd.metadata.name.clone().unwrap_or_default();
        if self
            .inner
            .get_direct(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                None,
                &name,
            )
            .is_some()
        {
            let mut st = self.inner.lock();
            st.delete_crd_direct(&self.inner.tx, &name);
        }
        self.inner
            .create_direct(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                None,
                value,
            )
            .expect("the CRD is valid");
    }

    /// Creates every object of a (multi-document) YAML or JSON manifest, in
    /// order, as `kubectl create -f` would: CRDs, policies, namespaces,
    /// anything of a known kind. Namespaced objects without a namespace go
    /// to `default`. Not counted as requests. Returns the stored objects.
    ///
    /// # Errors
    /// The first document that does not parse or is refused (with the
    /// Status message), after the earlier ones were created.
    pub fn create_manifests(&self, yaml: &str) -> Result<Vec<Value>, String> {
        use serde::Deserialize;
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v = Value::deserialize(doc).map_err(|e| format!("parsing the manifest: {e}"))?;
            if v.is_null() {
                continue;
            }
            out.push(self.inner.create_by_kind(v, "default")?);
        }
        Ok(out)
    }

    /// Creates a namespace (no-op when it exists).
    pub fn create_namespace(&self, name: &str) {
        if self
            .inner
            .get_direct("", "namespaces", None, name)
            .is_none()
        {
            self.inner
                .create_direct(
                    "",
                    "v1",
                    "namespaces",
                    None,
                    json!({"metadata": {"name": name}}),
                )
                .expect("a valid namespace name");
        }
    }

    /// The stored object, read without a request (not counted).
    pub fn object(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.inner.get_direct(group, resource, namespace, name)
    }

    /// Every stored object of a resource, all namespaces (not counted).
    pub fn objects(&self, group: &str, resource: &str) -> Vec<Value> {
        self.inner.list_direct(group, resource)
    }

    /// Waits until the stored object (`None` when absent) satisfies
    /// `pred`, checking now and after every stored change; returns the
    /// object, or panics after `timeout` (this is test support).
    pub async fn wait_for(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        timeout: Duration,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let mut changes = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.object(group, resource, namespace, name);
            if pred(current.as_ref()) {
                return current;
            }
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    panic!("the API server went away while waiting for {resource}/{name}")
                }
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {resource} {namespace:?}/{name}; last state: {current:?}"
                ),
            }
        }
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().current_rv()
    }

    /// Every request answered since the start or [`ApiServer::reset_counts`].
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.lock().requests.clone()
    }

    /// The write requests (create, update, patch, delete, deletecollection)
    /// since the start or [`ApiServer::reset_counts`], including no-op
    /// writes and failed ones, excluding injected failures.
    pub fn writes(&self) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_write() && !r.injected)
            .collect()
    }

    /// `writes().len()`.
    pub fn write_count(&self) -> usize {
        self.writes().len()
    }

    /// Write requests counted by (verb, resource), e.g.
    /// `("patch", "branches/status")` — a subresource is appended to the
    /// resource with a slash.
    pub fn writes_by_verb(&self) -> BTreeMap<(String, String), usize> {
        let mut out = BTreeMap::new();
        for r in self.writes() {
            let res = match &r.subresource {
                Some(s) => format!("{}/{s}", r.resource),
                None => r.resource.clone(),
            };
            *out.entry((r.verb, res)).or_insert(0) += 1;
        }
        out
    }

    /// The write requests made while waiting `window` (for "a steady state
    /// makes no writes": `assert!(server.writes_during(d).await.is_empty())`).
    /// Does not reset any counter.
    pub async fn writes_during(&self, window: Duration) -> Vec<RequestRecord> {
        let start = self.inner.lock().requests.len();
        tokio::time::sleep(window).await;
        let st = self.inner.lock();
        st.requests
            .get(start..)
            .unwrap_or_default()
            .iter()
            .filter(|r| r.is_write() && !r.injected)
            .cloned()
            .collect()
    }

    /// Stored changes (new resourceVersions) since the start or
    /// [`ApiServer::reset_counts`]; no-op writes do not count.
    pub fn mutation_count(&self) -> u64 {
        self.inner.lock().mutations
    }

    /// Clears the request log and the mutation counter.
    pub fn reset_counts(&self) {
        let mut st = self.inner.lock();
        st.requests.clear();
        st.mutations = 0;
    }

    /// Every stored change from now on, in order. A receiver that falls
    /// more than 16384 changes behind gets `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.inner.tx.subscribe()
    }

    /// Injects a failure (see [`Failure`]). Rules are checked in the order
    /// they were added; a rule is dropped once used up.
    pub fn fail(&self, failure: Failure) {
        self.inner.lock().failures.push(failure);
    }

    /// Delays matching requests (see [`Delay`]), e.g. to run into a
    /// controller's deadlines. A delayed request holds no lock while it
    /// waits.
    pub fn delay(&self, delay: Delay) {
        self.inner.lock().delays.push(delay);
    }

    /// Ends every open watch stream at once (as an apiserver restart or a
    /// dropped connection would); watchers reconnect from their last
    /// resourceVersion.
    pub fn break_watches(&self) {
        let _ = self.inner.disconnect.send(());
    }

    /// Drops the watch history: a watch from any older resourceVersion
    /// now gets 410 Expired.
    pub fn compact_history(&self) {
        self.inner.lock().compact();
    }

    /// How many changes the watch history keeps (default 5000).
    pub fn set_history_limit(&self, n: usize) {
        self.inner.lock().history_limit = n.max(1);
    }

    /// Turns the CRD schema pass (pruning, defaulting, structural checks,
    /// CEL rules) on writes of custom resources on or off (default on).
    pub fn set_schema_validation(&self, on: bool) {
        self.inner.lock().validate_schemas = on;
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK
    /// (default 1 s; applies to watches started afterwards).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.inner.lock().bookmark_interval = every;
    }

    /// Serves the API over plain HTTP on `127.0.0.1:<free port>` until the
    /// returned [`Served`] is dropped — for running a real binary against
    /// this server.
    pub async fn serve(&self) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("a bound address");
        let router = self.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Served { addr, task }
    }
}

/// The API served on a local port; stops serving when dropped.
pub struct Served {
    /// The bound address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for this server (namespace `default`).
    pub fn config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("a valid URL"))
    }

    /// A real `kube::Client` for this server over TCP (default namespace
    /// `default`).
    pub fn client(&self) -> kube::Client {
        install_crypto_provider();
        kube::Client::try_from(self.config()).expect("a client for a local URL")
    }

    /// A kubeconfig file's contents pointing at this server, for a binary
    /// started with `KUBECONFIG=<file>`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: pgbranch-test\n  cluster:\n    server: {}\nusers:\n- name: pgbranch-test\n  user: {{}}\ncontexts:\n- name: pgbranch-test\n  context:\n    cluster: pgbranch-test\n    user: pgbranch-test\n    namespace: default\ncurrent-context: pgbranch-test\n",
            self.url()
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}
