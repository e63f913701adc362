//! Host-wide views of the shm directory: the instances in it ([`list`]), what is left over by
//! dead instances ([`leaks`]) and removing it ([`gc`]).
//!
//! An instance is *dead* when the supervisor pid recorded in its stats segment no longer
//! exists. Its files (`shmrelay.NAME.*`) are then stale: nothing will ever unlink them. A file
//! with the `shmrelay.` prefix whose instance has no stats segment at all is an *orphan*; it is
//! stale unless a live process is still attached to it as a ring side.
//!
//! The owner of a stats segment is read from its first bytes with a plain `read`, without
//! mapping or validating the segment, so segments of another layout version or half-created
//! ones are still attributed to their owner: a live relay of another version is never taken
//! for a dead one.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shm_ring::RingView;

use super::{process_liveness, InstanceReport, LeakReport, Liveness, ReportError};
use crate::names;
use crate::stats::{unix_ms, STATS_MAGIC};

/// Byte offset of the supervisor pid in the stats header (after magic u64, version, fronts
/// and workers u32).
const PID_OFFSET: usize = 20;
/// Byte offset of the start time (u64, after the pid).
const STARTED_OFFSET: usize = 24;
/// A stats segment with no owner written yet is taken for one being created this long.
const CREATE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// Supervisor pid from the stats segment (0 if unreadable).
    pub supervisor_pid: u32,
    /// True while that process exists.
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
    /// Why the stats segment could not be fully read (another layout version, truncated...).
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
    /// Total size of `removed`, bytes.
    pub bytes: u64,
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

/// The instance a file name in the shm directory belongs to: `shmrelay.NAME.rest` -> `NAME`
/// (instance names contain no dot).
pub fn instance_of(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix("shmrelay.")?;
    let (name, tail) = rest.split_once('.')?;
    (names::valid_instance(name) && !tail.is_empty()).then_some(name)
}

/// Every instance in the shm directory, by name.
pub fn list() -> ListReport {
    ListReport {
        shm_dir: names::shm_dir().display().to_string(),
        instances: names::instances()
            .iter()
            .filter(|n| names::valid_instance(n))
            .map(|n| summary(n))
            .collect(),
    }
}

/// A summary of instance `name`, even when its stats segment cannot be mapped.
pub fn summary(name: &str) -> InstanceSummary {
    let files = names::instance_files(name);
    let bytes = files.iter().map(|f| file_size(f)).sum();
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
    let owner = peek_owner(&names::stats_path(name));
    if let Some(o) = &owner {
        s.supervisor_pid = o.pid;
        s.alive = if o.pid == 0 {
            // Nothing written yet: a supervisor may be creating it right now. Give it time
            // before calling it dead.
            let age = std::fs::metadata(names::stats_path(name))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            age.is_none_or(|a| a < CREATE_GRACE)
        } else {
            process_liveness(o.pid) != Liveness::Dead
        };
        s.started_unix_ms = o.started_unix_ms;
        s.uptime_secs = unix_ms().saturating_sub(o.started_unix_ms) as f64 / 1000.0;
    }
    match InstanceReport::read(name) {
        Ok(r) => {
            s.fronts = r.fronts.len();
            s.workers = r.workers.len();
            s.connections = r.connections;
        }
        Err(ReportError::Stats { source, .. }) => s.error = Some(source.to_string()),
        Err(e) => s.error = Some(e.to_string()),
    }
    s
}

struct Owner {
    pid: u32,
    started_unix_ms: u64,
}

/// Reads the owner fields of a stats segment without mapping it. `None` if the file cannot
/// be read or is too short. The magic is not required: a supervisor that died while creating
/// the segment has written its pid before the magic.
fn peek_owner(path: &Path) -> Option<Owner> {
    let mut head = [0u8; 32];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    let u32_at = |o: usize| u32::from_ne_bytes(head[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_ne_bytes(head[o..o + 8].try_into().unwrap_or_default());
    let magic_ok = u64_at(0) == STATS_MAGIC;
    let pid = u32_at(PID_OFFSET);
    if !magic_ok && pid == 0 {
        // Nothing written: a creator that died right after creating the file, or not ours.
        return Some(Owner {
            pid: 0,
            started_unix_ms: 0,
        });
    }
    Some(Owner {
        pid,
        started_unix_ms: u64_at(STARTED_OFFSET),
    })
}

/// What is left over on this host. With `only`, live instances other than that one are not
/// looked at (dead instances and orphans are host-wide and always reported).
///
/// # Errors
///
/// `only` names an instance that does not exist.
pub fn leaks(only: Option<&str>) -> Result<LeaksReport, ReportError> {
    if let Some(name) = only {
        let path = names::stats_path(name);
        if !path.exists() && names::instance_files(name).is_empty() {
            return Err(ReportError::NotFound {
                name: name.to_owned(),
                path,
            });
        }
    }
    let mut report = LeaksReport {
        shm_dir: names::shm_dir().display().to_string(),
        dead_instances: Vec::new(),
        orphan_files: orphans(),
        instances: Vec::new(),
        problems: Vec::new(),
    };
    for name in names::instances() {
        if !names::valid_instance(&name) {
            continue;
        }
        let s = summary(&name);
        if !s.alive {
            report.problems.push(format!(
                "instance `{}` is dead (supervisor pid {} gone) and left {} file(s), {} bytes",
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
fn orphans() -> Vec<OrphanFile> {
    let dir = names::shm_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<OrphanFile> = entries
        .flatten()
        .filter_map(|e| {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let name = instance_of(&file_name)?;
            if names::stats_path(name).exists() {
                return None;
            }
            let path = e.path();
            Some(OrphanFile {
                bytes: file_size(&path),
                attached_pids: attached_pids(&path),
                path: path.display().to_string(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Live pids attached to the ring at `path` (none if it is not a readable ring).
fn attached_pids(path: &Path) -> Vec<u32> {
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
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// The identity of a file, to notice that it was replaced by another of the same name.
fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// One file `gc` means to remove.
struct Stale {
    path: PathBuf,
    instance: String,
    reason: String,
    /// For a dead instance's files: its stats segment and that segment's identity when it
    /// was found dead. A supervisor that takes over the name first removes that segment, so
    /// while it is still there with the same identity, the files are still the dead one's.
    guard: Option<(PathBuf, (u64, u64))>,
}

/// Removes the files of dead instances and orphan files nobody is attached to; with
/// `dry_run`, only says what it would remove. A live instance's files are never touched:
/// before each removal the dead instance's stats segment is checked to be the same file
/// that was found dead, so a new supervisor starting under the same name (which replaces it)
/// stops the removal of that instance's files.
pub fn gc(dry_run: bool) -> GcReport {
    let mut stale: Vec<Stale> = Vec::new();
    for name in names::instances() {
        if !names::valid_instance(&name) {
            continue;
        }
        let stats = names::stats_path(&name);
        let Some(id) = identity(&stats) else { continue };
        let s = summary(&name);
        if s.alive {
            continue;
        }
        let reason = format!("dead supervisor pid {}", s.supervisor_pid);
        // Rings first, the stats segment last: an interrupted gc leaves the instance visible.
        let mut files = names::instance_files(&name);
        files.sort_by_key(|f| *f == stats);
        stale.extend(files.into_iter().map(|path| Stale {
            path,
            instance: name.clone(),
            reason: reason.clone(),
            guard: Some((stats.clone(), id)),
        }));
    }
    for o in orphans() {
        if o.attached_pids.is_empty() {
            let path = PathBuf::from(&o.path);
            let instance = path
                .file_name()
                .and_then(|n| instance_of(&n.to_string_lossy()).map(str::to_owned))
                .unwrap_or_default();
            stale.push(Stale {
                path,
                instance,
                reason: "orphan".to_owned(),
                guard: None,
            });
        }
    }
    let mut report = GcReport {
        shm_dir: names::shm_dir().display().to_string(),
        dry_run,
        removed: Vec::new(),
        failed: Vec::new(),
        bytes: 0,
    };
    for s in stale {
        if let Some((stats, id)) = &s.guard {
            if identity(stats) != Some(*id) {
                // Taken over (or removed) meanwhile: leave the rest to its new owner.
                continue;
            }
        }
        let bytes = file_size(&s.path);
        if !dry_run {
            match std::fs::remove_file(&s.path) {
                Ok(()) => {}
                // Removed meanwhile (a concurrent gc, or the owner's own cleanup).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    report.failed.push(FailedRemoval {
                        path: s.path.display().to_string(),
                        error: e.to_string(),
                    });
                    continue;
                }
            }
        }
        report.bytes += bytes;
        report.removed.push(RemovedFile {
            path: s.path.display().to_string(),
            bytes,
            instance: s.instance,
            reason: s.reason,
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

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
