//! The cluster worker's event loop: frames from the fronts and events from NATS, sleeping on
//! the worker's doorbell and the bridge's eventfd together.

use std::os::fd::AsRawFd;

use shmrelay_worker::{stop_requested, Worker, WorkerError};

use crate::bridge::Bridge;
use crate::node::Node;

/// NATS events handled per pass, so that frames waiting in the rings are not starved.
const EVENTS_PER_PASS: usize = 1024;
/// The longest sleep, so that the stop flag and the counters are looked at.
const SLEEP_MS: i32 = 100;

/// Serves frames and NATS events until SIGTERM or SIGINT.
///
/// # Errors
///
/// [`WorkerError::Corrupt`] if a front corrupted a request ring.
pub fn serve(worker: &mut Worker, node: &mut Node, bridge: &Bridge) -> Result<(), WorkerError> {
    while !stop_requested() {
        let mut busy = worker.poll_once(node)?;
        // Drain the bell before the channel: an event sent after this drain rings it again,
        // so the poll below cannot sleep through it.
        bridge.bell.drain();
        busy += worker.with_out(|out| {
            let mut n = 0;
            while n < EVENTS_PER_PASS {
                let Ok(event) = bridge.events.try_recv() else {
                    break;
                };
                node.on_event(event, out);
                n += 1;
            }
            n
        });
        if let Some(words) = worker.cluster_words() {
            bridge.counters.publish(words);
        }
        if busy > 0 {
            continue;
        }
        if worker.prepare_wait()? {
            let mut fds =
                [worker.doorbell().as_raw_fd(), bridge.bell.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            // SAFETY: two valid pollfds in a live local array, count 2.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, SLEEP_MS) };
        }
        worker.finish_wait();
    }
    node.leave_all();
    Ok(())
}
