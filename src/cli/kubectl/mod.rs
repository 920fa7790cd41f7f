//! `kubectl pgbranch`: the kubectl plugin. The same binary, run as
//! `kubectl-pgbranch` (put it, or a link to it, on PATH) or as `pgbranch
//! kubectl`; it uses the user's kubeconfig, context and namespace like any
//! kubectl command.
//!
//! Each create command makes exactly the object a GitOps user would commit
//! ([`objects`]); `--dry-run -o yaml` prints it instead, and `--wait`
//! follows the object until it is Ready (a restore: Completed, or
//! AwaitingFinalize) and fails with the `Stalled` reason. `status` draws the
//! branch tree ([`status`]); `connection-string` reads the branch's Secret.

pub mod objects;
pub mod report;
pub mod status;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    get_condition, Branch, RestorePhase, Snapshot, SnapshotRestore, READY, RECONCILING, STALLED,
};
use crate::cli::CliError;
use objects::{RestoreFrom, RestoreOptions};

/// The plugin's flags and commands.
#[derive(Debug, Args)]
pub struct KubectlArgs {
    /// The namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: KubectlCommand,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Yaml,
}

/// Flags shared by the commands that create an object.
#[derive(Debug, Args)]
pub struct CreateFlags {
    /// Print the object instead of creating it (`client` or `server`: the
    /// apiserver validates it, CEL rules included, and stores nothing).
    #[arg(long, value_name = "client|server", num_args = 0..=1, default_missing_value = "client")]
    pub dry_run: Option<DryRun>,
    /// With --dry-run: print the object as YAML or JSON.
    #[arg(short = 'o', long)]
    pub output: Option<Format>,
    /// Wait until the object is Ready (a restore: done); fail with the
    /// Stalled reason.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// `--dry-run` modes, as kubectl names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    Client,
    Server,
}

#[derive(Debug, Subcommand)]
pub enum KubectlCommand {
    /// The branch tree of the namespace (or of one branch and its
    /// descendants): lineage, timeline, point, size, compute, Ready or the
    /// Stalled reason, operations under way.
    Status {
        /// Only this branch and its descendants.
        branch: Option<String>,
        #[arg(short = 'o', long)]
        output: Option<Format>,
    },
    /// Branches: create, reset.
    #[command(subcommand)]
    Branch(BranchCommand),
    /// Snapshots: create.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Restore a branch from a snapshot or from a branch's past: creates a
    /// SnapshotRestore.
    Restore {
        /// The SnapshotRestore's name (default: `<target or source>-restore-<time>`).
        #[arg(long)]
        name: Option<String>,
        /// Restore from this Snapshot.
        #[arg(long, conflicts_with = "source", required_unless_present = "source")]
        snapshot: Option<String>,
        /// Restore from a branch: `BRANCH` (its head) or `BRANCH@POINT`
        /// (an LSN like 0/16B3748 or an RFC 3339 time).
        #[arg(long)]
        source: Option<String>,
        /// The branch whose name, Service and Secret move onto the restored
        /// data on finalize.
        #[arg(long)]
        target: Option<String>,
        /// Finalize at once (else the restored data comes up as its own
        /// branch; `finalize RESTORE` later).
        #[arg(long, requires = "target")]
        finalize: bool,
        /// The name of the branch that keeps the target's current data.
        #[arg(long, requires = "target")]
        preserve_under_name: Option<String>,
        #[command(flatten)]
        create: CreateFlags,
    },
    /// Finalize a restore: sets `spec.finalize: true`.
    Finalize {
        restore: String,
        /// Wait until the restore is Completed.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// A support bundle (tar.gz): objects, computes, Events, logs and the
    /// status tree of the namespace (or of one branch), every secret
    /// redacted.
    Report {
        /// Only this branch, its descendants and what touches them.
        branch: Option<String>,
        /// The file to write (default `pgbranch-report-<ns>-<time>.tar.gz`).
        #[arg(long = "file", short = 'f')]
        file: Option<String>,
    },
    /// The branch's connection URI, from its Secret (`--ro`: the read
    /// replicas' Service).
    ConnectionString {
        branch: String,
        #[arg(long)]
        ro: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BranchCommand {
    /// A new branch: a child of `--parent` at its head, an LSN or a time
    /// (`--at`), or a new root without `--parent`.
    Create {
        name: String,
        #[arg(long)]
        parent: Option<String>,
        /// head, an LSN (0/16B3748) or an RFC 3339 time.
        #[arg(long, requires = "parent")]
        at: Option<String>,
        #[command(flatten)]
        create: CreateFlags,
    },
    /// Replace the branch's data with its parent's head now (a restore
    /// from the parent, finalized; the old data is kept as a backup branch).
    Reset {
        name: String,
        #[command(flatten)]
        create: CreateFlags,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// A snapshot of `--branch` at its head, an LSN or a time.
    Create {
        name: String,
        #[arg(long)]
        branch: String,
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        create: CreateFlags,
    },
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

fn kube_err(what: &str) -> impl Fn(kube::Error) -> CliError + '_ {
    move |e| match e {
        kube::Error::Api(s) => CliError::Other(format!("{what}: {}", s.message)),
        e => CliError::Other(format!("{what}: {e}")),
    }
}

/// The client and namespace the user's kubeconfig (and flags) name.
async fn connect(args: &KubectlArgs) -> Result<(Client, String), CliError> {
    // kube and reqwest compile in two TLS providers: pick one for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match Kubeconfig::read() {
        Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(|e| CliError::Other(format!("kubeconfig: {e}")))?,
        Err(_) if args.context.is_none() => kube::Config::infer()
            .await
            .map_err(|e| CliError::Other(format!("no cluster configuration: {e}")))?,
        Err(e) => return Err(CliError::Other(format!("kubeconfig: {e}"))),
    };
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| CliError::Other(e.to_string()))?;
    Ok((client, ns))
}

/// Runs a plugin command.
pub async fn run(args: KubectlArgs) -> Result<(), CliError> {
    // A dry run on the client needs no cluster.
    if let Some(obj) = client_dry_run(&args.command)? {
        println!("{obj}");
        return Ok(());
    }
    let (client, ns) = connect(&args).await?;
    let branches: Api<Branch> = Api::namespaced(client.clone(), &ns);
    let snapshots: Api<Snapshot> = Api::namespaced(client.clone(), &ns);
    let restores: Api<SnapshotRestore> = Api::namespaced(client.clone(), &ns);
    match &args.command {
        KubectlCommand::Status { branch, output } => {
            let lp = ListParams::default();
            let b = branches
                .list(&lp)
                .await
                .map_err(kube_err("list branches"))?;
            let s = snapshots
                .list(&lp)
                .await
                .map_err(kube_err("list snapshots"))?;
            let r = restores
                .list(&lp)
                .await
                .map_err(kube_err("list restores"))?;
            if let Some(name) = &branch {
                if !b.items.iter().any(|x| &x.name_any() == name) {
                    return Err(CliError::Other(format!(
                        "branch {name} not found in namespace {ns}"
                    )));
                }
            }
            let rows = status::tree(&b.items, &s.items, &r.items, branch.as_deref());
            match output {
                Some(f) => println!("{}", print(&rows, *f)?),
                None if rows.is_empty() => println!("no branches in namespace {ns}"),
                None => print!("{}", status::render(&rows)),
            }
            Ok(())
        }
        KubectlCommand::Branch(BranchCommand::Create {
            name,
            parent,
            at,
            create,
        }) => {
            let obj = objects::branch(name, parent.as_deref(), at.as_deref()).map_err(usage)?;
            create_and_wait(&branches, obj, create, wait_ready::<Branch>).await
        }
        KubectlCommand::Branch(BranchCommand::Reset { name, create }) => {
            let target = branches
                .get(name)
                .await
                .map_err(kube_err(&format!("branch {name}")))?;
            let rname = objects::generated_name(name, &format!("reset-{}", stamp()));
            let obj = objects::reset(name, &rname, &target).ok_or_else(|| {
                usage(format!(
                    "branch {name} has no parent to reset from (it is a root branch)"
                ))
            })?;
            create_and_wait(&restores, obj, create, wait_restore).await
        }
        KubectlCommand::Snapshot(SnapshotCommand::Create {
            name,
            branch,
            at,
            create,
        }) => {
            let obj = objects::snapshot(name, branch, at.as_deref()).map_err(usage)?;
            create_and_wait(&snapshots, obj, create, wait_ready::<Snapshot>).await
        }
        KubectlCommand::Restore { create, .. } => {
            let obj = restore_object(&args.command)?;
            create_and_wait(&restores, obj, create, wait_restore).await
        }
        KubectlCommand::Finalize {
            restore,
            wait,
            timeout,
        } => {
            let patch = serde_json::json!({ "spec": { "finalize": true } });
            restores
                .patch(restore, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(kube_err(&format!("finalize {restore}")))?;
            println!("snapshotrestore.pgbranch.dev/{restore} finalizing");
            if *wait {
                wait_restore(&restores, restore, Duration::from_secs(*timeout)).await?;
            }
            Ok(())
        }
        KubectlCommand::Report { branch, file } => {
            let path = report::run(&client, &ns, branch.as_deref(), file.as_deref()).await?;
            println!("wrote {path} (secrets redacted)");
            Ok(())
        }
        KubectlCommand::ConnectionString { branch, ro } => {
            let b = branches
                .get(branch)
                .await
                .map_err(kube_err(&format!("branch {branch}")))?;
            let secret_name = b
                .status
                .as_ref()
                .and_then(|s| s.secret_name.clone())
                .ok_or_else(|| {
                    CliError::Other(format!("branch {branch} has no Secret yet (not Ready)"))
                })?;
            let secrets: Api<Secret> = Api::namespaced(client, &ns);
            let s = secrets
                .get(&secret_name)
                .await
                .map_err(kube_err(&format!("secret {secret_name}")))?;
            let key = if *ro { "ro-uri" } else { "uri" };
            let uri = crate::compute::secret_value(&s, key).ok_or_else(|| {
                CliError::Other(if *ro {
                    format!("branch {branch} has no read replicas (spec.compute.readReplicas)")
                } else {
                    format!("secret {secret_name} has no {key}")
                })
            })?;
            println!("{uri}");
            Ok(())
        }
    }
}

/// The restore `restore` asks for (named, when unnamed, after its target or
/// source and the time).
fn restore_object(cmd: &KubectlCommand) -> Result<SnapshotRestore, CliError> {
    let KubectlCommand::Restore {
        name,
        snapshot,
        source,
        target,
        finalize,
        preserve_under_name,
        ..
    } = cmd
    else {
        return Err(usage("not a restore"));
    };
    let from = match (snapshot, source) {
        (Some(s), None) => RestoreFrom::Snapshot(s.clone()),
        (None, Some(src)) => RestoreFrom::source(src),
        _ => return Err(usage("give one of --snapshot and --source")),
    };
    let base = target.clone().unwrap_or_else(|| match &from {
        RestoreFrom::Snapshot(s) => s.clone(),
        RestoreFrom::Branch { branch, .. } => branch.clone(),
    });
    let name = name
        .clone()
        .unwrap_or_else(|| objects::generated_name(&base, &format!("restore-{}", stamp())));
    objects::restore(
        &name,
        &from,
        &RestoreOptions {
            target: target.clone(),
            finalize: *finalize,
            preserve_under_name: preserve_under_name.clone(),
        },
    )
    .map_err(usage)
}

/// With `--dry-run` (client): the object, printed; None otherwise.
fn client_dry_run(cmd: &KubectlCommand) -> Result<Option<String>, CliError> {
    let (flags, obj) = match cmd {
        KubectlCommand::Branch(BranchCommand::Create {
            name,
            parent,
            at,
            create,
        }) => (
            create,
            serde_json::to_value(
                objects::branch(name, parent.as_deref(), at.as_deref()).map_err(usage)?,
            ),
        ),
        KubectlCommand::Snapshot(SnapshotCommand::Create {
            name,
            branch,
            at,
            create,
        }) => (
            create,
            serde_json::to_value(objects::snapshot(name, branch, at.as_deref()).map_err(usage)?),
        ),
        KubectlCommand::Restore { create, .. } => {
            (create, serde_json::to_value(restore_object(cmd)?))
        }
        _ => return Ok(None),
    };
    if flags.dry_run != Some(DryRun::Client) {
        return Ok(None);
    }
    let obj = obj.map_err(|e| CliError::Other(e.to_string()))?;
    print(&obj, flags.output.unwrap_or(Format::Yaml)).map(Some)
}

fn print<T: Serialize>(v: &T, f: Format) -> Result<String, CliError> {
    match f {
        Format::Json => serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string())),
        Format::Yaml => serde_yaml::to_string(v)
            .map(|s| s.trim_end().to_string())
            .map_err(|e| CliError::Other(e.to_string())),
    }
}

/// A compact UTC time for generated names: `20261207101500`.
fn stamp() -> String {
    jiff::Timestamp::now().strftime("%Y%m%d%H%M%S").to_string()
}

type WaitFn<K> = for<'a> fn(
    &'a Api<K>,
    &'a str,
    Duration,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), CliError>> + 'a>,
>;

/// Creates `obj` (or asks the apiserver to validate it, `--dry-run=server`)
/// and, with `--wait`, follows it.
async fn create_and_wait<K>(
    api: &Api<K>,
    obj: K,
    flags: &CreateFlags,
    wait: WaitFn<K>,
) -> Result<(), CliError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.name_any();
    let kind = format!("{}.{}", K::kind(&()).to_lowercase(), K::group(&()));
    let pp = PostParams {
        dry_run: flags.dry_run == Some(DryRun::Server),
        field_manager: Some("kubectl-pgbranch".into()),
    };
    let created = api
        .create(&pp, &obj)
        .await
        .map_err(kube_err(&format!("create {kind}/{name}")))?;
    if flags.dry_run.is_some() {
        println!("{}", print(&created, flags.output.unwrap_or(Format::Yaml))?);
        return Ok(());
    }
    println!("{kind}/{name} created");
    if flags.wait {
        wait(api, &name, Duration::from_secs(flags.timeout)).await?;
    }
    Ok(())
}

/// Where an object stands, for `--wait`.
enum Standing {
    Done(String),
    Failed(String),
    Working(String),
}

fn conditions_standing(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
) -> Standing {
    if let Some(c) = get_condition(conds, STALLED).filter(|c| c.status == "True") {
        return Standing::Failed(format!("Stalled: {}: {}", c.reason, c.message));
    }
    if crate::api::is_ready_for(conds, generation) {
        return Standing::Done("Ready".into());
    }
    let why = get_condition(conds, RECONCILING)
        .filter(|c| c.status == "True")
        .or_else(|| get_condition(conds, READY))
        .map(|c| format!("{}: {}", c.reason, c.message))
        .unwrap_or_else(|| "waiting for the operator".into());
    Standing::Working(why)
}

/// Polls `name` until `judge` says it is done or failed, showing what it
/// is doing on one line (rewritten on a terminal).
async fn follow<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    judge: impl Fn(&K) -> Standing,
) -> Result<(), CliError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut shown = String::new();
    loop {
        let obj = api
            .get_opt(name)
            .await
            .map_err(kube_err(&format!("read {name}")))?;
        let standing = match &obj {
            None => Standing::Working("not found yet".into()),
            Some(o) => judge(o),
        };
        match standing {
            Standing::Done(what) => {
                if tty && !shown.is_empty() {
                    eprintln!();
                }
                println!("{name}: {what} after {:.1}s", start.elapsed().as_secs_f64());
                return Ok(());
            }
            Standing::Failed(why) => {
                if tty && !shown.is_empty() {
                    eprintln!();
                }
                return Err(CliError::Other(format!("{name}: {why}")));
            }
            Standing::Working(what) => {
                if what != shown || tty {
                    let mut err = std::io::stderr();
                    if tty {
                        let _ = write!(
                            err,
                            "\r\x1b[K{name}: {what} ({:.0}s)",
                            start.elapsed().as_secs_f64()
                        );
                        let _ = err.flush();
                    } else {
                        let _ = writeln!(err, "{name}: {what}");
                    }
                    shown = what;
                }
            }
        }
        if start.elapsed() >= timeout {
            return Err(CliError::Other(format!(
                "{name}: not done after {}s: {shown}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The kinds `--wait` follows by their Ready/Stalled conditions.
trait Conditioned: Resource + Clone + DeserializeOwned + std::fmt::Debug {
    fn conditions(&self) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition];
}

impl Conditioned for Branch {
    fn conditions(&self) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
}

impl Conditioned for Snapshot {
    fn conditions(&self) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
}

/// Waits until a Branch or Snapshot is Ready for its current generation.
fn wait_ready<'a, K: Conditioned>(
    api: &'a Api<K>,
    name: &'a str,
    timeout: Duration,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CliError>> + 'a>> {
    Box::pin(follow(api, name, timeout, |o: &K| {
        conditions_standing(o.conditions(), o.meta().generation)
    }))
}

fn wait_restore<'a>(
    api: &'a Api<SnapshotRestore>,
    name: &'a str,
    timeout: Duration,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CliError>> + 'a>> {
    Box::pin(follow(api, name, timeout, |r: &SnapshotRestore| {
        let st = r.status.as_ref();
        let conds = st.map(|s| s.conditions.as_slice()).unwrap_or_default();
        match st.and_then(|s| s.phase) {
            Some(RestorePhase::Completed) => Standing::Done("Completed".into()),
            Some(RestorePhase::AwaitingFinalize) if !r.spec.finalize => Standing::Done(
                "restored, AwaitingFinalize (kubectl pgbranch finalize to switch)".into(),
            ),
            Some(RestorePhase::Failed) => Standing::Failed(
                get_condition(conds, STALLED)
                    .map(|c| format!("Failed: {}: {}", c.reason, c.message))
                    .unwrap_or_else(|| "Failed".into()),
            ),
            phase => {
                let phase = phase
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_else(|| "Pending".into());
                let progress = st
                    .and_then(|s| s.progress.clone())
                    .map(|p| format!(": {p}"))
                    .unwrap_or_default();
                Standing::Working(format!("{phase}{progress}"))
            }
        }
    }))
}
