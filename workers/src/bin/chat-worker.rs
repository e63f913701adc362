//! `chat-worker`: the chat example worker ([`shmrelay_worker::chat`]) as a binary, for a
//! WebSocket listener: rooms, join, leave, broadcast and history in JSON text messages.
//! Rooms live in the worker, so it must be alone on its listener (`workers = 1`); it refuses
//! to start in a larger pool (exit status 2).
//!
//! ```text
//! chat-worker [--history N] [--max-rooms N]
//! ```

use std::process::ExitCode;

use shmrelay_worker::chat::{Chat, ChatLimits};

fn limits_from_args() -> Result<ChatLimits, String> {
    let mut limits = ChatLimits::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--history" => &mut limits.history,
            "--max-rooms" => &mut limits.max_rooms,
            _ => {
                return Err(format!(
                    "unknown argument {flag:?} (--history N, --max-rooms N)"
                ))
            }
        };
        let value = args.next().ok_or(format!("{flag} needs a number"))?;
        *slot = value
            .parse()
            .map_err(|e| format!("{flag} {value:?}: {e}"))?;
    }
    if limits.max_rooms == 0 {
        return Err("--max-rooms must be at least 1".into());
    }
    Ok(limits)
}

fn main() -> ExitCode {
    let limits = match limits_from_args() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chat-worker: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = shmrelay_worker::slot::require_pool_of_one() {
        eprintln!("chat-worker: {e}");
        return ExitCode::from(2);
    }
    match shmrelay_worker::Worker::from_env() {
        Ok(mut worker) => match worker.run(&mut Chat::new(limits)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chat-worker: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("chat-worker: {e}");
            ExitCode::from(2)
        }
    }
}
