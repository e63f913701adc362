//! `pubsub-worker`: the pubsub example worker as a binary of its own. Start it through shmrelay:
//! `shmrelay --worker-cmd "/path/to/pubsub-worker"`.

use std::process::ExitCode;

fn main() -> ExitCode {
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
