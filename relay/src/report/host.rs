//! Host-wide views of the shm directory: the instances in it ([`list`]), what is left over by
//! dead instances ([`leaks`]) and removing it ([`gc`]).
//!
//! An instance is *live* while its supervisor holds the lock on its stats view (see
//! [`crate::view`]), and *dead* otherwise, whatever pid the file records and whatever PID
//! namespace this runs in. A dead instance's files (`shmrelay.NAME.*`) are stale: nothing will
//! ever unlink them. A file with the `shmrelay.` prefix whose instance has no stats view at
//! all is an *orphan*; it is stale unless a live process is still attached to it as a ring
//! side (rings of older versions were files).
//!
//! Every file is opened without blocking and without following links, and trusted only if
//! it is a regular file of this user ([`names::open_checked`]): a FIFO or another user's file
//! at an instance's name is reported (`error`), never waited on, trusted or removed. The
//! directory is read once per command ([`names::Listing`]), however many files it holds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shm_ring::RingView;

use super::{process_liveness, InstanceReport, LeakReport, Liveness, ReportError};
use crate::names::{self, Listing};
use crate::stats::unix_ms;
use crate::view;

/// `relayctl list --json`: every instance with a stats segment in the shm directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListReport {
    /// The directory scanned (`/dev/shm` or `$SHMRELAY_SHM_DIR`).
    pub shm_dir: String,
    /// By name.
    pub instances: Vec<InstanceSummary>,
}

/// One instance as `list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceSummary {
    /// Instance name.
    pub name: String,
    /// Supervisor pid from the stats segment (0 if unreadable). Informational: liveness does
    /// not rest on it (a pid means nothing in another PID namespace).
    pub supervisor_pid: u32,
    /// True while a supervisor holds the lock on the instance's stats view.
    pub alive: bool,
    /// Seconds since the supervisor started (0 if unreadable).
    pub uptime_secs: f64,
    /// When the supervisor started, ms since the Unix epoch (0 if unreadable).
    pub started_unix_ms: u64,
    /// Configured fronts and workers (0 if the segment could not be mapped).
    pub fronts: usize,
    /// Configured workers.
    pub workers: usize,
    /// Connections open (0 if the segment could not be mapped).
    pub connections: u64,
    /// The instance's files in the shm directory.
    pub files: Vec<String>,
    /// Their total size, bytes.
    pub bytes: u64,
    /// Why the stats segment could not be fully read or is not trusted (another layout
    /// version, truncated, a FIFO, another user's file...).
    pub error: Option<String>,
}

/// `relayctl leaks --json`: what is left over on this host, and the leak counters of the
/// instances looked at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaksReport {
    /// The directory scanned.
    pub shm_dir: String,
    /// Instances whose supervisor is gone; their files are stale (`relayctl gc` removes them).
    pub dead_instances: Vec<InstanceSummary>,
    /// Files with the `shmrelay.` prefix belonging to no instance's stats segment.
    pub orphan_files: Vec<OrphanFile>,
    /// Leak counters and stale rings of each live instance looked at.
    pub instances: Vec<InstanceLeaks>,
    /// Everything above that needs attention, one sentence each; `relayctl leaks` exits 1
    /// when it is not empty.
    pub problems: Vec<String>,
}

/// The leak view of one live instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceLeaks {
    /// Instance name.
    pub name: String,
    /// Supervisor pid.
    pub supervisor_pid: u32,
    /// Counters and stale rings.
    pub leaks: LeakReport,
}

/// A file in the shm directory no instance owns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrphanFile {
    /// Path.
    pub path: String,
    /// Size, bytes.
    pub bytes: u64,
    /// pids of live processes still attached to it as a ring side (it is then not stale).
    pub attached_pids: Vec<u32>,
}

/// `relayctl gc --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    /// The directory scanned.
    pub shm_dir: String,
    /// Nothing was removed; `removed` lists what would be.
    pub dry_run: bool,
    /// Files removed (or that would be).
    pub removed: Vec<RemovedFile>,
    /// Files that could not be removed.
    pub failed: Vec<FailedRemoval>,
    /// Files at instance names that are not trusted (not a regular file of this user) and
    /// were therefore neither read nor removed; `error` says what is wrong.
    #[serde(default)]
    pub untrusted: Vec<FailedRemoval>,
    /// Total size of `removed`, bytes.
    pub bytes: u64,
}

impl GcReport {
    /// Records a file removed (or that would be, in a dry run).
    fn note_removed(&mut self, path: &Path, bytes: u64, instance: &str, reason: &str) {
        self.bytes += bytes;
        self.removed.push(RemovedFile {
            path: path.display().to_string(),
            bytes,
            instance: instance.to_owned(),
            reason: reason.to_owned(),
        });
    }
}

/// One file `gc` removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemovedFile {
    /// Path.
    pub path: String,
    /// Size, bytes.
    pub bytes: u64,
    /// The instance it belonged to.
    pub instance: String,
    /// Why it was stale: `dead supervisor pid N` or `orphan`.
    pub reason: String,
}

/// One file `gc` failed to remove.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedRemoval {
    /// Path.
    pub path: String,
    /// The error.
    pub error: String,
}

impl FailedRemoval {
    fn new(path: &Path, error: impl std::fmt::Display) -> FailedRemoval {
        FailedRemoval {
            path: path.display().to_string(),
            error: error.to_string(),
        }
    }
}

/// The instance a file name in the shm directory belongs to: `shmrelay.NAME.rest` -> `NAME`
/// (instance names contain no dot).
pub fn instance_of(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix("shmrelay.")?;
    let (name, tail) = rest.split_once('.')?;
    (names::valid_instance(name) && !tail.is_empty()).then_some(name)
}

/// Every instance in the shm directory, by name (one read of the directory).
pub fn list() -> ListReport {
    let listing = Listing::scan();
    ListReport {
        shm_dir: names::shm_dir().display().to_string(),
        instances: listing
            .instances()
            .iter()
            .map(|n| summary_in(&listing, n))
            .collect(),
    }
}

/// A summary of instance `name`, even when its stats segment cannot be read.
pub fn summary(name: &str) -> InstanceSummary {
    summary_in(&Listing::scan(), name)
}

/// A summary of instance `name` from a listing: only its stats view's header is read.
pub fn summary_in(listing: &Listing, name: &str) -> InstanceSummary {
    let files = listing.files(name);
    let bytes = files
        .iter()
        .map(|f| file_size(f))
        .fold(0u64, u64::saturating_add);
    let mut s = InstanceSummary {
        name: name.to_owned(),
        supervisor_pid: 0,
        alive: false,
        uptime_secs: 0.0,
        started_unix_ms: 0,
        fronts: 0,
        workers: 0,
        connections: 0,
        files: files.iter().map(|p| p.display().to_string()).collect(),
        bytes,
        error: None,
    };
    match view::peek(&names::stats_path(name)) {
        Ok(p) => {
            s.alive = p.live;
            s.supervisor_pid = p.pid;
            s.started_unix_ms = p.started_unix_ms;
            s.uptime_secs = unix_ms().saturating_sub(p.started_unix_ms) as f64 / 1000.0;
            s.fronts = p.fronts;
            s.workers = p.workers;
            s.connections = p.connections;
            if p.len < view::PUBLISHED_MIN as u64 && p.len != crate::stats::STATS_SIZE as u64 {
                s.error = Some(format!("stats segment is {} bytes", p.len));
            }
        }
        Err(e) => {
            // Liveness still counts for a view of another layout: the lock says it all.
            s.alive = names::open_checked(&names::stats_path(name), false)
                .ok()
                .and_then(|f| view::locked(&f).ok())
                .unwrap_or(false);
            s.error = Some(e.to_string());
        }
    }
    s
}

/// Whether the stats file of `name` is one this user can trust (regular, owned).
fn trusted(name: &str) -> Result<(), String> {
    names::open_checked(&names::stats_path(name), false)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What is left over on this host. With `only`, live instances other than that one are not
/// looked at (dead instances and orphans are host-wide and always reported).
///
/// # Errors
///
/// `only` names an instance that does not exist.
pub fn leaks(only: Option<&str>) -> Result<LeaksReport, ReportError> {
    let listing = Listing::scan();
    if let Some(name) = only {
        if listing.files(name).is_empty() {
            return Err(ReportError::NotFound {
                name: name.to_owned(),
                path: names::stats_path(name),
            });
        }
    }
    let mut report = LeaksReport {
        shm_dir: names::shm_dir().display().to_string(),
        dead_instances: Vec::new(),
        orphan_files: orphans(&listing),
        instances: Vec::new(),
        problems: Vec::new(),
    };
    for name in listing.instances() {
        if let Err(e) = trusted(&name) {
            report.problems.push(format!("instance `{name}`: {e}"));
            continue;
        }
        let s = summary_in(&listing, &name);
        if !s.alive {
            report.problems.push(format!(
                "instance `{}` is dead (no supervisor holds its lock; last pid {}) and left {} \
                 file(s), {} bytes",
                s.name,
                s.supervisor_pid,
                s.files.len(),
                s.bytes
            ));
            report.dead_instances.push(s);
            continue;
        }
        if only.is_some_and(|o| o != name) {
            continue;
        }
        match InstanceReport::read(&name) {
            Ok(r) => {
                report.problems.extend(
                    r.leaks
                        .problems()
                        .into_iter()
                        .map(|p| format!("instance `{name}`: {p}")),
                );
                report.instances.push(InstanceLeaks {
                    name,
                    supervisor_pid: r.supervisor_pid,
                    leaks: r.leaks,
                });
            }
            Err(e) => report
                .problems
                .push(format!("instance `{name}` is alive but unreadable: {e}")),
        }
    }
    for o in &report.orphan_files {
        if o.attached_pids.is_empty() {
            report.problems.push(format!(
                "orphan file {} ({} bytes) belongs to no instance",
                o.path, o.bytes
            ));
        }
    }
    Ok(report)
}

/// Files with the `shmrelay.` prefix whose instance has no stats segment.
fn orphans(listing: &Listing) -> Vec<OrphanFile> {
    let mut out: Vec<OrphanFile> = Vec::new();
    for (name, files) in &listing.by_instance {
        let stats = names::stats_path(name);
        if files.contains(&stats) {
            continue;
        }
        for path in files {
            out.push(OrphanFile {
                bytes: file_size(path),
                attached_pids: attached_pids(path),
                path: path.display().to_string(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Live pids attached to the ring at `path` (none if it is not a readable ring of this user).
fn attached_pids(path: &Path) -> Vec<u32> {
    // Checked first (never blocks on a FIFO, never follows a link, only this user's files);
    // in a sticky directory nobody else can then swap the name for another file.
    if names::open_checked(path, false).is_err() {
        return Vec::new();
    }
    let Ok(view) = RingView::open(path) else {
        return Vec::new();
    };
    let s = view.snapshot();
    [s.producer.pid, s.consumer.pid]
        .into_iter()
        .filter(|&p| matches!(process_liveness(p), Liveness::Alive | Liveness::Stalled))
        .collect()
}

fn file_size(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).map_or(0, |m| m.len())
}

/// Removes the files of dead instances and orphan files nobody is attached to; with
/// `dry_run`, only says what it would remove. A live instance's files are never touched:
/// a dead instance's view is claimed first (its lock taken, so no supervisor can hold it, and
/// its name checked to still lead to the file found dead), and only then are its files
/// removed, the view last. Only regular files of this user are removed; others are listed in
/// `untrusted`.
pub fn gc(dry_run: bool) -> GcReport {
    let listing = Listing::scan();
    let mut report = GcReport {
        shm_dir: names::shm_dir().display().to_string(),
        dry_run,
        removed: Vec::new(),
        failed: Vec::new(),
        untrusted: Vec::new(),
        bytes: 0,
    };
    let remove = |report: &mut GcReport, path: &Path, instance: &str, reason: &str| {
        if !names::is_own_regular(path) {
            let error = names::open_checked(path, false).err().map_or_else(
                || "not a regular file of this user".to_owned(),
                |e| e.to_string(),
            );
            report.untrusted.push(FailedRemoval::new(path, error));
            return;
        }
        let bytes = file_size(path);
        if !dry_run {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                // Removed meanwhile (a concurrent gc, or the owner's own cleanup).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => {
                    report.failed.push(FailedRemoval::new(path, e));
                    return;
                }
            }
        }
        report.note_removed(path, bytes, instance, reason);
    };
    for name in listing.instances() {
        let stats = names::stats_path(&name);
        let peek = match view::peek(&stats) {
            Ok(p) => p,
            Err(view::ViewError::Untrusted(e)) => {
                report.untrusted.push(FailedRemoval::new(&stats, e));
                continue;
            }
            // Ours but unreadable (short, another version): dead only if unlocked.
            Err(_) => {
                let live = names::open_checked(&stats, false)
                    .ok()
                    .and_then(|f| view::locked(&f).ok())
                    .unwrap_or(true);
                if live {
                    continue;
                }
                view::Peek::default()
            }
        };
        if peek.live {
            continue;
        }
        let reason = format!("dead supervisor pid {}", peek.pid);
        let rest: Vec<&PathBuf> = listing
            .files(&name)
            .iter()
            .filter(|f| **f != stats)
            .collect();
        if dry_run {
            for f in rest {
                remove(&mut report, f, &name, &reason);
            }
            remove(&mut report, &stats, &name, &reason);
            continue;
        }
        // Claim it: from here on no supervisor can take the name until it is gone.
        let claimed = match view::claim_stale(&stats, std::time::Duration::ZERO) {
            Ok(Some(c)) => c,
            // Gone meanwhile, or taken by a new supervisor: leave it to its owner.
            Ok(None) | Err(view::ViewError::Live { .. }) => continue,
            Err(e) => {
                report.failed.push(FailedRemoval::new(&stats, e));
                continue;
            }
        };
        for f in rest {
            remove(&mut report, f, &name, &reason);
        }
        let bytes = file_size(&stats);
        match claimed.remove() {
            Ok(true) => report.note_removed(&stats, bytes, &name, &reason),
            Ok(false) => {}
            Err(e) => report.failed.push(FailedRemoval::new(&stats, e)),
        }
    }
    // A view being created is locked by its creator; an unlocked one older than a few seconds
    // was left by a supervisor that died between creating and publishing it.
    for p in &listing.pending {
        let stale = names::open_checked(p, false).is_ok_and(|f| {
            !view::locked(&f).unwrap_or(true)
                && f.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(10))
        });
        if stale {
            remove(&mut report, p, "", "unpublished view of a dead supervisor");
        }
    }
    for o in orphans(&listing) {
        if o.attached_pids.is_empty() {
            let path = PathBuf::from(&o.path);
            let instance = path
                .file_name()
                .and_then(|n| instance_of(&n.to_string_lossy()).map(str::to_owned))
                .unwrap_or_default();
            remove(&mut report, &path, &instance, "orphan");
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_leaks_and_gc_read_the_directory_once() {
        // Whatever the directory holds (it is this process's shm dir), one read each.
        let before = names::dir_scans();
        let _ = list();
        assert_eq!(names::dir_scans() - before, 1, "list");
        let before = names::dir_scans();
        let _ = gc(true);
        assert_eq!(names::dir_scans() - before, 1, "gc --dry-run");
        let before = names::dir_scans();
        let _ = leaks(None);
        assert_eq!(names::dir_scans() - before, 1, "leaks");
    }

    #[test]
    fn instance_of_file_names() {
        assert_eq!(instance_of("shmrelay.edge.stats"), Some("edge"));
        assert_eq!(instance_of("shmrelay.edge-2.f0.w1.req"), Some("edge-2"));
        assert_eq!(instance_of("shmrelay.edge"), None);
        assert_eq!(instance_of("shmrelay.edge."), None);
        assert_eq!(instance_of("other.edge.stats"), None);
        assert_eq!(instance_of("shmrelay..stats"), None);
    }
}
