//! The test kubelet: the one stand-in of the operator tests. The real
//! controller manager turns a compute Deployment into a ReplicaSet and
//! Pods; this plays the scheduler and the kubelet for those Pods, in one
//! namespace:
//!
//! * binds each compute Pod (label `pgbranch.dev/timeline`) to the test
//!   Node through the `binding` subresource, as a scheduler does;
//! * starts a real PostgreSQL for it on the timeline's data directory
//!   ([`Engine::start_postgres`]; a replica Pod gets a hot standby through
//!   [`Engine::start_replica_postgres`], streaming from the primary its
//!   `primary_conninfo` names, with `PGPASSWORD` from the Secret its env
//!   names) on a free local port, and gives the Pod an address of its own
//!   (10.250.x.y: only a key to find the server, no traffic goes there;
//!   Endpoints refuse loopback addresses);
//! * mounts the Pod's Secret and emptyDir volumes, keeps the Secrets'
//!   files in sync, runs its init containers, and gives postgres the
//!   container's TLS settings with those files ([`super::pod_volumes`]), so
//!   a compute with TLS on serves its certificate and `pg_hba.conf`;
//! * reports the Pod through its status subresource as a kubelet would:
//!   `Running`, the `Ready`/`ContainersReady` conditions, the pod IP, the
//!   container's state — or, when postgres does not start, the container
//!   waiting in `CrashLoopBackOff` with postgres's last log line, retried
//!   with a growing back-off;
//! * has the images a node of this workplace has — the compute image
//!   (`postgres:15`) and nothing else, nothing can be pulled: a Pod that
//!   asks for another image waits in `ImagePullBackOff`, as on a node
//!   without registry access;
//! * on a Pod's deletion (it gets a `deletionTimestamp`) stops postgres
//!   (fast shutdown) and then removes the Pod (grace period 0), as a
//!   kubelet does once its containers are gone.
//!
//! From there the real controllers take over: the ReplicaSet and
//! Deployment report ready replicas, and the EndpointSlice controller puts
//! the Pod behind every Service that selects it. [`Kubelet::resolve_service`]
//! follows a Service's EndpointSlices to the compute (what kube-proxy does),
//! so tests and — through [`KubeletResolver`] — the operator connect
//! "through the Service".
//!
//! Where it differs from a real node: postgres runs as the engine's run-as
//! user on 127.0.0.1 (not in a container, not with the Pod's image, probes
//! or resources, and of its args only the TLS settings); the Pod's address
//! is only a key to find the port.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use pgbranch::api::{LABEL_REPLICA_ORDINAL, LABEL_ROLE, LABEL_TIMELINE};
use pgbranch::compute::secret_value;
use pgbranch::controller::{ComputeResolver, Error as ControllerError};
use pgbranch::storage::engine::{Engine, PgServer, StopMode};
use pgbranch::storage::{Password, TimelineId};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::cluster::NODE;
use super::pod_volumes::PodFiles;

/// The images this node has (nothing can be pulled).
pub const IMAGES: &[&str] = &[
    pgbranch::compute::DEFAULT_IMAGE,
    "docker.io/library/postgres:15",
];

/// Pod addresses handed out so far (unique across the test binary).
/// Nothing listens on them: an address only names a local server.
static ADDRESSES: AtomicU32 = AtomicU32::new(0);

fn next_address() -> String {
    let n = ADDRESSES.fetch_add(1, Ordering::Relaxed) + 2;
    Ipv4Addr::new(10, 250, (n / 250) as u8, (n % 250 + 1) as u8).to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Running {
    server: PgServer,
    timeline: String,
    /// The data directory it runs on: `<timeline>` or
    /// `<timeline>/replica/<n>`.
    data: String,
    address: String,
    /// The Deployment that owns the Pod's ReplicaSet.
    deployment: String,
    /// Its mounted volumes (dropped after the server).
    _files: PodFiles,
}

struct Inner {
    client: Client,
    namespace: String,
    engine: Engine,
    /// By Pod name.
    running: Mutex<HashMap<String, Running>>,
    /// Servers being stopped: (timeline, data directory key).
    stopping: Mutex<Vec<(String, String)>>,
    /// Pods started on a data directory another Pod's postgres still held
    /// (two servers on one data directory corrupt it): must stay empty.
    conflicts: Mutex<Vec<String>>,
    /// One worker per Pod, fed the Pod's latest state (`None`: gone).
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<Option<Pod>>>>,
    /// Where Pods' volumes are mounted.
    volumes: tempfile::TempDir,
}

/// The test kubelet of one namespace; dropping it kills every server it
/// started.
pub struct Kubelet {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

/// The [`ComputeResolver`] the operator gets in tests.
#[derive(Clone)]
pub struct KubeletResolver(Arc<Inner>);

impl Kubelet {
    /// Starts serving the compute Pods of `namespace`.
    pub fn start(client: Client, namespace: &str, engine: Engine) -> Self {
        let inner = Arc::new(Inner {
            client: client.clone(),
            namespace: namespace.to_string(),
            engine,
            running: Mutex::new(HashMap::new()),
            stopping: Mutex::new(Vec::new()),
            conflicts: Mutex::new(Vec::new()),
            workers: Mutex::new(HashMap::new()),
            volumes: {
                let d = tempfile::Builder::new()
                    .prefix("pgbranch-kubelet-")
                    .tempdir()
                    .expect("kubelet volumes dir");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755))
                    .expect("chmod kubelet volumes dir");
                d
            },
        });
        let api: Api<Pod> = Api::namespaced(client, namespace);
        let cfg = watcher::Config::default().labels(LABEL_TIMELINE);
        let me = inner.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, cfg).boxed();
            let mut listed: Option<Vec<String>> = None;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Init) => listed = Some(vec![]),
                    Ok(watcher::Event::InitApply(p)) => {
                        if let Some(l) = listed.as_mut() {
                            l.push(p.name_any());
                        }
                        me.feed(p.name_any(), Some(p));
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(seen) = listed.take() {
                            let gone: Vec<String> = me
                                .workers
                                .lock()
                                .unwrap()
                                .keys()
                                .filter(|k| !seen.contains(k))
                                .cloned()
                                .collect();
                            for name in gone {
                                me.feed(name, None);
                            }
                        }
                    }
                    Ok(watcher::Event::Apply(p)) => me.feed(p.name_any(), Some(p)),
                    Ok(watcher::Event::Delete(p)) => me.feed(p.name_any(), None),
                    Err(e) => {
                        eprintln!("kubelet: watch error: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Self { inner, task }
    }

    /// The resolver to put in the operator's Context.
    pub fn resolver(&self) -> KubeletResolver {
        KubeletResolver(self.inner.clone())
    }

    /// The local port of a ready compute behind the Service `name` (of
    /// this kubelet's namespace), found through its EndpointSlices.
    pub async fn resolve_service(&self, name: &str) -> Option<u16> {
        self.inner.resolve(name).await
    }

    /// The local port of the server of a Pod of the Deployment `name`.
    pub fn deployment_port(&self, name: &str) -> Option<u16> {
        self.inner
            .running
            .lock()
            .unwrap()
            .values()
            .find(|r| r.deployment == name)
            .map(|r| r.server.port)
    }

    /// Timelines with a server running (or still stopping).
    pub async fn running_timelines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .running
            .lock()
            .unwrap()
            .values()
            .map(|r| r.timeline.clone())
            .collect();
        v.extend(
            self.inner
                .stopping
                .lock()
                .unwrap()
                .iter()
                .map(|s| s.0.clone()),
        );
        v
    }

    /// Pods that were started while another Pod's postgres still held
    /// their data directory (see the module docs); empty unless the
    /// operator let two computes share one.
    pub fn conflicts(&self) -> Vec<String> {
        self.inner.conflicts.lock().unwrap().clone()
    }

    /// Stops every server.
    pub async fn shutdown(self) {
        self.task.abort();
        self.inner.workers.lock().unwrap().clear();
        let names: Vec<String> = self.inner.running.lock().unwrap().keys().cloned().collect();
        for n in names {
            self.inner.stop(&n).await;
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        self.inner
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // PgServer's Drop kills what is left.
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// The waiting reason of the Pod's first container, if it waits.
fn waiting_reason(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

/// The first image of the Pod this node does not have.
fn missing_image(p: &Pod) -> Option<String> {
    p.spec
        .as_ref()?
        .containers
        .iter()
        .filter_map(|c| c.image.clone())
        .find(|i| !IMAGES.contains(&i.as_str()))
}

/// The Deployment owning a Pod: its ReplicaSet's name less the template hash.
fn deployment_of(p: &Pod) -> String {
    let rs = p
        .owner_references()
        .iter()
        .find(|o| o.kind == "ReplicaSet")
        .map(|o| o.name.clone())
        .unwrap_or_default();
    match p.labels().get("pod-template-hash") {
        Some(h) => rs.strip_suffix(&format!("-{h}")).unwrap_or(&rs).to_string(),
        None => rs,
    }
}

impl Inner {
    /// Hands a Pod's state to its worker (started on first sight).
    fn feed(self: &Arc<Self>, name: String, pod: Option<Pod>) {
        let mut workers = self.workers.lock().unwrap();
        if let Some(tx) = workers.get(&name) {
            if tx.send(pod.clone()).is_ok() {
                if pod.is_none() {
                    workers.remove(&name);
                }
                return;
            }
        }
        let Some(pod) = pod else {
            // Gone before we saw it (or its worker ended): make sure
            // nothing runs for it.
            let me = self.clone();
            tokio::spawn(async move { me.stop(&name).await });
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Some(pod));
        workers.insert(name.clone(), tx);
        let me = self.clone();
        tokio::spawn(async move { me.work(name, rx).await });
    }

    /// One Pod's life: bind, start, report, and stop on deletion.
    async fn work(self: Arc<Self>, name: String, mut rx: mpsc::UnboundedReceiver<Option<Pod>>) {
        let mut backoff = Duration::from_secs(1);
        let mut failures = 0u32;
        // After a failed start: when to try again, and the Pod to start.
        let mut retry: Option<(tokio::time::Instant, Pod)> = None;
        loop {
            // The next state of the Pod; or, at the retry time, the Pod again.
            let next = match &retry {
                None => rx.recv().await,
                Some((at, pod)) => match tokio::time::timeout_at(*at, rx.recv()).await {
                    Ok(v) => v,
                    Err(_) => Some(Some(pod.clone())),
                },
            };
            let Some(mut state) = next else {
                self.stop(&name).await;
                return;
            };
            while let Ok(newer) = rx.try_recv() {
                state = newer;
            }
            let Some(pod) = state else {
                self.stop(&name).await;
                return;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                self.stop(&name).await;
                self.remove(&pod).await;
                retry = None;
                continue;
            }
            let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE);
            if !bound {
                self.bind(&pod).await;
                continue;
            }
            if self.running.lock().unwrap().contains_key(&name) {
                continue;
            }
            if let Some(image) = missing_image(&pod) {
                if waiting_reason(&pod).as_deref() != Some("ImagePullBackOff") {
                    self.report_image_pull(&pod, &image).await;
                }
                continue;
            }
            // Back off between starts, whatever events come meanwhile
            // (our own status reports among them).
            if let Some((at, _)) = &retry {
                if tokio::time::Instant::now() < *at {
                    retry = Some((*at, pod));
                    continue;
                }
            }
            match self.start(&pod).await {
                Ok(()) => {
                    retry = None;
                    failures = 0;
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    failures += 1;
                    self.report_crash(&pod, &e, failures).await;
                    retry = Some((tokio::time::Instant::now() + backoff, pod));
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn bind(&self, pod: &Pod) {
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": pod.name_any()},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        });
        if let Err(e) = self
            .pods()
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &pod.name_any(),
                &PostParams::default(),
                &binding,
            )
            .await
        {
            eprintln!("kubelet: binding {}: {e}", pod.name_any());
        }
    }

    /// Starts postgres for a bound Pod and reports it Running and Ready.
    async fn start(&self, pod: &Pod) -> Result<(), String> {
        let timeline = pod
            .labels()
            .get(LABEL_TIMELINE)
            .cloned()
            .unwrap_or_default();
        let id = TimelineId::new(timeline.clone()).map_err(|e| e.to_string())?;
        let replica = pod.labels().get(LABEL_ROLE).map(String::as_str) == Some("replica");
        let data = match pod.labels().get(LABEL_REPLICA_ORDINAL).filter(|_| replica) {
            Some(n) => format!("{timeline}/replica/{n}"),
            None => timeline.clone(),
        };
        // A real node would start this container on the shared volume
        // whatever else uses it; here it is caught and recorded.
        let holder = {
            let running = self.running.lock().unwrap();
            running
                .iter()
                .find(|(n, r)| **n != pod.name_any() && r.data == data)
                .map(|(n, _)| format!("pod {n}"))
                .or_else(|| {
                    self.stopping
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|s| s.1 == data)
                        .then(|| "a pod still stopping".to_string())
                })
        };
        if let Some(holder) = holder {
            let what = format!(
                "pod {} started on data directory {data} while {holder} still ran postgres on it",
                pod.name_any()
            );
            self.conflicts.lock().unwrap().push(what.clone());
            return Err(format!("the data directory is in use: {what}"));
        }
        // The Pod runs as the owner of its data directory.
        let owner = {
            use std::os::unix::fs::MetadataExt;
            let dir = match pod.labels().get(LABEL_REPLICA_ORDINAL).filter(|_| replica) {
                Some(n) => self
                    .engine
                    .replica_data_dir(&id, n.parse().map_err(|_| "bad replica ordinal")?),
                None => self.engine.data_dir(&id),
            };
            let m = std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            (m.uid(), m.gid())
        };
        let files = PodFiles::prepare(
            &self.client,
            &self.namespace,
            pod,
            owner,
            self.volumes.path(),
        )
        .await?;
        let container = pod
            .spec
            .as_ref()
            .and_then(|p| p.containers.first())
            .ok_or("no container")?;
        let settings = files.tls_settings(container);
        let server = if replica {
            self.start_replica(pod, &id, &files, &settings).await?
        } else {
            self.engine
                .start_postgres_with(&id, free_port(), &settings)
                .await
                .map_err(|e| e.to_string())?
        };
        let address = next_address();
        self.running.lock().unwrap().insert(
            pod.name_any(),
            Running {
                server,
                timeline,
                data,
                address: address.clone(),
                deployment: deployment_of(pod),
                _files: files,
            },
        );
        let now = jiff::Timestamp::now().to_string();
        let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": address, "podIPs": [{"ip": address}],
            "startTime": now,
            "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"),
                           cond("ContainersReady"), cond("Ready"), cond("PodScheduled")],
            "containerStatuses": self.container_statuses(pod, json!({"running": {"startedAt": now}}), true, None, 0),
        }});
        self.patch_status(pod, &status).await;
        Ok(())
    }

    fn container_statuses(
        &self,
        pod: &Pod,
        state: serde_json::Value,
        ready: bool,
        last: Option<serde_json::Value>,
        restarts: u32,
    ) -> serde_json::Value {
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        json!(containers
            .iter()
            .map(|c| json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "ready": ready, "started": ready, "restartCount": restarts,
                "state": state, "lastState": last.clone().unwrap_or(json!({})),
            }))
            .collect::<Vec<_>>())
    }

    /// A container whose image is not on the node and cannot be pulled.
    async fn report_image_pull(&self, pod: &Pod, image: &str) {
        let now = jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "phase": "Pending",
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
                {"type": "Ready", "status": "False", "lastTransitionTime": now}],
            "containerStatuses": self.container_statuses(
                pod,
                json!({"waiting": {"reason": "ImagePullBackOff",
                    "message": format!("Back-off pulling image \"{image}\"")}}),
                false,
                None,
                0,
            ),
        }});
        self.patch_status(pod, &status).await;
    }

    /// A container that exits at once: `CrashLoopBackOff`, postgres's last
    /// log line in the last state, as a kubelet reports it.
    async fn report_crash(&self, pod: &Pod, error: &str, restarts: u32) {
        eprintln!("kubelet: {} does not start: {error}", pod.name_any());
        let last_line = error
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(error)
            .to_string();
        let now = jiff::Timestamp::now().to_string();
        let name = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let not_ready = |t: &str| {
            json!({"type": t, "status": "False", "lastTransitionTime": now,
            "reason": "ContainersNotReady", "message": format!("containers with unready status: [{name}]")})
        };
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                not_ready("ContainersReady"), not_ready("Ready")],
            "containerStatuses": self.container_statuses(
                pod,
                json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off restarting failed container {name} in pod {}", pod.name_any())}}),
                false,
                Some(json!({"terminated": {"exitCode": 1, "reason": "Error", "message": last_line,
                    "startedAt": now, "finishedAt": now}})),
                restarts,
            ),
        }});
        self.patch_status(pod, &status).await;
    }

    async fn patch_status(&self, pod: &Pod, status: &serde_json::Value) {
        if let Err(e) = self
            .pods()
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await
        {
            eprintln!("kubelet: status of {}: {e}", pod.name_any());
        }
    }

    /// Removes a Pod whose containers are gone (grace period 0).
    async fn remove(&self, pod: &Pod) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.pods().delete(&pod.name_any(), &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => eprintln!("kubelet: removing {}: {e}", pod.name_any()),
        }
    }

    /// A hot standby for a replica Pod (see the module docs).
    async fn start_replica(
        &self,
        pod: &Pod,
        id: &TimelineId,
        files: &PodFiles,
        settings: &[(String, String)],
    ) -> Result<PgServer, String> {
        let ordinal: u32 = pod
            .labels()
            .get(LABEL_REPLICA_ORDINAL)
            .and_then(|o| o.parse().ok())
            .ok_or("no replica ordinal label")?;
        let container = pod
            .spec
            .as_ref()
            .and_then(|p| p.containers.first())
            .ok_or("no container")?;
        let conninfo = container
            .args
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix("primary_conninfo="))
            .ok_or("no primary_conninfo argument")?;
        let mut local = vec![];
        for kv in conninfo.split_whitespace() {
            match kv.split_once('=') {
                Some(("host", h)) => {
                    let svc = h.split('.').next().unwrap_or(h);
                    let port = self.resolve(svc).await.ok_or_else(|| {
                        format!("no ready primary behind Service {}/{svc}", self.namespace)
                    })?;
                    // The Service's name stays the host (TLS checks it);
                    // the address is the primary's.
                    local.push(format!("host={h}"));
                    local.push("hostaddr=127.0.0.1".to_string());
                    local.push(format!("port={port}"));
                }
                Some(("port", _)) => {}
                _ => local.push(files.rewrite(kv)),
            }
        }
        let secret_ref = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "PGPASSWORD")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.secret_key_ref.as_ref())
            .ok_or("no PGPASSWORD secretKeyRef")?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret = secrets
            .get(&secret_ref.name)
            .await
            .map_err(|e| format!("reading Secret {}: {e}", secret_ref.name))?;
        let password = secret_value(&secret, &secret_ref.key)
            .ok_or_else(|| format!("Secret {} has no {}", secret_ref.name, secret_ref.key))?;
        self.engine
            .start_replica_postgres_with(
                id,
                ordinal,
                free_port(),
                &local.join(" "),
                Some(&Password(password)),
                settings,
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// Stops a Pod's server; its timeline counts as running until the
    /// server is gone.
    async fn stop(&self, name: &str) {
        let r = self.running.lock().unwrap().remove(name);
        if let Some(r) = r {
            self.stopping
                .lock()
                .unwrap()
                .push((r.timeline.clone(), r.data.clone()));
            if let Err(e) = r.server.stop(StopMode::Fast).await {
                eprintln!("kubelet: stopping {name}: {e}");
            }
            let mut stopping = self.stopping.lock().unwrap();
            if let Some(i) = stopping.iter().position(|t| t.1 == r.data) {
                stopping.remove(i);
            }
        }
    }

    /// Follows the Service's EndpointSlices to a ready endpoint's server.
    async fn resolve(&self, service: &str) -> Option<u16> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
        let slices = api.list(&lp).await.ok()?;
        let ready: Vec<String> = slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        let running = self.running.lock().unwrap();
        ready.iter().find_map(|addr| {
            running
                .values()
                .find(|r| &r.address == addr)
                .map(|r| r.server.port)
        })
    }
}

#[async_trait]
impl ComputeResolver for KubeletResolver {
    async fn resolve(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<(String, u16), ControllerError> {
        if namespace != self.0.namespace {
            return Err(ControllerError::Waiting(format!(
                "the test kubelet serves namespace {}, not {namespace}",
                self.0.namespace
            )));
        }
        match self.0.resolve(service).await {
            Some(port) => Ok(("127.0.0.1".into(), port)),
            None => Err(ControllerError::Waiting(format!(
                "no ready compute behind Service {namespace}/{service}"
            ))),
        }
    }
}
