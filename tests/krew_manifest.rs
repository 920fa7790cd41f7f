//! The krew plugin manifest (`plugins/krew/pgbranch.yaml`) has what krew
//! requires of a `Plugin`, its placeholders are only the documented ones,
//! and `scripts/krew-manifest.sh` fills every one of them (the sha256s
//! computed from the archives).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const TEMPLATE: &str = include_str!("../plugins/krew/pgbranch.yaml");

/// The placeholders the template may hold (README, "kubectl plugin").
const PLACEHOLDERS: &[&str] = &[
    "@VERSION@",
    "@HOMEPAGE@",
    "@RELEASE_BASE_URL@",
    "@SHA256_LINUX_AMD64@",
    "@SHA256_LINUX_ARM64@",
];

fn placeholders(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(a) = rest.find('@') {
        let after = &rest[a + 1..];
        match after.find('@') {
            Some(b)
                if b > 0
                    && after[..b]
                        .bytes()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_') =>
            {
                out.insert(format!("@{}@", &after[..b]));
                rest = &after[b + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

/// What krew checks of a Plugin (krew's `validation.ValidatePlugin`): the
/// kind, a name, a version, a short description, and per platform a
/// selector, an https URI, a sha256 and the binary, the binary being
/// `kubectl-pgbranch` (the name the binary answers to as a plugin).
/// `filled`: every value real (no placeholder), sha256s 64 hex digits.
fn check(m: &Value, filled: bool) {
    assert_eq!(
        m["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(m["kind"].as_str(), Some("Plugin"));
    assert_eq!(m["metadata"]["name"].as_str(), Some("pgbranch"));
    let spec = &m["spec"];
    let version = spec["version"].as_str().expect("spec.version");
    let short = spec["shortDescription"]
        .as_str()
        .expect("spec.shortDescription");
    assert!(!short.is_empty() && short.len() <= 80, "{short:?}");
    assert!(spec["description"].as_str().is_some_and(|d| !d.is_empty()));
    let platforms = spec["platforms"].as_sequence().expect("spec.platforms");
    let mut seen = BTreeSet::new();
    for p in platforms {
        let labels = &p["selector"]["matchLabels"];
        let (os, arch) = (
            labels["os"].as_str().expect("os"),
            labels["arch"].as_str().expect("arch"),
        );
        assert!(seen.insert((os, arch)), "{os}/{arch} twice");
        let uri = p["uri"].as_str().expect("uri");
        let sha = p["sha256"].as_str().expect("sha256");
        assert_eq!(p["bin"].as_str(), Some("kubectl-pgbranch"));
        let files = p["files"].as_sequence().expect("files");
        assert!(files.iter().any(|f| f["from"].as_str() == Some("pgbranch")
            && f["to"].as_str() == Some("kubectl-pgbranch")));
        assert!(uri.ends_with(&format!("-{os}-{arch}.tar.gz")), "{uri}");
        if filled {
            assert!(uri.starts_with("https://"), "{uri}");
            assert!(
                sha.len() == 64 && sha.bytes().all(|c| c.is_ascii_hexdigit()),
                "{sha}"
            );
        } else {
            // Nothing that looks like a real checksum before a release.
            assert_eq!(sha, format!("@SHA256_{}_{}@", os, arch).to_uppercase());
        }
    }
    if filled {
        assert!(version.starts_with('v'), "{version}");
        assert!(
            semver_like(&version[1..]),
            "version {version} is not semver"
        );
    } else {
        assert_eq!(version, "@VERSION@");
    }
}

fn semver_like(v: &str) -> bool {
    let core = v.split('-').next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
}

#[test]
fn the_template_is_a_krew_plugin_with_only_documented_placeholders() {
    let m: Value = serde_yaml::from_str(TEMPLATE).expect("the manifest is YAML");
    check(&m, false);
    let found = placeholders(TEMPLATE);
    let known: BTreeSet<String> = PLACEHOLDERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, known);
    // The README documents the placeholder policy and the script.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("scripts/krew-manifest.sh"));
}

#[test]
fn the_release_script_fills_every_placeholder() {
    let dist = tempfile::tempdir().unwrap();
    let mut sums = Vec::new();
    for arch in ["amd64", "arm64"] {
        let f = dist
            .path()
            .join(format!("pgbranch-v1.2.3-linux-{arch}.tar.gz"));
        std::fs::write(&f, format!("an archive for {arch}")).unwrap();
        let out = Command::new("sha256sum").arg(&f).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        sums.push(text.split(' ').next().unwrap().to_string());
    }
    let run = |version: &str| {
        Command::new("bash")
            .arg(repo().join("scripts/krew-manifest.sh"))
            .args([version, "https://example.org/releases/v1.2.3/"])
            .arg(dist.path())
            .output()
            .unwrap()
    };
    let out = run("v1.2.3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(placeholders(&text).is_empty(), "{text}");
    let m: Value = serde_yaml::from_str(&text).unwrap();
    check(&m, true);
    let platforms = m["spec"]["platforms"].as_sequence().unwrap();
    assert_eq!(platforms[0]["sha256"].as_str(), Some(sums[0].as_str()));
    assert_eq!(platforms[1]["sha256"].as_str(), Some(sums[1].as_str()));
    assert_eq!(
        platforms[0]["uri"].as_str(),
        Some("https://example.org/releases/v1.2.3/pgbranch-v1.2.3-linux-amd64.tar.gz")
    );
    // No archives of that version: refused, nothing printed.
    let out = run("v9.9.9");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}
