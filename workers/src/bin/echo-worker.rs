//! `echo-worker`: the echo example worker as a binary of its own. Start it through shmrelay:
//! `shmrelay --worker-cmd "/path/to/echo-worker"`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match shmrelay_worker::Worker::from_env() {
        Ok(mut worker) => match worker.run(&mut shmrelay_worker::examples::Echo) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("echo-worker: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("echo-worker: {e}");
            ExitCode::from(2)
        }
    }
}
