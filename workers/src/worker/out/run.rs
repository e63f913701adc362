//! Coalesced runs: consecutive replies to one connection built in place as one `BATCH`
//! record in reserved (uncommitted) ring space, committed when the run ends.

use shm_ring::Meta;

use super::split::{reserve_blocking_up_to, reserve_error};
use super::{kind_flag, Out, SendError};
use crate::codec::Codec;
use crate::protocol::{flags, tag, ConnId, BATCH_ENTRY_HEADER};

/// A coalesced record grows up to this many payload bytes (or the ring's record limit): 16
/// pipelined 4 KiB replies fit one.
const RUN_MAX: usize = 128 * 1024;

/// A record being built in a reply ring: space reserved there (not committed, so invisible
/// to the front and lost, never half-visible, if this process dies) and filled in place.
///
/// Invariant: nothing else is committed to the ring of `conn.front()` while a run is open
/// (every other record goes through [`Out::finish_run`] first), so the space stays ours.
pub(super) struct Run {
    pub(super) conn: ConnId,
    /// Entries with their headers (`BATCH`), or one plain reply body (a reservation that
    /// cannot be coalesced).
    pub(super) batch: bool,
    /// Start of the record's payload in the ring's data area.
    pub(super) base: *mut u8,
    /// Bytes reserved at `base`.
    pub(super) cap: usize,
    /// Bytes written so far.
    pub(super) len: usize,
    /// The request position of the last entry (the record's aux).
    pub(super) last: u64,
    /// The record's flags when it is not a batch (the message kind of a reservation).
    pub(super) flags: u16,
}

impl Out<'_> {
    /// The hot path of a reply (issue 14): `payload` answers the frame being handled, the
    /// open run is a batch to the same connection and has room for it: it is appended there
    /// as one entry, with no ring call. Returns false, having written nothing, otherwise.
    #[inline(always)]
    pub(super) fn append_to_run(&mut self, conn: ConnId, payload: &[u8]) -> bool {
        let len = payload.len();
        let fits = match &self.run {
            Some(run) => {
                run.batch && run.conn == conn && run.len + BATCH_ENTRY_HEADER + len <= run.cap
            }
            None => false,
        };
        if !fits || !self.coalesces(conn) || self.check_len(len).is_err() {
            return false;
        }
        let Some(run) = &self.run else {
            return false;
        };
        // SAFETY: run.len + 8 + len <= run.cap (checked above): the body lies inside the run's
        // reservation, ours alone until the commit (see `Run`); `payload` is the caller's
        // memory, not the ring's, so the two do not overlap.
        unsafe {
            let body = run.base.add(run.len + BATCH_ENTRY_HEADER);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), body, len);
        }
        self.end_entry(len);
        true
    }

    /// True if a reply to `conn` joins the run of coalesced replies: it answers the frame
    /// being handled, on a codec the front frames itself (not `websocket`, whose records carry
    /// the message kind).
    #[inline(always)]
    pub(super) fn coalesces(&self, conn: ConnId) -> bool {
        self.answering_conn == Some(conn)
            && self.answering > 0
            && matches!(self.codec, Codec::LengthPrefixed | Codec::Line)
    }

    /// Makes room for an entry of `len` body bytes in the run of `conn` (ending a run of
    /// another connection, or one without room, first); returns where its body goes.
    pub(super) fn begin_entry(&mut self, conn: ConnId, len: usize) -> Result<*mut u8, SendError> {
        let need = BATCH_ENTRY_HEADER + len;
        if let Some(run) = &self.run {
            if run.conn != conn || !run.batch || run.len + need > run.cap {
                self.finish_run()?;
            }
        }
        if self.run.is_none() {
            self.open_run(conn, need, true)?;
        }
        let run = self.run.as_ref().ok_or(SendError::Corrupt)?;
        // SAFETY: run.len + need <= run.cap (checked above, or the run was just opened with
        // at least `need` bytes): inside the reservation.
        Ok(unsafe { run.base.add(run.len + BATCH_ENTRY_HEADER) })
    }

    /// Completes the entry `begin_entry` made room for, with `len` body bytes written.
    #[inline(always)]
    pub(super) fn end_entry(&mut self, len: usize) {
        let answering = self.answering;
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let mut head = [0u8; BATCH_ENTRY_HEADER];
        head[..4].copy_from_slice(&(len as u32).to_le_bytes());
        // The low half: the front rebuilds the whole position from the record's aux.
        head[4..].copy_from_slice(&(answering as u32).to_le_bytes());
        // SAFETY: the header's 8 bytes at run.len lie inside the reservation (begin_entry
        // checked run.len + 8 + len <= cap); ours alone until the commit (see `Run`).
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), run.base.add(run.len), head.len());
        }
        run.len += BATCH_ENTRY_HEADER + len;
        run.last = answering;
    }

    /// Reserves ring space for a new run to `conn` of at least `need` bytes (as much as
    /// `RUN_MAX` for a batch), waiting for the front to make room.
    pub(super) fn open_run(
        &mut self,
        conn: ConnId,
        need: usize,
        batch: bool,
    ) -> Result<(), SendError> {
        let last = self.answering;
        let rep = self.ring(conn)?;
        let want = if batch {
            RUN_MAX.min(rep.max_payload()).max(need)
        } else {
            need
        };
        // The grant ends here uncommitted: the space stays reserved for us alone as long as
        // nothing else is committed to this ring (the invariant of `Run`).
        let (base, cap) = {
            let mut grant = reserve_blocking_up_to(rep, need, want)?;
            (grant.as_mut_ptr(), grant.len())
        };
        self.run = Some(Run {
            conn,
            batch,
            base,
            cap,
            len: 0,
            last,
            flags: kind_flag(self.answering_kind),
        });
        Ok(())
    }

    /// Commits the open run as a record (it becomes visible at the next publish).
    pub(super) fn finish_run(&mut self) -> Result<(), SendError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        if run.batch && run.len == 0 {
            return Ok(());
        }
        let rep = self.ring(run.conn)?;
        // Nothing was committed to this ring since the run was reserved, and the front only
        // frees space: this fits, where the run was (see below for the other case).
        let mut grant = rep.reserve(run.len).map_err(reserve_error)?;
        let at = grant.as_mut_ptr();
        if at != run.base {
            // The ring placed the record elsewhere (not with shm-ring's placement today,
            // which keeps a reservation where it fits): move the bytes there.
            // SAFETY: both ranges are `run.len` bytes of reserved space in this ring's data
            // area, ours alone; `copy` allows them to overlap.
            unsafe { std::ptr::copy(run.base, at, run.len) };
        }
        let flags = if run.batch { flags::BATCH } else { run.flags };
        grant.commit(
            run.len,
            Meta::tag(tag::SEND)
                .conn(run.conn.raw())
                .aux(run.last)
                .flags(flags),
        );
        Ok(())
    }
}
