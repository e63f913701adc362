//! Where an instance's shared memory lives. Every name carries the instance name, so two
//! instances on one host never share a segment, and ops tools find them all by prefix.

use std::path::PathBuf;

/// Directory of the segments: `/dev/shm`, or `$SHMRELAY_SHM_DIR` (tests, other tmpfs mounts).
pub fn shm_dir() -> PathBuf {
    std::env::var_os("SHMRELAY_SHM_DIR").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from)
}

/// Prefix of every file of `instance`.
pub fn prefix(instance: &str) -> String {
    format!("shmrelay.{instance}.")
}

/// The stats segment of `instance`.
pub fn stats_path(instance: &str) -> PathBuf {
    shm_dir().join(format!("{}stats", prefix(instance)))
}

/// Direction of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Front to worker.
    Request,
    /// Worker to front.
    Reply,
}

/// The ring between `front` and `worker` in direction `dir`.
pub fn ring_path(instance: &str, front: usize, worker: usize, dir: Dir) -> PathBuf {
    let d = match dir {
        Dir::Request => "req",
        Dir::Reply => "rep",
    };
    shm_dir().join(format!("{}f{front}.w{worker}.{d}", prefix(instance)))
}

/// Every file in the shm directory that belongs to `instance`.
pub fn instance_files(instance: &str) -> Vec<PathBuf> {
    let prefix = prefix(instance);
    let Ok(dir) = std::fs::read_dir(shm_dir()) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Names of every instance with a stats segment in the shm directory.
pub fn instances() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(shm_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("shmrelay.")?
                .strip_suffix(".stats")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// Instance names are short and safe in file names.
pub fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
