//! Replies longer than one ring record, and waiting for ring space.

use std::sync::Arc;

use shm_ring::{Meta, ReserveError, ShmRing};

use super::{kind_flag, Out, SendError, Tx};
use crate::codec::MessageKind;
use crate::protocol::{flags, tag, ConnId, SPLIT_HEADER};
use crate::worker::{stop_requested, PARK_TIMEOUT};

impl Out<'_> {
    /// A reply longer than one record: consecutive SEND records, all but the last flagged
    /// MORE, the first led by the whole length (see the protocol module).
    pub(super) fn send_split(
        &mut self,
        conn: ConnId,
        kind: MessageKind,
        payload: &[u8],
    ) -> Result<(), SendError> {
        self.check_len(payload.len())?;
        self.finish_run()?;
        let aux = self.answering;
        let rep = self.ring(conn)?;
        let piece = rep.max_payload() - SPLIT_HEADER;
        let mut at = 0;
        while at < payload.len() {
            let lead = if at == 0 { SPLIT_HEADER } else { 0 };
            let n = piece.min(payload.len() - at);
            let last = at + n == payload.len();
            let mut grant = match reserve_blocking(rep, lead + n) {
                Ok(g) => g,
                // Part of the message is in the ring already: the front must close.
                Err(_) if at > 0 => {
                    return Err(SendError::Partial {
                        sent: at,
                        len: payload.len(),
                    })
                }
                Err(e) => return Err(e),
            };
            if lead > 0 {
                grant[..lead].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            }
            grant[lead..lead + n].copy_from_slice(&payload[at..at + n]);
            let flags = if last { 0 } else { flags::MORE } | kind_flag(kind);
            grant.commit(
                lead + n,
                Meta::tag(tag::SEND).conn(conn.raw()).aux(aux).flags(flags),
            );
            at += n;
        }
        Ok(())
    }
}

pub(super) fn reserve_error(e: ReserveError) -> SendError {
    match e {
        ReserveError::TooLarge { len, max } => SendError::TooLarge { len, max },
        _ => SendError::Corrupt,
    }
}

pub(super) fn reserve_blocking(
    rep: &mut Tx,
    len: usize,
) -> Result<shm_ring::WriteGrant<'_, Arc<ShmRing>>, SendError> {
    reserve_blocking_up_to(rep, len, len)
}

/// Reserves at least `min` and up to `max` bytes, waiting (and publishing) while the ring has
/// less than `min` free.
pub(super) fn reserve_blocking_up_to(
    rep: &mut Tx,
    min: usize,
    max: usize,
) -> Result<shm_ring::WriteGrant<'_, Arc<ShmRing>>, SendError> {
    while !rep.has_space(min).map_err(reserve_error)? {
        if stop_requested() {
            return Err(SendError::Stopping);
        }
        rep.wait_for_space(min, Some(PARK_TIMEOUT))
            .map_err(reserve_error)?;
    }
    rep.reserve_up_to(min, max).map_err(reserve_error)
}
