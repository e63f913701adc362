//! `pubsub-worker`: the pubsub example worker as a binary of its own. Start it through shmrelay,
//! alone on its listener: `shmrelay --workers 1 --worker-cmd "/path/to/pubsub-worker"`.
//!
//! Subscriptions live in the worker, so with several workers each sees only its own
//! connections and a publish reaches some subscribers: it refuses to start in a pool of more
//! than one (`SHMRELAY_POOL_SIZE`), exit status 2.

use std::process::ExitCode;

fn main() -> ExitCode {
    if let Err(e) = shmrelay_worker::slot::require_pool_of_one() {
        eprintln!("pubsub-worker: {e}");
        return ExitCode::from(2);
    }
    match shmrelay_worker::Worker::from_env() {
        Ok(mut worker) => match worker.run(&mut shmrelay_worker::examples::PubSub::default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pubsub-worker: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("pubsub-worker: {e}");
            ExitCode::from(2)
        }
    }
}
