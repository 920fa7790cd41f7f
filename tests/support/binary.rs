//! The real `pgbranch operator` binary in a test's world: started as the
//! operator's ServiceAccount of the test's namespace with the RBAC we ship
//! (the operator's ClusterRole and the leader-election Role), watching that
//! namespace and keeping its Lease there, as a developer would start it on
//! one machine (no `POD_NAME`, no `HOSTNAME`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};

use super::cluster::kubeconfig_yaml;
use super::world::{World, OPERATOR_SA};

/// The operator's Lease name.
pub const LEASE: &str = "pgbranch-operator";

/// A child process killed when dropped, with its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("a log file");
        let err = out.try_clone().expect("a second handle on the log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc { child, log }
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Waits (up to `secs`) for it to exit; its status.
    pub async fn wait(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if start.elapsed().as_secs() > secs {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free local port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// The uid the embedded engine runs PostgreSQL as: `postgres` under root,
/// else the current user.
pub fn engine_uid() -> u32 {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("a postgres user (scripts/setup.sh installs PostgreSQL)")
            .uid
            .as_raw()
    } else {
        nix::unistd::geteuid().as_raw()
    }
}

impl World {
    /// Binds the shipped leader-election Role, in this namespace, to the
    /// ServiceAccount `sa` of this namespace.
    pub async fn grant_leader_election(&self, sa: &str) {
        let yaml = include_str!("../../config/rbac/leader_election_role.yaml");
        let mut role: Role = serde_yaml::from_str(yaml).expect("the leader-election Role");
        role.metadata.namespace = Some(self.ns.clone());
        self.api::<Role>()
            .patch(
                "pgbranch-leader-election",
                &PatchParams::apply("pgbranch-tests").force(),
                &Patch::Apply(&role),
            )
            .await
            .expect("apply the leader-election Role");
        let binding: RoleBinding = serde_json::from_value(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{sa}-leader-election")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "pgbranch-leader-election"},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": self.ns}],
        }))
        .expect("a RoleBinding");
        match self
            .api::<RoleBinding>()
            .create(&PostParams::default(), &binding)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("bind the leader-election Role: {e}"),
        }
    }

    /// A kubeconfig file for the ServiceAccount `sa` of this namespace.
    pub async fn kubeconfig_of(&self, sa: &str) -> PathBuf {
        let req = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }))
        .expect("a TokenRequest");
        let token = self
            .api::<ServiceAccount>()
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .unwrap_or_else(|e| panic!("a token for {sa}: {e}"))
            .status
            .expect("a token")
            .token;
        let path = self.dir().join(format!("{sa}.kubeconfig"));
        std::fs::write(
            &path,
            kubeconfig_yaml(self.control_plane.server(), &token, &self.ns),
        )
        .expect("write a kubeconfig");
        path
    }

    /// `pgbranch operator ARGS` as the operator's ServiceAccount, watching
    /// this namespace, its Lease here; returns it and its metrics port.
    pub async fn operator_binary(&self, name: &str, args: &[&str]) -> (Proc, u16) {
        self.grant_leader_election(OPERATOR_SA).await;
        let kubeconfig = self.kubeconfig_of(OPERATOR_SA).await;
        self.operator_binary_as(name, &kubeconfig, args)
    }

    /// [`World::operator_binary`] with another kubeconfig, and without
    /// `--namespace` unless `args` say so.
    pub fn operator_binary_as(
        &self,
        name: &str,
        kubeconfig: &std::path::Path,
        args: &[&str],
    ) -> (Proc, u16) {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgbranch"));
        cmd.arg("operator")
            .args(args)
            .args([
                "--lease-namespace",
                &self.ns,
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("POD_NAME")
            .env_remove("HOSTNAME")
            .env_remove("POD_NAMESPACE");
        (
            Proc::spawn(cmd, self.dir().join(format!("{name}.log"))),
            port,
        )
    }

    /// The holder of the operator's Lease in this namespace.
    pub async fn lease_holder(&self) -> Option<String> {
        let l = self.api::<Lease>().get_opt(LEASE).await.ok()??;
        l.spec?.holder_identity.filter(|h| !h.is_empty())
    }
}
