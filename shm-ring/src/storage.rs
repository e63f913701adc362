//! Where a ring's header and data live. The ring code is the same for every storage, so the
//! heap ring that loom checks runs exactly the protocol the shared-memory ring runs.

use std::sync::Arc;

use crate::layout::{self, RingHeader, MAGIC};
use crate::sync::Ordering;

/// Memory that holds one initialised ring.
///
/// # Safety
///
/// An implementor guarantees, for as long as the value lives:
/// - `header()` refers to a [`RingHeader`] whose identity was published with [`MAGIC`];
/// - `data()` points to `capacity()` bytes, 8-byte aligned, that stay mapped and that no Rust
///   reference in this process covers (the producer and consumer hand out slices of it under
///   the ring protocol);
/// - `capacity()` is a valid capacity (a power of two, see [`layout::valid_capacity`]) fixed
///   when the value was made: it is never re-read from memory a peer can write.
pub unsafe trait RingStorage {
    /// The shared header.
    fn header(&self) -> &RingHeader;
    /// Start of the data area.
    fn data(&self) -> *mut u8;
    /// Bytes in the data area.
    fn capacity(&self) -> usize;
    /// False if the data area is mapped read-only in this process (a reader's view, see
    /// [`ShmRing::open_fd_reader`](crate::ShmRing::open_fd_reader)): only a consumer may use
    /// it.
    fn data_writable(&self) -> bool {
        true
    }
}

// SAFETY: forwards to `T`, whose guarantees hold while the Arc keeps it alive.
unsafe impl<T: RingStorage + ?Sized> RingStorage for Arc<T> {
    fn header(&self) -> &RingHeader {
        (**self).header()
    }
    fn data(&self) -> *mut u8 {
        (**self).data()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn data_writable(&self) -> bool {
        (**self).data_writable()
    }
}

// SAFETY: forwards to `T`, whose guarantees hold for as long as the borrow.
unsafe impl<T: RingStorage + ?Sized> RingStorage for &T {
    fn header(&self) -> &RingHeader {
        (**self).header()
    }
    fn data(&self) -> *mut u8 {
        (**self).data()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn data_writable(&self) -> bool {
        (**self).data_writable()
    }
}

/// A ring on the heap: for one process, for tests, and for loom.
///
/// # Examples
///
/// ```
/// let (mut tx, mut rx) = shm_ring::HeapRing::channel(4096).unwrap();
/// tx.push(shm_ring::Meta::tag(1), b"hi").unwrap();
/// tx.publish();
/// let rec = rx.records().unwrap().next().unwrap().unwrap();
/// assert_eq!(rec.payload(), b"hi");
/// ```
pub struct HeapRing {
    header: Box<RingHeader>,
    /// u64 words so the data area is 8-byte aligned; UnsafeCell because both sides write
    /// through shared references.
    data: Box<[std::cell::UnsafeCell<u64>]>,
    capacity: usize,
}

// SAFETY: the data area is only touched under the ring protocol (one writer per region, handed
// over with Release/Acquire on the positions), exactly as across processes.
unsafe impl Sync for HeapRing {}
// SAFETY: owns its allocations; nothing is tied to a thread.
unsafe impl Send for HeapRing {}

impl HeapRing {
    /// A new, empty ring.
    ///
    /// # Errors
    ///
    /// [`CreateError::BadCapacity`](crate::CreateError::BadCapacity) unless `capacity` is a
    /// power of two between 4 KiB and 1 TiB.
    pub fn new(capacity: usize) -> Result<Arc<HeapRing>, crate::CreateError> {
        if !layout::valid_capacity(capacity as u64) {
            return Err(crate::CreateError::BadCapacity(capacity as u64));
        }
        let header = RingHeader::boxed_zeroed();
        init_header(&header, capacity as u64, layout::HEADER_SIZE as u64);
        let data = (0..capacity / 8)
            .map(|_| std::cell::UnsafeCell::new(0))
            .collect();
        Ok(Arc::new(HeapRing {
            header,
            data,
            capacity,
        }))
    }

    /// A producer and a consumer on a new heap ring.
    ///
    /// # Errors
    ///
    /// As [`HeapRing::new`].
    #[allow(clippy::type_complexity)]
    pub fn channel(
        capacity: usize,
    ) -> Result<
        (
            crate::Producer<Arc<HeapRing>>,
            crate::Consumer<Arc<HeapRing>>,
        ),
        crate::CreateError,
    > {
        let ring = HeapRing::new(capacity)?;
        let tx = crate::Producer::new(ring.clone()).expect("fresh ring");
        let rx = crate::Consumer::new(ring).expect("fresh ring");
        Ok((tx, rx))
    }
}

// SAFETY: the header was initialised in `new`; `data` is `capacity` bytes of u64-aligned
// UnsafeCells owned by self; capacity was validated in `new` and never changes.
unsafe impl RingStorage for HeapRing {
    fn header(&self) -> &RingHeader {
        &self.header
    }
    fn data(&self) -> *mut u8 {
        self.data.as_ptr() as *mut u8
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Writes the identity of a zeroed header and publishes it.
pub(crate) fn init_header(h: &RingHeader, capacity: u64, data_offset: u64) {
    h.id.version
        .store(layout::LAYOUT_VERSION, Ordering::Relaxed);
    h.id.capacity.store(capacity, Ordering::Relaxed);
    h.id.data_offset.store(data_offset, Ordering::Relaxed);
    h.id.creator_pid
        .store(std::process::id(), Ordering::Relaxed);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    h.id.created_unix_ms.store(ms, Ordering::Relaxed);
    // Release: pairs with the Acquire load of `magic` in `attach`, so an opener that sees the
    // magic also sees every field above.
    h.id.magic.store(MAGIC, Ordering::Release);
}
