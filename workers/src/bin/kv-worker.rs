//! `kv-worker`: the in-memory key-value store speaking RESP (see `shmrelay_worker::kv`), for a
//! `resp` listener: `[[listener]] codec = "resp", workers = 1, worker_cmd = "/path/to/kv-worker"`.

use std::process::ExitCode;

fn main() -> ExitCode {
    // The pool size first: a bad one is a setup error like a missing ring.
    let mut kv = match shmrelay_worker::kv::Kv::from_env() {
        Ok(kv) => kv,
        Err(e) => {
            eprintln!("kv-worker: {e}");
            return ExitCode::from(2);
        }
    };
    match shmrelay_worker::Worker::from_env() {
        Ok(mut worker) => match worker.run(&mut kv) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kv-worker: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("kv-worker: {e}");
            ExitCode::from(2)
        }
    }
}
