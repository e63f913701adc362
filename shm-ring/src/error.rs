//! Error types, one small enum per operation.

use std::io;
use std::time::Duration;

/// The peer broke the ring's invariants: shared memory holds a value no correct peer writes.
/// The ring cannot be used further in that direction; the data before the bad value is intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CorruptError {
    /// The producer's published position is not within `head ..= head + capacity`, went
    /// backwards, or is unaligned.
    #[error("corrupt ring: tail {tail} out of range for head {head} (capacity {capacity})")]
    TailOutOfRange { tail: u64, head: u64, capacity: u64 },
    /// The consumer's released position is not within `tail - capacity ..= tail`, went
    /// backwards, or is unaligned.
    #[error("corrupt ring: head {head} out of range for tail {tail} (capacity {capacity})")]
    HeadOutOfRange { head: u64, tail: u64, capacity: u64 },
    /// A record claims more bytes than remain before the end of the data area.
    #[error("corrupt ring: record at {pos} of length {len} crosses the end of the ring")]
    RecordCrossesEnd { pos: u64, len: u32 },
    /// A record claims bytes beyond the published tail.
    #[error("corrupt ring: record at {pos} of length {len} runs past the tail {tail}")]
    RecordPastTail { pos: u64, len: u32, tail: u64 },
    /// A padding record that does not reach exactly to the end of the data area.
    #[error("corrupt ring: padding at {pos} has length {len}, expected {expected}")]
    BadPadding { pos: u64, len: u32, expected: u64 },
}

/// Why [`Producer::reserve`](crate::Producer::reserve) gave no grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// Not enough free space now; retry after the consumer releases (see `wait_for_space`).
    #[error("ring full")]
    Full,
    /// The payload can never fit: larger than [`Producer::max_payload`](crate::Producer::max_payload).
    #[error("payload of {len} bytes exceeds the ring's maximum of {max}")]
    TooLarge { len: usize, max: usize },
    /// The consumer's position in shared memory is invalid.
    #[error(transparent)]
    Corrupt(#[from] CorruptError),
}

/// Why creating a ring segment failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The capacity is not a power of two between 4 KiB and 1 TiB.
    #[error("invalid ring capacity {0}: must be a power of two between 4096 and 2^40")]
    BadCapacity(u64),
    /// The name is taken by a live segment (named segments are created exclusively).
    #[error("shared memory segment {0} already exists")]
    Exists(String),
    /// Not enough shared memory (tmpfs full or memory cgroup limit): reported at creation,
    /// because the space is allocated up front, never as a SIGBUS later.
    #[error("no space for a {size}-byte shared memory segment {name}: {source}")]
    NoSpace {
        name: String,
        size: u64,
        source: io::Error,
    },
    /// Any other system call failure.
    #[error("creating shared memory segment {name}: {source}")]
    Io { name: String, source: io::Error },
}

/// Why attaching to an existing ring segment failed. Each case names something different to fix.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The magic word stayed zero for the whole wait: the creator has not finished (or died
    /// before finishing) initialising the segment.
    #[error("ring segment not initialised yet (waited {waited:?})")]
    NotInitialised { waited: Duration },
    /// The segment was not created by this crate, or was overwritten.
    #[error("not a ring segment: magic {found:#018x}")]
    BadMagic { found: u64 },
    /// Created by a different layout version of this crate (e.g. an old binary).
    #[error("ring layout version mismatch: segment has {found}, this binary speaks {expected}")]
    VersionMismatch { found: u32, expected: u32 },
    /// The file is not the size the header says, or the header's capacity is invalid.
    #[error("ring segment size mismatch: file is {file_len} bytes, header implies {expected}")]
    SizeMismatch { file_len: u64, expected: u64 },
    /// Another live process is attached on this side.
    #[error("the ring's {side} side is attached by live process {pid}")]
    InUse { side: &'static str, pid: u32 },
    /// The positions in the header are already inconsistent.
    #[error(transparent)]
    Corrupt(#[from] CorruptError),
    /// A producer on a ring whose data area this process mapped read-only.
    #[error("the ring's data area is mapped read-only here: it can only be consumed")]
    ReadOnly,
    /// Opening or mapping the segment failed.
    #[error("attaching to ring segment: {0}")]
    Io(#[from] io::Error),
}
