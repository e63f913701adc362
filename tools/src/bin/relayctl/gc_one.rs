//! `relayctl gc INSTANCE`: the host-wide clean-up of `shmrelay::report::host::gc` limited to
//! the files of one dead instance.
//!
//! What to remove is what `host::gc` would remove (its dry run, so the trust and liveness
//! checks are the library's), kept to the files of that instance; the removal then claims the
//! instance's view first, as `host::gc` does, so no supervisor can take the name meanwhile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use shmrelay::names;
use shmrelay::report::host::{self, FailedRemoval, GcReport, RemovedFile};
use shmrelay::view;

/// Removes the stale files of instance `name` only (with `dry_run`, says what it would
/// remove): its view, the files at its name, and its orphan files, never another instance's.
///
/// # Errors
///
/// `name` is not an instance name, there is no file of that instance, or the instance is
/// alive (its supervisor holds the lock on its view) or came alive while being removed.
pub fn gc_one(name: &str, dry_run: bool) -> Result<GcReport> {
    let summary = host::summary(name);
    if summary.files.is_empty() {
        return Err(super::no_such_instance(name));
    }
    if summary.alive {
        bail!(
            "instance `{name}` is alive (its supervisor, pid {}, holds the lock on its view): \
             gc removes only what dead instances left behind; stop the relay first",
            summary.supervisor_pid
        );
    }
    let of_name = |path: &str| {
        Path::new(path)
            .file_name()
            .and_then(|n| host::instance_of(&n.to_string_lossy()).map(|i| i == name))
            .unwrap_or(false)
    };
    let mut plan = host::gc(true);
    plan.removed.retain(|f| f.instance == name);
    plan.untrusted.retain(|f| of_name(&f.path));
    plan.failed.retain(|f| of_name(&f.path));
    plan.bytes = plan.removed.iter().map(|f| f.bytes).sum();
    if dry_run {
        return Ok(plan);
    }
    let stats = names::stats_path(name);
    let (stats_entry, rest): (Vec<RemovedFile>, Vec<RemovedFile>) = plan
        .removed
        .into_iter()
        .partition(|f| Path::new(&f.path) == stats);
    let mut report = GcReport {
        dry_run: false,
        removed: Vec::new(),
        bytes: 0,
        ..plan
    };
    // Claim the view: from here on no supervisor can take the name until it is gone.
    let claimed = match stats_entry.first() {
        None => None,
        Some(_) => match view::claim_stale(&stats, Duration::ZERO) {
            Ok(c) => c,
            Err(view::ViewError::Live { .. }) => {
                bail!("instance `{name}` came alive meanwhile: nothing removed")
            }
            Err(e) => {
                report.failed.push(failure(&stats, e));
                return Ok(report);
            }
        },
    };
    for f in rest {
        let path = PathBuf::from(&f.path);
        if !names::is_own_regular(&path) {
            report
                .failed
                .push(failure(&path, "no longer a regular file of this user"));
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => note(&mut report, f),
            // Removed meanwhile (a concurrent gc).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.failed.push(failure(&path, e)),
        }
    }
    if let (Some(c), Some(f)) = (claimed, stats_entry.into_iter().next()) {
        match c.remove() {
            Ok(true) => note(&mut report, f),
            Ok(false) => {}
            Err(e) => report.failed.push(failure(&stats, e)),
        }
    }
    Ok(report)
}

fn failure(path: &Path, error: impl std::fmt::Display) -> FailedRemoval {
    FailedRemoval {
        path: path.display().to_string(),
        error: error.to_string(),
    }
}

fn note(report: &mut GcReport, f: RemovedFile) {
    report.bytes += f.bytes;
    report.removed.push(f);
}
