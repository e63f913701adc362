//! `cluster-worker`: the cluster-aware pub/sub worker. Start it through a shmrelay whose
//! config has a `[cluster]` section: `worker_cmd = "/path/to/cluster-worker"`, any pool size.
//! Exit status 2 when its settings or rings are missing, 1 on a corrupt ring.

use std::process::ExitCode;

use shmrelay_cluster::{serve, Bridge, Node, Settings};
use shmrelay_worker::Worker;

fn main() -> ExitCode {
    let started = Settings::from_env()
        .map_err(|e| e.to_string())
        .and_then(|s| {
            Worker::from_env()
                .map(|w| (s, w))
                .map_err(|e| e.to_string())
        })
        .and_then(|(s, w)| {
            Bridge::start(&s, w.index())
                .map(|b| (s, w, b))
                .map_err(|e| e.to_string())
        });
    let (settings, mut worker, bridge) = match started {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cluster-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let mut node = Node::new(
        &settings.node,
        worker.index(),
        bridge.commands.clone(),
        bridge.counters.clone(),
    );
    match serve(&mut worker, &mut node, &bridge) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster-worker: {e}");
            ExitCode::from(1)
        }
    }
}
