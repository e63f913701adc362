//! Where an instance's shared memory lives. Every name carries the instance name, so two
//! instances on one host never share a segment, and ops tools find them all by prefix.

use std::path::{Path, PathBuf};

/// Directory of the segments: `/dev/shm`, or `$SHMRELAY_SHM_DIR` (tests, other tmpfs mounts).
pub fn shm_dir() -> PathBuf {
    std::env::var_os(shmrelay_worker::protocol::env::SHM_DIR)
        .map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from)
}

/// Prefix of every file of `instance`.
pub fn prefix(instance: &str) -> String {
    format!("shmrelay.{instance}.")
}

/// The stats segment of `instance`.
pub fn stats_path(instance: &str) -> PathBuf {
    shm_dir().join(format!("{}stats", prefix(instance)))
}

/// Direction of a ring; serialised (in reports' `--json` output) as `"request"` or `"reply"`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// Front to worker (`.req` file).
    Request,
    /// Worker to front (`.rep` file).
    Reply,
}

impl Dir {
    /// Stable lowercase name, as serialised.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(shmrelay::names::Dir::Reply.as_str(), "reply");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Request => "request",
            Dir::Reply => "reply",
        }
    }
}

impl std::fmt::Display for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ring between `front` and `worker` in direction `dir`.
pub fn ring_path(instance: &str, front: usize, worker: usize, dir: Dir) -> PathBuf {
    let d = match dir {
        Dir::Request => "req",
        Dir::Reply => "rep",
    };
    shm_dir().join(format!("{}f{front}.w{worker}.{d}", prefix(instance)))
}

/// Every file in the shm directory that belongs to `instance` (one directory read; for
/// several instances use one [`Listing`]).
pub fn instance_files(instance: &str) -> Vec<PathBuf> {
    Listing::scan().files(instance).to_vec()
}

/// Names of every instance with a stats segment in the shm directory.
pub fn instances() -> Vec<String> {
    Listing::scan().instances()
}

/// Instance names are short and safe in file names.
pub fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Every file in the shm directory that belongs to an instance, from ONE read of the
/// directory: `relayctl list`, `leaks` and `gc` look at thousands of files without reading the
/// directory once per instance.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    /// Instance name to its files (sorted), for every `shmrelay.NAME.*` name with a valid NAME.
    pub by_instance: std::collections::BTreeMap<String, Vec<PathBuf>>,
    /// Hidden `.shmrelay-new.*` files: stats views being created (or left by a supervisor that
    /// died in the instant between creating and publishing one).
    pub pending: Vec<PathBuf>,
}

thread_local! {
    static SCANS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread read the shm directory (to test that tools read it once).
pub fn dir_scans() -> usize {
    SCANS.with(std::cell::Cell::get)
}

impl Listing {
    /// Reads the shm directory once.
    pub fn scan() -> Listing {
        SCANS.with(|c| c.set(c.get() + 1));
        let mut l = Listing::default();
        let dir = shm_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return l;
        };
        for e in entries.flatten() {
            let n = e.file_name();
            let Some(n) = n.to_str() else { continue };
            if n.starts_with(".shmrelay-new.") {
                l.pending.push(dir.join(n));
                continue;
            }
            let Some(rest) = n.strip_prefix("shmrelay.") else {
                continue;
            };
            let Some((name, tail)) = rest.split_once('.') else {
                continue;
            };
            if tail.is_empty() || !valid_instance(name) {
                continue;
            }
            l.by_instance
                .entry(name.to_owned())
                .or_default()
                .push(dir.join(n));
        }
        for files in l.by_instance.values_mut() {
            files.sort();
        }
        l
    }

    /// Instances with a stats segment, by name.
    pub fn instances(&self) -> Vec<String> {
        self.by_instance
            .iter()
            .filter(|(name, files)| files.contains(&stats_path(name)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The files of `instance` (empty if none).
    pub fn files(&self, instance: &str) -> &[PathBuf] {
        self.by_instance.get(instance).map_or(&[], Vec::as_slice)
    }
}

/// Why a file in the shared-memory directory is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedFile {
    /// Opening failed (a symbolic link is refused with ELOOP and reported as such).
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A symbolic link at the name.
    #[error("{} is a symbolic link, not a shmrelay segment: not followed (remove it)", path.display())]
    Symlink { path: PathBuf },
    /// Not a regular file (a FIFO, a socket, a device, a directory).
    #[error("{} is a {kind}, not a shmrelay segment (owned by uid {uid}): not opened further (remove it)", path.display())]
    NotRegular {
        path: PathBuf,
        kind: &'static str,
        uid: u32,
    },
    /// Owned by another user: anybody can create files in /dev/shm.
    #[error("{} is owned by uid {uid}, not by this user (uid {me}): another user's file at this instance's name is not trusted (its owner or root can remove it)", path.display())]
    Foreign { path: PathBuf, uid: u32, me: u32 },
}

impl UntrustedFile {
    /// The I/O error kind behind it (`NotFound` when the file does not exist).
    pub fn kind(&self) -> std::io::ErrorKind {
        match self {
            UntrustedFile::Open { source, .. } => source.kind(),
            _ => std::io::ErrorKind::InvalidData,
        }
    }
}

/// Opens a file in the shared-memory directory without trusting it: never blocks (a FIFO
/// opens at once with `O_NONBLOCK`), never follows a symbolic link (`O_NOFOLLOW`), and
/// checks with `fstat` on the opened file that it is a regular file owned by this process's
/// effective uid. Size and magic are the caller's to check.
///
/// # Errors
///
/// What is wrong with the file, naming it: [`UntrustedFile`].
pub fn open_checked(path: &Path, write: bool) -> Result<std::fs::File, UntrustedFile> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                UntrustedFile::Symlink {
                    path: path.to_owned(),
                }
            } else {
                UntrustedFile::Open {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    let m = file.metadata().map_err(|source| UntrustedFile::Open {
        path: path.to_owned(),
        source,
    })?;
    let ft = m.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_dir() {
            "directory"
        } else if ft.is_char_device() || ft.is_block_device() {
            "device"
        } else {
            "non-regular file"
        };
        return Err(UntrustedFile::NotRegular {
            path: path.to_owned(),
            kind,
            uid: m.uid(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(UntrustedFile::Foreign {
            path: path.to_owned(),
            uid: m.uid(),
            me,
        });
    }
    Ok(file)
}

/// Whether the file at `path` (not followed) is a regular file owned by this user: the
/// check before removing a file of a dead instance.
pub fn is_own_regular(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_file() && m.uid() == nix::unistd::geteuid().as_raw())
}
