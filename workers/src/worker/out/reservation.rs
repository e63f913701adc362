//! [`Reservation`]: reply ring space handed out before the reply's length is known, committed
//! or abandoned later (what the C ABI's reserve/commit is made of).

use super::{Out, SendError, BATCH_ENTRY_HEADER};
use crate::ConnId;

impl<'w> Out<'w> {
    /// Reserves up to `cap` bytes of reply ring for one frame to `conn`, to be written in
    /// place and sent with [`Reservation::commit`] once the length is known (for replies
    /// formatted straight into the ring). Dropping the reservation abandons it: nothing is
    /// sent. One at a time: the reservation borrows this `Out`. A `cap` larger than one ring
    /// record is served from a private buffer, split over records at the commit (one copy).
    ///
    /// ```
    /// # use shmrelay_worker::{ConnId, Handler, Out};
    /// struct Greeter;
    /// impl Handler for Greeter {
    ///     fn on_frame(&mut self, conn: ConnId, frame: &[u8], _: bool, out: &mut Out<'_>) {
    ///         let Ok(mut r) = out.reserve(conn, 64) else { return };
    ///         let n = {
    ///             use std::io::Write;
    ///             let mut w = &mut r[..];
    ///             let _ = write!(w, "hello, {} bytes", frame.len());
    ///             64 - w.len()
    ///         };
    ///         let _ = r.commit(n);
    ///     }
    /// }
    /// # let (mut w, mut f) = shmrelay_worker::testing::attach(0, Default::default(), 1 << 16);
    /// # f.push(2, ConnId::new(0, 1, 1), 0, &[0, 0, 0, 2, b'h', b'i']);
    /// # w.poll_once(&mut Greeter).unwrap();
    /// # assert_eq!(f.replies()[0].body, b"hello, 2 bytes");
    /// ```
    ///
    /// # Errors
    ///
    /// See [`SendError`]. A failed reservation of a reply to the frame being handled is
    /// answered by the SDK as a failed [`send`](Out::send) is.
    pub fn reserve(&mut self, conn: ConnId, cap: usize) -> Result<Reservation<'_, 'w>, SendError> {
        let r = self.try_reserve(conn, cap);
        let r = self.note(conn, r);
        let kind = r?;
        Ok(Reservation {
            out: self,
            conn,
            kind,
        })
    }

    fn try_reserve(&mut self, conn: ConnId, cap: usize) -> Result<Kind, SendError> {
        self.check_len(cap)?;
        let max = self.ring(conn)?.max_payload();
        if self.coalesces(conn) && cap + BATCH_ENTRY_HEADER <= max {
            return self
                .begin_entry(conn, cap)
                .map(|body| Kind::Ring { body, cap });
        }
        self.finish_run()?;
        if cap > max {
            let mut buf = Vec::new();
            buf.try_reserve_exact(cap)
                .map_err(|_| SendError::TooLarge { len: cap, max })?;
            buf.resize(cap, 0);
            return Ok(Kind::Heap(buf));
        }
        self.open_run(conn, cap, false)?;
        let run = self.run.as_ref().ok_or(SendError::Corrupt)?;
        Ok(Kind::Ring {
            body: run.base,
            cap,
        })
    }
}

/// Space for one reply, written in place (see [`Out::reserve`]); dereferences to the
/// reserved bytes. [`commit`](Reservation::commit) sends a prefix of them; dropping it sends
/// nothing.
pub struct Reservation<'o, 'w> {
    out: &'o mut Out<'w>,
    conn: ConnId,
    kind: Kind,
}

enum Kind {
    /// `cap` bytes of the open run's reserved ring space at `body`.
    Ring { body: *mut u8, cap: usize },
    /// Larger than a ring record: a private buffer, split over records at the commit.
    Heap(Vec<u8>),
}

impl Reservation<'_, '_> {
    /// Sends the first `len` bytes as one frame to the reservation's connection.
    ///
    /// # Errors
    ///
    /// [`SendError::TooLarge`] if `len` exceeds what was reserved (nothing is sent); otherwise
    /// as [`Out::send`].
    pub fn commit(mut self, len: usize) -> Result<(), SendError> {
        let conn = self.conn;
        let cap = self.len();
        if len > cap {
            return Err(SendError::TooLarge { len, max: cap });
        }
        let out = &mut *self.out;
        let r = match std::mem::replace(&mut self.kind, Kind::Heap(Vec::new())) {
            Kind::Ring { .. } => match out.run.as_ref().map(|r| r.batch) {
                Some(true) => {
                    out.end_entry(len);
                    Ok(())
                }
                Some(false) => {
                    if let Some(run) = out.run.as_mut() {
                        run.len = len;
                    }
                    out.finish_run()
                }
                None => Err(SendError::Corrupt),
            },
            Kind::Heap(buf) => {
                let kind = out.default_kind(conn);
                out.send_split(conn, kind, &buf[..len])
            }
        };
        out.note(conn, r)
    }
}

impl std::ops::Deref for Reservation<'_, '_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.kind {
            // SAFETY: `cap` bytes of reserved ring space, ours alone while the reservation
            // (which borrows the `Out`, so nothing else is written meanwhile) lives.
            Kind::Ring { body, cap } => unsafe { std::slice::from_raw_parts(*body, *cap) },
            Kind::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Reservation<'_, '_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.kind {
            // SAFETY: as in `deref`; exclusive because the reservation is borrowed mutably.
            Kind::Ring { body, cap } => unsafe { std::slice::from_raw_parts_mut(*body, *cap) },
            Kind::Heap(v) => v,
        }
    }
}

impl Drop for Reservation<'_, '_> {
    fn drop(&mut self) {
        // Abandoned: a plain reservation's run is dropped (an entry's space is simply reused).
        if let Kind::Ring { .. } = self.kind {
            if self.out.run.as_ref().is_some_and(|r| !r.batch) {
                self.out.run = None;
            }
        }
    }
}
