//! What the bench reads off the processes and the apiserver: CPU time and
//! memory of a process (/proc), and Prometheus counters (the apiserver's
//! and the operator's /metrics).

use std::collections::BTreeMap;

use kube::Client;

use crate::support::cluster::ControlPlane;

#[derive(Default, Clone, Copy)]
pub struct Rss {
    pub current: u64,
    pub peak: u64,
}

/// CPU seconds used by each process of the run, and by the whole machine.
#[derive(Debug, Default, Clone)]
pub struct CpuTimes {
    pub by: BTreeMap<&'static str, f64>,
    pub machine: f64,
}

impl CpuTimes {
    pub fn take(cp: &ControlPlane, operator: u32) -> Self {
        let mut by = BTreeMap::new();
        by.insert("operator", process_cpu(operator));
        by.insert(
            "bench (storage, watch, creates)",
            process_cpu(std::process::id()),
        );
        let dir = cp.dir().to_string_lossy().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if !cmdline.contains(&dir) {
                continue;
            }
            let exe = cmdline.split('\0').next().unwrap_or_default();
            let name = ["kube-apiserver", "kube-controller-manager", "etcd"]
                .into_iter()
                .find(|n| exe.ends_with(n));
            if let Some(name) = name {
                *by.entry(name).or_insert(0.0) += process_cpu(pid);
            }
        }
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_string();
                let f: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // user nice system (idle iowait excluded) irq softirq steal
                Some(
                    [0, 1, 2, 5, 6, 7]
                        .iter()
                        .filter_map(|i| f.get(*i))
                        .sum::<f64>()
                        / clock_ticks(),
                )
            })
            .unwrap_or(0.0);
        CpuTimes { by, machine }
    }

    pub fn minus(&self, before: &CpuTimes) -> CpuTimes {
        CpuTimes {
            by: self
                .by
                .iter()
                .map(|(k, v)| (*k, v - before.by.get(k).copied().unwrap_or(0.0)))
                .collect(),
            machine: self.machine - before.machine,
        }
    }
}

pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// User + system CPU seconds of a process.
pub fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// How many sockets a process has open.
pub fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
pub fn rss(pid: u32) -> Option<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some(Rss {
        current: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// One Prometheus text exposition, as (name, labels) → value.
#[derive(Default)]
pub struct Samples(pub Vec<(String, BTreeMap<String, String>, f64)>);

impl Samples {
    pub fn parse(text: &str) -> Self {
        let mut out = vec![];
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (head, BTreeMap::new()),
            };
            out.push((name.to_string(), labels, value));
        }
        Samples(out)
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (n, l, v) in &self.0 {
            if n == name {
                *out.entry(l.get(label).cloned().unwrap_or_default())
                    .or_insert(0.0) += v;
            }
        }
        out
    }
}

pub fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

pub async fn operator_metrics(port: u16) -> Samples {
    let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => {
            eprintln!("  operator metrics: {e}");
            String::new()
        }
    };
    Samples::parse(&text)
}

/// The apiserver's request counters: served requests by verb and
/// resource, and the operator's (every request that is not exempt from
/// priority and fairness: the operator is the only such client here).
#[derive(Default, Clone)]
pub struct Counters {
    /// (verb, resource[/subresource]) → requests.
    pub requests: BTreeMap<(String, String), f64>,
    /// (verb, resource[/subresource]) → seconds the apiserver spent on them.
    pub seconds: BTreeMap<(String, String), f64>,
    pub operator: f64,
    pub rejected: f64,
}

pub const WRITE_VERBS: &[&str] = &[
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

impl Counters {
    pub async fn scrape(admin: &Client) -> Self {
        let req = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("a request");
        let text = admin.request_text(req).await.expect("apiserver /metrics");
        let s = Samples::parse(&text);
        let mut requests = BTreeMap::new();
        let mut seconds = BTreeMap::new();
        for (name, l, v) in &s.0 {
            let into = match name.as_str() {
                "apiserver_request_total" => &mut requests,
                "apiserver_request_duration_seconds_sum" => &mut seconds,
                _ => continue,
            };
            let res = l.get("resource").cloned().unwrap_or_default();
            if res.is_empty() {
                continue;
            }
            let res = match l.get("subresource").map(String::as_str) {
                Some(sub) if !sub.is_empty() => format!("{res}/{sub}"),
                _ => res,
            };
            let verb = l.get("verb").cloned().unwrap_or_default();
            *into.entry((verb, res)).or_insert(0.0) += v;
        }
        let operator =
            s.0.iter()
                .filter(|(n, l, _)| {
                    n == "apiserver_flowcontrol_dispatched_requests_total"
                        && l.get("priority_level").map(String::as_str) != Some("exempt")
                })
                .map(|(_, _, v)| v)
                .sum();
        let rejected =
            s.0.iter()
                .filter(|(n, _, _)| n == "apiserver_flowcontrol_rejected_requests_total")
                .map(|(_, _, v)| v)
                .sum();
        Counters {
            requests,
            seconds,
            operator,
            rejected,
        }
    }

    pub fn minus(&self, before: &Counters) -> Counters {
        let diff = |now: &BTreeMap<(String, String), f64>,
                    then: &BTreeMap<(String, String), f64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0.0)))
                .filter(|(_, d)| *d > 0.0)
                .collect()
        };
        Counters {
            requests: diff(&self.requests, &before.requests),
            seconds: diff(&self.seconds, &before.seconds),
            operator: self.operator - before.operator,
            rejected: self.rejected - before.rejected,
        }
    }

    pub fn writes(&self) -> impl Iterator<Item = (&(String, String), &f64)> {
        self.requests
            .iter()
            .filter(|((verb, _), _)| WRITE_VERBS.contains(&verb.as_str()))
    }
}
