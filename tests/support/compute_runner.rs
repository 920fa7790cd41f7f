//! A local "kubelet" for compute Deployments.
//!
//! It watches Deployments labelled `pgbranch.dev/timeline` (through the same
//! API server the operator uses). For one that wants at least one replica it
//! starts a real PostgreSQL on that timeline's data directory through
//! [`Engine::start_postgres`] on a free local port, then reports the
//! Deployment ready in its status (`replicas`, `readyReplicas`,
//! `availableReplicas`, `observedGeneration`) — only when that status
//! changes, so it makes no writes in a steady state. A Deployment scaled to
//! zero or deleted has its server stopped (fast shutdown).
//!
//! [`ComputeRunner::resolve_service`] follows a Service's selector to the
//! running compute whose pod labels it matches, so tests (and, through
//! [`RunnerResolver`], the operator) connect "through the Service".
//!
//! A replica Deployment (`pgbranch.dev/role: replica`) gets a hot standby
//! on its replica's data directory through [`Engine::start_replica_postgres`]:
//! the `primary_conninfo` of its arguments with the host and port rewritten
//! to the local port of the primary the Service named by the host selects,
//! and `PGPASSWORD` read from the Secret its env's `secretKeyRef` names.
//!
//! Where it differs from a kubelet: postgres runs as the engine's run-as
//! user on 127.0.0.1 (not in a container, not with the pod's image, probes
//! or resources); one process per Deployment whatever `replicas` says;
//! Deployments are not rolled (a changed pod template is not restarted).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use pgbranch::api::{LABEL_ROLE, LABEL_TIMELINE};
use pgbranch::compute::{secret_value, LABEL_REPLICA_ORDINAL};
use pgbranch::controller::{ComputeResolver, Error as ControllerError};
use pgbranch::storage::engine::{Engine, PgServer, StopMode};
use pgbranch::storage::{Password, TimelineId};
use serde_json::json;
use std::sync::Mutex;
use tokio::task::JoinHandle;

struct Running {
    server: PgServer,
    pod_labels: BTreeMap<String, String>,
    timeline: String,
}

type Key = (String, String);

struct Inner {
    client: Client,
    engine: Engine,
    running: Mutex<HashMap<Key, Running>>,
}

/// The runner; dropping it stops every server it started.
pub struct ComputeRunner {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

/// The [`ComputeResolver`] of the operator's Context in tests.
#[derive(Clone)]
pub struct RunnerResolver(Arc<Inner>);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl ComputeRunner {
    /// Starts watching Deployments in every namespace.
    pub fn start(client: Client, engine: Engine) -> Self {
        let inner = Arc::new(Inner {
            client: client.clone(),
            engine,
            running: Mutex::new(HashMap::new()),
        });
        let api: Api<Deployment> = Api::all(client);
        let cfg = watcher::Config::default().labels(LABEL_TIMELINE);
        let me = inner.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, cfg).boxed();
            let mut seen_in_init: Option<Vec<Key>> = None;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Init) => seen_in_init = Some(vec![]),
                    Ok(watcher::Event::InitApply(d)) => {
                        if let Some(s) = seen_in_init.as_mut() {
                            s.push(key(&d));
                        }
                        me.sync(&d).await;
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(seen) = seen_in_init.take() {
                            let gone: Vec<Key> = me
                                .running
                                .lock()
                                .unwrap()
                                .keys()
                                .filter(|k| !seen.contains(k))
                                .cloned()
                                .collect();
                            for k in gone {
                                me.stop(&k).await;
                            }
                        }
                    }
                    Ok(watcher::Event::Apply(d)) => me.sync(&d).await,
                    Ok(watcher::Event::Delete(d)) => me.stop(&key(&d)).await,
                    Err(e) => {
                        eprintln!("compute runner: watch error: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Self { inner, task }
    }

    /// The resolver to put in the operator's Context.
    pub fn resolver(&self) -> RunnerResolver {
        RunnerResolver(self.inner.clone())
    }

    /// The local port of the compute the Service `ns/name` selects.
    pub async fn resolve_service(&self, ns: &str, name: &str) -> Option<u16> {
        self.inner.resolve(ns, name).await
    }

    /// The local port of the server of the Deployment `ns/name`.
    pub fn deployment_port(&self, ns: &str, name: &str) -> Option<u16> {
        self.inner
            .running
            .lock()
            .unwrap()
            .get(&(ns.to_string(), name.to_string()))
            .map(|r| r.server.port)
    }

    /// Timelines with a running server.
    pub async fn running_timelines(&self) -> Vec<String> {
        self.inner
            .running
            .lock()
            .unwrap()
            .values()
            .map(|r| r.timeline.clone())
            .collect()
    }

    /// Stops every server.
    pub async fn shutdown(self) {
        self.task.abort();
        let keys: Vec<Key> = self.inner.running.lock().unwrap().keys().cloned().collect();
        for k in keys {
            self.inner.stop(&k).await;
        }
    }
}

impl Drop for ComputeRunner {
    fn drop(&mut self) {
        self.task.abort();
        // PgServer's Drop kills what is left.
        // Never held across an await, so this cannot block for long; a
        // poisoned lock still holds the servers.
        let mut r = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        r.clear();
    }
}

fn key(d: &Deployment) -> Key {
    (d.namespace().unwrap_or_default(), d.name_any())
}

impl Inner {
    async fn sync(&self, d: &Deployment) {
        let k = key(d);
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) >= 1
            && d.metadata.deletion_timestamp.is_none();
        let timeline = d.labels().get(LABEL_TIMELINE).cloned().unwrap_or_default();
        let running = self.running.lock().unwrap().contains_key(&k);
        if want && !running {
            let Ok(id) = TimelineId::new(timeline.clone()) else {
                eprintln!("compute runner: bad timeline label {timeline:?}");
                return;
            };
            let replica = d.labels().get(LABEL_ROLE).map(String::as_str) == Some("replica");
            let mut last = None;
            for _ in 0..if replica { 40 } else { 5 } {
                let started = if replica {
                    self.start_replica(d, &id).await
                } else {
                    self.engine
                        .start_postgres(&id, free_port())
                        .await
                        .map_err(|e| e.to_string())
                };
                match started {
                    Ok(server) => {
                        let pod_labels = d
                            .spec
                            .as_ref()
                            .and_then(|s| s.template.metadata.as_ref())
                            .and_then(|m| m.labels.clone())
                            .unwrap_or_default();
                        self.running.lock().unwrap().insert(
                            k.clone(),
                            Running {
                                server,
                                pod_labels,
                                timeline: timeline.clone(),
                            },
                        );
                        last = None;
                        break;
                    }
                    Err(e) => {
                        last = Some(e);
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    }
                }
            }
            if let Some(e) = last {
                eprintln!("compute runner: cannot start {}/{}: {e}", k.0, k.1);
                return;
            }
        } else if !want && running {
            self.stop(&k).await;
        }
        if d.metadata.deletion_timestamp.is_none() {
            self.report(d, want).await;
        }
    }

    /// A hot standby for a replica Deployment (see the module docs).
    async fn start_replica(&self, d: &Deployment, id: &TimelineId) -> Result<PgServer, String> {
        let ns = d.namespace().unwrap_or_default();
        let ordinal: u32 = d
            .labels()
            .get(LABEL_REPLICA_ORDINAL)
            .and_then(|o| o.parse().ok())
            .ok_or("no replica ordinal label")?;
        let container = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
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
                    let port = self
                        .resolve(&ns, svc)
                        .await
                        .ok_or_else(|| format!("no running primary behind Service {ns}/{svc}"))?;
                    local.push("host=127.0.0.1".to_string());
                    local.push(format!("port={port}"));
                }
                Some(("port", _)) => {}
                _ => local.push(kv.to_string()),
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
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let secret = secrets
            .get(&secret_ref.name)
            .await
            .map_err(|e| format!("reading Secret {}: {e}", secret_ref.name))?;
        let password = secret_value(&secret, &secret_ref.key)
            .ok_or_else(|| format!("Secret {} has no {}", secret_ref.name, secret_ref.key))?;
        self.engine
            .start_replica_postgres(
                id,
                ordinal,
                free_port(),
                &local.join(" "),
                Some(&Password(password)),
            )
            .await
            .map_err(|e| e.to_string())
    }

    async fn report(&self, d: &Deployment, up: bool) {
        let n = i32::from(up);
        let gen = d.metadata.generation.unwrap_or(0);
        let st = d.status.clone().unwrap_or_default();
        if st.ready_replicas.unwrap_or(0) == n
            && st.available_replicas.unwrap_or(0) == n
            && st.replicas.unwrap_or(0) == n
            && st.observed_generation == Some(gen)
        {
            return;
        }
        let api: Api<Deployment> =
            Api::namespaced(self.client.clone(), &d.namespace().unwrap_or_default());
        let patch = json!({"status": {
            "replicas": n, "readyReplicas": n, "availableReplicas": n,
            "updatedReplicas": n, "observedGeneration": gen,
        }});
        if let Err(e) = api
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            eprintln!("compute runner: status of {}: {e}", d.name_any());
        }
    }

    async fn stop(&self, k: &Key) {
        let r = self.running.lock().unwrap().remove(k);
        if let Some(r) = r {
            if let Err(e) = r.server.stop(StopMode::Fast).await {
                eprintln!("compute runner: stopping {}/{}: {e}", k.0, k.1);
            }
        }
    }

    async fn resolve(&self, ns: &str, name: &str) -> Option<u16> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let svc = api.get_opt(name).await.ok()??;
        let sel = svc.spec?.selector?;
        let running = self.running.lock().unwrap();
        running
            .iter()
            .filter(|((rns, _), _)| rns == ns)
            .find(|(_, r)| sel.iter().all(|(k, v)| r.pod_labels.get(k) == Some(v)))
            .map(|(_, r)| r.server.port)
    }
}

#[async_trait]
impl ComputeResolver for RunnerResolver {
    async fn resolve(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<(String, u16), ControllerError> {
        match self.0.resolve(namespace, service).await {
            Some(port) => Ok(("127.0.0.1".into(), port)),
            None => Err(ControllerError::Waiting(format!(
                "no running compute behind Service {namespace}/{service}"
            ))),
        }
    }
}
