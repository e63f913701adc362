//! `shmrelay`: the supervisor, and (as hidden subcommands it runs itself) the front and the
//! built-in example workers.

use std::net::TcpListener;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use shm_ring::EventFd;
use shmrelay::config::{Config, WorkerCmd};
use shmrelay::front::{self, ChannelFds, FrontSettings};
use shmrelay::stats::Stats;
use shmrelay_worker::protocol::{env, inherited_fd, Channel};

mod faults;
mod faults_flip;
mod logging;
mod supervisor;
mod watchdog;

/// Relay long-lived TCP connections to worker processes through shared-memory rings.
#[derive(Parser)]
#[command(name = "shmrelay", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Args, Default)]
struct RunArgs {
    /// TOML settings file; flags override it (except --listen, --workers and --worker-cmd
    /// beside its [[listener]] tables: an error).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Instance name: its stats view is /dev/shm/shmrelay.NAME.stats ($SHMRELAY_SHM_DIR
    /// overrides the directory); one live relay per name. [default: default]
    #[arg(long)]
    instance: Option<String>,
    /// Address to listen on (port 0 picks one). [default: 127.0.0.1:7878]
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Front processes, or `auto`: enough for --max-conns under the open-files limit, at
    /// least one per core. [default: auto]
    #[arg(long, value_name = "N|auto", value_parser = shmrelay::config::fronts::parse)]
    fronts: Option<usize>,
    /// Worker processes. [default: 2]
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Worker command line, "PATH ARGS", split with shell-word rules (quotes group words; no
    /// shell runs it). [default: the built-in echo worker]
    #[arg(long, value_name = "CMD")]
    worker_cmd: Option<String>,
    /// Largest frame payload from a client, in bytes (1 to 1 GiB). [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    max_frame: Option<u32>,
    /// Open connections across all fronts; more than the fronts can hold under the
    /// open-files limit is refused. [default: 100000, or what --fronts N hold if less]
    #[arg(long, value_name = "N")]
    max_conns: Option<u64>,
    /// Bytes per ring (power of two). [default: fits two maximum frames, at least 4 MiB]
    #[arg(long, value_name = "BYTES")]
    ring_capacity: Option<usize>,
    /// Shutdown drain time in milliseconds. [default: 5000]
    #[arg(long, value_name = "MS")]
    drain_ms: Option<u64>,
    /// Serve Prometheus metrics on this address (`GET /metrics`). [default: off]
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Any setting of the config file, e.g. `--set ping_min_ms=500` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs one front (started by the supervisor, with its fds in the environment).
    #[command(hide = true)]
    Front(FrontArgs),
    /// Runs a built-in example worker (started by the supervisor).
    #[command(hide = true)]
    Worker {
        /// `echo`, `pubsub`, `journal`, `kv`, `chat`, or `scribbler`, `liar` and `quiet-liar` (fault
        /// injection).
        kind: String,
    },
}

#[derive(Args)]
struct FrontArgs {
    #[arg(long)]
    index: usize,
}

fn main() -> ExitCode {
    logging::init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        None => settings(cli.run).and_then(supervisor::run),
        Some(Cmd::Front(args)) => run_front(args),
        Some(Cmd::Worker { kind }) => run_worker(&kind),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::error_line(format_args!("shmrelay: {e:#}"));
            ExitCode::from(2)
        }
    }
}

fn settings(a: RunArgs) -> Result<Config> {
    // The flags a `[[listener]]` table sets for itself (there is no `--codec`: `--set`).
    let given = [
        ("--listen", a.listen.is_some()),
        ("--workers", a.workers.is_some()),
        ("--worker-cmd", a.worker_cmd.is_some()),
    ];
    let mut c = match &a.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = a.instance {
        c.instance = v;
    }
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if let Some(v) = a.fronts {
        c.fronts = v;
    }
    if let Some(v) = a.workers {
        c.workers = v;
    }
    if let Some(v) = a.worker_cmd {
        c.worker_cmd = Some(WorkerCmd::Line(v));
    }
    if let Some(v) = a.max_frame {
        c.max_frame = v;
    }
    if let Some(v) = a.max_conns {
        c.max_conns = Some(v);
    }
    if let Some(v) = a.ring_capacity {
        c.ring_capacity = Some(v);
    }
    if let Some(v) = a.drain_ms {
        c.drain_ms = v;
    }
    if let Some(v) = a.metrics {
        c.metrics = Some(v);
    }
    if !a.set.is_empty() {
        c = c.with_overrides(&a.set)?;
    }
    if !c.listeners.is_empty() {
        if let Some(flag) = given
            .into_iter()
            .find_map(|(flag, set)| set.then_some(flag))
        {
            anyhow::bail!(
                "{flag}: {}",
                shmrelay::config::per_listener_conflict(&flag[2..].replace('-', "_"))
            );
        }
    }
    Ok(c)
}

/// The value of `var`, which the supervisor sets for every front.
fn env_var(var: &str) -> Result<String> {
    std::env::var(var)
        .with_context(|| format!("{var} is not set: fronts are started by the shmrelay supervisor"))
}

fn env_fd(var: &str) -> Result<std::os::fd::OwnedFd> {
    let v = env_var(var)?;
    let fd: i32 = v
        .parse()
        .with_context(|| format!("{var}={v:?} is not an fd number"))?;
    // SAFETY: the supervisor passes each fd number once, for this process to own.
    unsafe { inherited_fd(fd) }.with_context(|| format!("{var}={fd}"))
}

fn run_front(a: FrontArgs) -> Result<()> {
    // One listening socket per configured listener, comma separated, in order.
    let fds = env_var(env::LISTEN_FD)?;
    let mut listeners = Vec::new();
    for v in fds.split(',') {
        let fd: i32 = v
            .parse()
            .with_context(|| format!("{} entry {v:?} is not an fd number", env::LISTEN_FD))?;
        // SAFETY: the supervisor passes each fd number once, for this process to own.
        let fd = unsafe { inherited_fd(fd) }.with_context(|| format!("{}={fd}", env::LISTEN_FD))?;
        listeners.push(TcpListener::from(fd));
    }
    let doorbell = Arc::new(EventFd::from_owned(env_fd(env::DOORBELL_FD)?));
    let stats = Stats::from_fd(env_fd(env::STATS_FD)?).context("mapping the stats segment")?;
    let ready = env_fd(env::READY_FD)?;
    let mut channels = Vec::new();
    for channel in Channel::parse_list(&env_var(env::CHANNELS)?)? {
        // SAFETY: inherited fds named once by the supervisor for this process.
        let (req, rep, bell) = unsafe { channel.take_fds()? };
        channels.push(ChannelFds {
            worker: channel.peer,
            req,
            rep,
            worker_doorbell: Arc::new(EventFd::from_owned(bell)),
        });
    }
    let text = env_var(env::CONFIG)?;
    let config: Config =
        toml::from_str(&text).with_context(|| format!("parsing {}", env::CONFIG))?;
    let settings = FrontSettings {
        index: a.index,
        config,
    };
    // The supervisor's control socket (new ring generations); absent from older supervisors.
    let control = match std::env::var(env::CONTROL_FD) {
        Ok(_) => Some(env_fd(env::CONTROL_FD)?),
        Err(_) => None,
    };
    front::run(
        settings,
        listeners,
        doorbell,
        channels,
        stats,
        Some(ready),
        control,
    )?;
    Ok(())
}

fn run_worker(kind: &str) -> Result<()> {
    use shmrelay_worker::{examples, Worker};
    if kind == "liar" || kind == "quiet-liar" {
        return faults::liar(kind == "quiet-liar");
    }
    let mut worker = Worker::from_env()?;
    match kind {
        "echo" => worker.run(&mut examples::Echo)?,
        "pubsub" => {
            shmrelay_worker::slot::require_pool_of_one()?;
            worker.run(&mut examples::PubSub::default())?
        }
        "journal" => worker.run(&mut examples::Journal::default())?,
        "chat" => {
            // Rooms live in the worker: one worker per listener (see workers/src/chat.rs).
            shmrelay_worker::slot::require_pool_of_one()?;
            worker.run(&mut shmrelay_worker::chat::Chat::default())?
        }
        "kv" => worker.run(&mut shmrelay_worker::kv::Kv::default())?,
        "flipper" => worker.run(&mut faults_flip::Flipper::from_env())?,
        "scribbler" => {
            let mut s = faults::Scribbler::from_env(worker.index());
            worker.run(&mut s)?
        }
        other => anyhow::bail!(
            "unknown built-in worker {other:?} (echo, pubsub, journal, kv, chat, scribbler, liar, quiet-liar)"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
