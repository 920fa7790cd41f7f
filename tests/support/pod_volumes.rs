//! What the test kubelet does with a compute Pod's volumes and init
//! containers, as a kubelet would:
//!
//! * a `secret` volume is materialised in a directory of the Pod's, the
//!   kubelet's way (the files are symlinks into `..data`, itself a symlink
//!   to a timestamped directory swapped atomically), root's files with the
//!   volume's `defaultMode`, and kept in sync with the Secret (every 300 ms;
//!   a real kubelet takes up to a minute or two);
//! * an `emptyDir` is an empty directory anyone may write (mode 0777);
//! * init containers run for real, in order, as the user that owns the
//!   data directory (the Pod's `runAsUser`), with every mount path in
//!   their command read as its local directory;
//! * the postgres container's TLS settings (`ssl*`, `hba_file`) are
//!   passed to the server with the same rewriting.
//!
//! The storage volume is not mapped: the engine already runs postgres on
//! its data directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

/// A Pod's mounted volumes; dropping it stops the Secret sync and removes
/// the files.
pub struct PodFiles {
    dir: PathBuf,
    /// (mount path, local directory), longest mount path first.
    mounts: Vec<(String, PathBuf)>,
    sync: Option<JoinHandle<()>>,
}

impl Drop for PodFiles {
    fn drop(&mut self) {
        if let Some(t) = self.sync.take() {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `data` as a new `..data` generation of the volume at `dir`.
fn write_secret_volume(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    mode: u32,
) -> std::io::Result<()> {
    let gen = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let gen_dir = dir.join(&gen);
    std::fs::create_dir_all(&gen_dir)?;
    std::fs::set_permissions(&gen_dir, std::fs::Permissions::from_mode(0o755))?;
    for (k, v) in data {
        let f = gen_dir.join(k);
        std::fs::write(&f, v)?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode))?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&gen, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for k in data.keys() {
        let link = dir.join(k);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(k), &link)?;
        }
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn secret_bytes(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

impl PodFiles {
    /// Mounts the Pod's volumes under `base` and runs its init containers
    /// as `owner` (uid, gid).
    pub async fn prepare(
        client: &Client,
        ns: &str,
        pod: &Pod,
        owner: (u32, u32),
        base: &Path,
    ) -> Result<PodFiles, String> {
        let spec = pod.spec.as_ref().ok_or("no pod spec")?;
        let dir = base.join(format!(
            "{}-{}",
            pod.name_any(),
            pod.uid().unwrap_or_default()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let mut local = BTreeMap::new();
        let mut synced = vec![];
        for v in spec.volumes.iter().flatten() {
            let path = dir.join(&v.name);
            if let Some(sv) = &v.secret {
                let name = sv.secret_name.clone().unwrap_or_default();
                let s = secrets.get(&name).await.map_err(|e| {
                    format!(
                        "MountVolume.SetUp failed for volume {:?}: secret {name:?}: {e}",
                        v.name
                    )
                })?;
                std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| e.to_string())?;
                let mode = sv.default_mode.unwrap_or(0o644) as u32;
                write_secret_volume(&path, &secret_bytes(&s), mode).map_err(|e| e.to_string())?;
                synced.push((name, path.clone(), mode, secret_bytes(&s)));
                local.insert(v.name.clone(), path);
            } else if v.empty_dir.is_some() {
                std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
                    .map_err(|e| e.to_string())?;
                local.insert(v.name.clone(), path);
            }
        }
        let mut mounts: Vec<(String, PathBuf)> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .filter_map(|m| Some((m.mount_path.clone(), local.get(&m.name)?.clone())))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        mounts.dedup();
        let sync = (!synced.is_empty()).then(|| {
            let secrets = secrets.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    for (name, path, mode, last) in synced.iter_mut() {
                        // A Secret gone keeps its last files, as on a node.
                        let Ok(Some(s)) = secrets.get_opt(name).await else {
                            continue;
                        };
                        let now = secret_bytes(&s);
                        if now != *last && write_secret_volume(path, &now, *mode).is_ok() {
                            *last = now;
                        }
                    }
                }
            })
        });
        let files = PodFiles { dir, mounts, sync };
        for c in spec.init_containers.iter().flatten() {
            files.run_init(c, owner).await?;
        }
        Ok(files)
    }

    /// `s` with every mount path read as its local directory.
    pub fn rewrite(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (mount, dir) in &self.mounts {
            out = out.replace(mount.as_str(), &dir.display().to_string());
        }
        out
    }

    async fn run_init(&self, c: &Container, owner: (u32, u32)) -> Result<(), String> {
        let argv: Vec<String> = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .map(|a| self.rewrite(a))
            .collect();
        let Some((prog, args)) = argv.split_first() else {
            return Ok(());
        };
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(args);
        if nix::unistd::geteuid().is_root() {
            cmd.uid(owner.0).gid(owner.1);
        }
        let out = cmd
            .output()
            .await
            .map_err(|e| format!("init container {}: {e}", c.name))?;
        if !out.status.success() {
            return Err(format!(
                "init container {} failed: {}",
                c.name,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// The container's TLS settings (`-c ssl...=`, `-c hba_file=`), paths
    /// read locally.
    pub fn tls_settings(&self, c: &Container) -> Vec<(String, String)> {
        let args: Vec<&String> = c.args.iter().flatten().collect();
        args.windows(2)
            .filter(|w| w[0] == "-c")
            .filter_map(|w| w[1].split_once('='))
            .filter(|(k, _)| k.starts_with("ssl") || *k == "hba_file")
            .map(|(k, v)| (k.to_string(), self.rewrite(v)))
            .collect()
    }
}
