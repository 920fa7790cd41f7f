//! What `pgbranch local` prints: one object or a list, as a table for
//! people or as JSON (`--output json`) for scripts; the progress line of a
//! long operation on stderr; and the tables of branches, snapshots and
//! restores.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Output;
use crate::cli::{human_bytes, CliError};
use crate::local::api::{BranchView, RestoreView, SnapshotView};
use crate::storage::{Point, Progress};

/// A one-line note on stderr before a step (table output only).
pub(super) fn progress_line(out: Output, msg: &str) {
    if out == Output::Table {
        eprintln!("{msg}...");
    }
}

/// The progress line of a long operation on stderr (table output only).
pub(super) struct ProgressLine {
    out: Output,
    start: Instant,
    shown: Option<String>,
}

impl ProgressLine {
    /// A line for an operation starting now.
    pub(super) fn new(out: Output) -> Self {
        ProgressLine {
            out,
            start: Instant::now(),
            shown: None,
        }
    }

    /// Shows the operation's step (`idle` when the daemon names none) after
    /// its first second, rewriting one line on a terminal and printing each
    /// change otherwise.
    pub(super) fn show(&mut self, p: Option<&Progress>, idle: &str) {
        if self.out != Output::Table || self.start.elapsed() < Duration::from_secs(1) {
            return;
        }
        let step = p.map(|p| p.step.clone()).unwrap_or_else(|| idle.into());
        let pct = p
            .and_then(|p| p.percent)
            .map(|x| format!(" {x}%"))
            .unwrap_or_default();
        let line = format!("{step}{pct}");
        let mut err = std::io::stderr();
        if err.is_terminal() {
            let _ = write!(
                err,
                "\r\x1b[K{line} ({:.0}s)",
                self.start.elapsed().as_secs_f64()
            );
            let _ = err.flush();
            self.shown = Some(line);
        } else if self.shown.as_deref() != Some(line.as_str()) {
            let _ = writeln!(err, "{line} ({:.1}s)", self.start.elapsed().as_secs_f64());
            self.shown = Some(line);
        }
    }

    /// Ends the rewritten line on a terminal, if anything was shown.
    pub(super) fn finish(&self) {
        if self.out == Output::Table && self.shown.is_some() && std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
}

/// Prints one object: `human`'s text, or the object as JSON.
pub(super) fn print_one<T: Serialize>(
    out: Output,
    v: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    match out {
        Output::Json => println!("{}", to_json(v)?),
        Output::Table => println!("{}", human(v)),
    }
    Ok(())
}

/// Prints a list: `table`'s rows, or the list as JSON.
pub(super) fn print_list<T: Serialize>(
    out: Output,
    v: &[T],
    table: impl FnOnce(&[T]) -> Vec<Vec<String>>,
) -> Result<(), CliError> {
    match out {
        Output::Json => println!("{}", to_json(&v)?),
        Output::Table => print!("{}", render_table(&table(v))),
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string()))
}

/// Left-aligned columns; the first row is the header.
pub(super) fn render_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map(|c| c.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

/// A branch's point as the tables show it.
fn point_text(p: &Option<Point>) -> String {
    match p {
        None => "-".into(),
        Some(Point::Head) => "head".into(),
        Some(Point::Lsn(l)) => format!("lsn {l}"),
        Some(Point::Timestamp(t)) => t.to_string(),
    }
}

/// An optional value, `-` when absent.
fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

/// A table's header row.
fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// What `up` shows: the branches that came back.
pub(super) fn ports_table(bs: &[BranchView]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["NAME", "PORT", "STATE"])];
    rows.extend(
        bs.iter()
            .map(|b| vec![b.name.clone(), b.port.to_string(), b.state.clone()]),
    );
    rows
}

pub(super) fn branch_table(bs: &[BranchView]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "NAME",
        "PARENT",
        "POINT",
        "LSN",
        "SIZE",
        "PORT",
        "STATE",
        "PROTECTED",
    ])];
    for b in bs {
        let state = match (&b.restore_target, b.state.as_str()) {
            (Some(t), s) => format!("{s} (restore of {t})"),
            (None, s) => s.to_string(),
        };
        rows.push(vec![
            b.name.clone(),
            opt(&b.parent),
            point_text(&b.point),
            opt(&b.lsn),
            human_bytes(b.logical_size_bytes),
            b.port.to_string(),
            state,
            if b.protected { "yes" } else { "no" }.into(),
        ]);
    }
    rows
}

pub(super) fn snapshot_table(ss: &[SnapshotView]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "NAME", "BRANCH", "POINT", "LSN", "SIZE", "STATE", "CREATED",
    ])];
    for s in ss {
        rows.push(vec![
            s.name.clone(),
            s.branch.clone(),
            point_text(&Some(s.point)),
            opt(&s.lsn),
            human_bytes(s.size_bytes),
            s.state.clone(),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    rows
}

pub(super) fn restore_table(rs: &[RestoreView]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "ID", "SOURCE", "TARGET", "STATE", "PREVIEW", "BACKUP", "STARTED",
    ])];
    for r in rs {
        rows.push(vec![
            r.id.clone(),
            r.source.clone(),
            r.target.clone(),
            r.state.clone(),
            opt(&r.restored_branch),
            opt(&r.backup_branch),
            r.started_at.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = render_table(&[
            vec!["NAME".into(), "PORT".into()],
            vec!["main".into(), "55432".into()],
            vec!["feature-x".into(), "55433".into()],
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME       PORT");
        assert_eq!(lines[2], "feature-x  55433");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(40 * 1024 * 1024), "40.0 MiB");
    }
}
