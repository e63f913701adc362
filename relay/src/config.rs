//! Relay settings: a TOML file (`--config FILE`) overridden by command-line flags.
//!
//! ```toml
//! instance = "default"       # names the shared memory segments; one live relay per name
//! listen = "127.0.0.1:7878"
//! fronts = "auto"            # front processes (sharing one listening socket); "auto": enough
//!                            # for max_conns under the open-files limit, at least one per core
//! workers = 2                # worker processes
//! # worker_cmd = "/usr/local/bin/my-worker --flag"   # default: the built-in echo worker
//! # worker_cmd = ["/bin/sh", "-c", "exec my-worker 2>>/var/log/w.log"]  # or an argv array
//! max_frame = 1048576        # largest frame payload from a client, bytes
//! # max_conns = 100000       # connections across all fronts (default: 100000, or what explicit
//!                            # fronts hold under the open-files limit if less; more than that: refused)
//! max_conns_per_addr = 0     # connections per client IP address across all fronts (0: no cap)
//! accept_rate = 0            # new connections per second across all fronts (0: no limit)
//! accept_burst = 1000        # token bucket depth for accept_rate
//! pause_accept_when_overloaded = true  # stop accepting while every worker's ring is full
//! ping_min_ms = 15000        # the front pings a connection idle this long (low-RTT links)...
//! ping_max_ms = 60000        # ...up to this long for high-RTT links (interval = 64 x RTT, clamped)
//! # heartbeat_timeout_ms = 22500  # nothing received this long: close (default 1.5 x the interval)
//! idle_timeout_ms = 0        # no data frame (heartbeats do not count) this long: close (0: never)
//! max_pending = 4194304      # reply bytes queued for a client that does not read
//! # ring_capacity = 4194304  # bytes per ring; default fits two max frames
//! drain_ms = 5000            # how long shutdown waits for in-flight replies
//! crash_limit = 5            # a worker crashing this often...
//! crash_window_ms = 30000    # ...within this window is marked failed (its clients get an error)
//! hang_timeout_ms = 5000     # frames waiting this long for a worker that does not move: hung
//! kill_hung = true           # replace a hung worker (false: only report it)
//! dead_letter_after = 2      # a frame that crashed this many redelivered generations is dead-lettered (0: never)
//! failed_retry_max_ms = 60000  # a failed worker is retried after 1 s, doubling up to this
//! # user = "shmrelay-worker" # run workers as this user (the supervisor must be root)
//! # worker_users = ["app-a", "app-b"]  # or one user per worker index (cycled)
//! backlog = 4096             # listen backlog
//! # metrics = "127.0.0.1:9187"  # serve Prometheus metrics at http://ADDR/metrics (off by default)
//! codec = "length-prefixed"  # wire codec of the default listener: length-prefixed, line, resp, websocket
//! # path = "/ws"            # websocket: the only request path accepted (404 otherwise; default any)
//! # origins = ["https://example.com"]  # websocket: Origin allowlist (403 otherwise; default any)
//! # subprotocols = ["chat.v1"]  # websocket: offered, in preference order (the first the client also offers is selected)
//! pending_budget = 268435456 # reply bytes queued for slow clients in one front, all together
//! partial_budget = 134217728 # bytes of partial frames held by one front, all together
//! frame_timeout_ms = 30000   # a frame must be complete this long after its first byte (0: never)
//! push_scope = "listener"    # a worker writes only to its own listener's connections ("relay": any)
//! ```
//!
//! Several listeners, each with its codec and its own worker pool (when any `[[listener]]`
//! is given, a top-level `listen`, `codec`, `workers` or `worker_cmd`, in the file, as a flag
//! or with `--set`, is an error: each table sets its own):
//!
//! ```toml
//! [[listener]]
//! listen = "127.0.0.1:7878"
//! codec = "length-prefixed"  # the default
//! workers = 2                # the default is 1
//! # worker_cmd = "..."       # default: the built-in echo worker
//!
//! [[listener]]
//! listen = "127.0.0.1:6380"
//! codec = "resp"
//! workers = 2                # resp with several workers: commands are routed by key
//! worker_cmd = "/usr/local/bin/kv-worker"
//!
//! [[listener]]
//! listen = "127.0.0.1:8080"
//! codec = "websocket"        # browsers and apps (RFC 6455; no permessage-deflate)
//! path = "/chat"             # 404 for any other request path
//! origins = ["https://chat.example.com"]  # 403 for another Origin (a request without one is a non-browser client: allowed)
//! subprotocols = ["chat.v1"] # selected if the client offers it
//! worker_cmd = "/usr/local/bin/chat-worker"
//! ```
//!
//! Beyond one host (the `cluster-worker` pub/sub workers of crate `shmrelay-cluster` join a
//! NATS cluster; see [`ClusterConfig`]):
//!
//! ```toml
//! [cluster]
//! urls = ["nats://10.0.0.5:4222"]
//! node = "edge-1"
//! ```
//!
//! Workers are indexed globally, in listener order. With `line` and `resp` there are no
//! heartbeats, so no pings and no heartbeat timeout: only `idle_timeout_ms` (if set) and TCP
//! keepalive close a silent connection.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shmrelay_worker::Codec;

/// The largest `max_frame`: every ring holds two frames, and there are two rings per front
/// and worker, so larger frames mean gigabytes of shared memory per ring.
pub const MAX_FRAME_LIMIT: u32 = 1 << 30;
/// The largest ring (`ring_capacity`): what two frames of [`MAX_FRAME_LIMIT`] need.
pub const MAX_RING_CAPACITY: usize = 1 << 32;
/// The longest duration setting (7 days): a longer one is a unit mistake, and the clock
/// arithmetic on it would overflow.
pub const MAX_MS: u64 = 7 * 24 * 3600 * 1000;
/// The largest `accept_burst` and `accept_rate`: the shared token bucket keeps its tokens in
/// 24 bits.
pub const MAX_ACCEPT_TOKENS: u64 = (1 << 24) - 1;

/// The top-level settings a `[[listener]]` table sets for itself: with tables they would be
/// ignored, so setting one beside tables (in the file, by a flag or with `--set`) is an error.
pub const PER_LISTENER: [&str; 7] = [
    "listen",
    "codec",
    "workers",
    "worker_cmd",
    "path",
    "origins",
    "subprotocols",
];

/// Why a top-level `key` cannot be used with `[[listener]]` tables.
pub fn per_listener_conflict(key: &str) -> String {
    format!(
        "{key} is not used with [[listener]] tables (each table sets its own listen, codec, workers and worker_cmd): set it in the tables"
    )
}

/// One `[[listener]]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on (`IP:port`; port 0 picks one).
    pub listen: SocketAddr,
    /// `length-prefixed` (default), `line` or `resp`; any other name is a parse error.
    #[serde(default, with = "codec_name")]
    pub codec: Codec,
    /// Workers of this listener's pool (default 1).
    #[serde(default = "one")]
    pub workers: usize,
    /// Worker command; `None` runs the built-in echo worker.
    #[serde(default)]
    pub worker_cmd: Option<WorkerCmd>,
    /// `websocket`: the request path (without query) a handshake must name; `None` accepts
    /// any (the worker sees it in its OPEN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `websocket`: the `Origin` values allowed (exact match); empty allows any. A request
    /// without `Origin` (not a browser) is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    /// `websocket`: the subprotocols offered, in preference order: the first of these the
    /// client also offers is selected; none if there is no match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subprotocols: Vec<String>,
}

/// A worker command: a command line split with shell-word rules, or an argv array.
///
/// No shell runs it: quotes and backslashes group words (`"/bin/sh -c 'exec my-worker'"` is
/// three words), nothing is expanded. For pipes or redirections, name a shell in the command.
///
/// ```
/// use shmrelay::config::WorkerCmd;
/// let line = WorkerCmd::Line("/bin/sh -c 'exec my-worker --flag'".into());
/// assert_eq!(line.argv().unwrap(), ["/bin/sh", "-c", "exec my-worker --flag"]);
/// let argv = WorkerCmd::Argv(vec!["/usr/bin/my worker".into()]);
/// assert_eq!(argv.argv().unwrap(), ["/usr/bin/my worker"]);
/// assert!(WorkerCmd::Line("/bin/sh -c 'unterminated".into()).argv().is_err());
/// ```
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum WorkerCmd {
    /// `worker_cmd = "PATH ARGS"`, split with shell-word rules.
    Line(String),
    /// `worker_cmd = ["PATH", "ARG", ...]`, taken as it is.
    Argv(Vec<String>),
}

impl WorkerCmd {
    /// The program and its arguments.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] (`worker_cmd`) for an unterminated quote or a trailing
    /// backslash, or a command with no program.
    pub fn argv(&self) -> Result<Vec<String>, ConfigError> {
        let bad = |problem: String| ConfigError::Invalid {
            name: "worker_cmd",
            problem,
        };
        let argv = match self {
            WorkerCmd::Line(line) => {
                shell_words::split(line).map_err(|e| bad(format!("{line:?}: {e}")))?
            }
            WorkerCmd::Argv(argv) => argv.clone(),
        };
        match argv.first() {
            Some(prog) if !prog.is_empty() => Ok(argv),
            _ => Err(bad(format!("{self:?} names no program"))),
        }
    }
}

fn one() -> usize {
    1
}

impl ListenerConfig {
    /// The codec (an unknown name never gets this far: it fails the parse).
    pub fn codec(&self) -> Codec {
        self.codec
    }
}

/// A [`Codec`] in the config by its name (`length-prefixed`, `line`, `resp`), as `serde(with)`:
/// an unknown name is an error that lists the valid ones, never a silent default.
mod codec_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use shmrelay_worker::Codec;

    pub fn serialize<S: Serializer>(codec: &Codec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(codec.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Codec, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Every setting, with its default.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Instance name: part of every segment name.
    pub instance: String,
    /// Address to listen on (`IP:port`; port 0 picks one).
    pub listen: SocketAddr,
    /// Front processes; [`fronts::AUTO`] (0, written `"auto"`, the default) until
    /// [`Config::resolve`] works it out from `max_conns` and the open-files limit.
    #[serde(with = "fronts::setting")]
    pub fronts: usize,
    /// Worker processes.
    pub workers: usize,
    /// Worker command; `None` runs the built-in echo worker.
    pub worker_cmd: Option<WorkerCmd>,
    /// Largest frame payload accepted from a client.
    pub max_frame: u32,
    /// Connections open at once across all fronts; `None` (not set): see
    /// [`fronts::DEFAULT_MAX_CONNS`] and [`Config::resolve`].
    pub max_conns: Option<u64>,
    /// Connections per client IP address across all fronts; 0 for no cap.
    pub max_conns_per_addr: u64,
    /// New connections per second across all fronts; 0 for no limit.
    pub accept_rate: u64,
    /// Depth of the accept-rate token bucket.
    pub accept_burst: u64,
    /// Stop accepting while every worker's request ring is full.
    pub pause_accept_when_overloaded: bool,
    /// Shortest ping interval (for connections with a small RTT).
    pub ping_min_ms: u64,
    /// Longest ping interval.
    pub ping_max_ms: u64,
    /// Close a connection from which no frame arrived for this long; default 1.5x its ping
    /// interval.
    pub heartbeat_timeout_ms: Option<u64>,
    /// Close a connection that sent no data frame for this long; 0 for never.
    pub idle_timeout_ms: u64,
    /// Reply bytes queued per client before it is disconnected as a slow consumer.
    /// On a routed pool a connection's outstanding requests and held replies count too: past
    /// it the client is not read until they drop below half (held reply bytes and queue past
    /// it: slow consumer).
    pub max_pending: usize,
    /// Ring data bytes (a power of two); default: enough for two maximum frames, at least 4 MiB.
    /// Larger is not faster: the front sends each reply from the ring, and the further the ring
    /// outgrows the CPU caches, the colder those bytes are. With 4 KiB frames, 16 MiB rings gave
    /// 0.81x the throughput of 4 MiB ones, and 1 MiB rings 0.94x, which stall on a full ring
    /// (BENCHMARKS.md, "4 KiB against the C echo").
    pub ring_capacity: Option<usize>,
    /// Shutdown drain time in milliseconds.
    pub drain_ms: u64,
    /// Listen backlog.
    pub backlog: i32,
    /// Address to serve Prometheus metrics on (`GET /metrics`); off when unset.
    pub metrics: Option<SocketAddr>,
    /// Crashes of one worker within `crash_window_ms` that mark it failed.
    pub crash_limit: u32,
    /// The window for `crash_limit`.
    pub crash_window_ms: u64,
    /// A worker whose request ring holds frames and whose position has not moved for this
    /// long is hung.
    pub hang_timeout_ms: u64,
    /// Kill and replace a hung worker (otherwise only report it).
    pub kill_hung: bool,
    /// A frame that was in flight when the worker crashed, and again when each of this many
    /// replacements it was redelivered to crashed, is dead-lettered: its connection gets the
    /// codec's error and is closed, the next replacement skips it, and the crashes it caused
    /// no longer count towards `crash_limit`. 0 turns dead-lettering off.
    pub dead_letter_after: u32,
    /// A worker marked failed is retried after 1 s, then after twice as long each time it
    /// fails again, up to this (SIGUSR1 to the supervisor retries every failed worker now).
    pub failed_retry_max_ms: u64,
    /// Run every worker as this user (needs a root supervisor). Workers get their rings as
    /// inherited fds, so they need no access to /dev/shm; the segments stay root's, mode 0600.
    pub user: Option<String>,
    /// One user per worker index (cycled), overriding `user`: workers of different users cannot
    /// read each other's rings or /proc entries.
    pub worker_users: Vec<String>,
    /// Codec of the default listener (`length-prefixed`, `line`, `resp`).
    #[serde(with = "codec_name")]
    pub codec: Codec,
    /// `websocket` listener settings of the default listener (see [`ListenerConfig::path`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// See [`ListenerConfig::origins`].
    pub origins: Vec<String>,
    /// See [`ListenerConfig::subprotocols`].
    pub subprotocols: Vec<String>,
    /// `[[listener]]` tables; when empty, `listen`, `codec`, `workers` and `worker_cmd` make the
    /// single default listener.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    // --- Per-front budgets and push scope (issue 12, items 5, 6, 11) ---
    /// Reply bytes queued for clients that do not read, across all connections of one front:
    /// past it the connections with the largest queues are closed (`slow_consumer`) until the
    /// total is back under it. The per-connection bound is `max_pending`.
    pub pending_budget: usize,
    /// Bytes of partial frames (frames split across reads) held by one front, across all its
    /// connections: past it the connections holding the largest partials are closed with the
    /// codec's protocol error (`protocol_error`, counted in `partial_budget_closes`).
    pub partial_budget: usize,
    /// A frame must be complete this long after its first byte arrived, with every codec;
    /// otherwise its connection is closed with the codec's protocol error. 0: never.
    pub frame_timeout_ms: u64,
    /// Which connections a worker may write to (replies, pushes, closes): `listener` (the
    /// default: connections of its own listener) or `relay` (any connection of the relay).
    /// A record outside the scope is dropped and counted (`push_out_of_scope`).
    pub push_scope: PushScope,
    // --- Beyond one host over NATS (issue 19) ---
    /// `[cluster]`: NATS servers and this node's name, handed to every worker in its
    /// environment (the relay itself never connects to NATS). Off when absent.
    pub cluster: Option<ClusterConfig>,
}

/// Which connections a worker may write to.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PushScope {
    /// Connections accepted on the worker's own listener.
    #[default]
    Listener,
    /// Any connection of the relay.
    Relay,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            instance: "default".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            fronts: fronts::AUTO,
            workers: 2,
            worker_cmd: None,
            max_frame: 1 << 20,
            max_conns: None,
            max_conns_per_addr: 0,
            accept_rate: 0,
            accept_burst: 1000,
            pause_accept_when_overloaded: true,
            ping_min_ms: 15_000,
            ping_max_ms: 60_000,
            heartbeat_timeout_ms: None,
            idle_timeout_ms: 0,
            max_pending: 4 << 20,
            ring_capacity: None,
            drain_ms: 5_000,
            backlog: 4096,
            metrics: None,
            crash_limit: 5,
            crash_window_ms: 30_000,
            hang_timeout_ms: 5_000,
            kill_hung: true,
            dead_letter_after: 2,
            failed_retry_max_ms: 60_000,
            user: None,
            worker_users: Vec::new(),
            codec: Codec::LengthPrefixed,
            path: None,
            origins: Vec::new(),
            subprotocols: Vec::new(),
            listeners: Vec::new(),
            pending_budget: 256 << 20,
            partial_budget: 128 << 20,
            frame_timeout_ms: 30_000,
            push_scope: PushScope::Listener,
            cluster: None,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    /// A value is out of range.
    #[error("invalid setting {name}: {problem}")]
    Invalid { name: &'static str, problem: String },
}

impl Config {
    /// Reads a TOML file.
    ///
    /// # Errors
    ///
    /// [`ConfigError::File`] naming the file and the problem (unknown keys included, and a
    /// top-level key of [`PER_LISTENER`] beside `[[listener]]` tables).
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let config: Config = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        // Which keys the file names (a default value is indistinguishable once parsed).
        let table: toml::Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if table.contains_key("listener") {
            if let Some(key) = PER_LISTENER.into_iter().find(|k| table.contains_key(*k)) {
                return Err(err(format!("top-level {}", per_listener_conflict(key))));
            }
        }
        Ok(config)
    }

    /// The listeners in effect: the `[[listener]]` tables, or the default one.
    pub fn listeners(&self) -> Vec<ListenerConfig> {
        if self.listeners.is_empty() {
            vec![ListenerConfig {
                listen: self.listen,
                codec: self.codec,
                workers: self.workers,
                worker_cmd: self.worker_cmd.clone(),
                path: self.path.clone(),
                origins: self.origins.clone(),
                subprotocols: self.subprotocols.clone(),
            }]
        } else {
            self.listeners.clone()
        }
    }

    /// Workers across every listener's pool.
    pub fn total_workers(&self) -> usize {
        self.listeners().iter().map(|l| l.workers).sum()
    }

    /// For each worker (global index), the index of its listener.
    pub fn worker_listeners(&self) -> Vec<usize> {
        self.listeners()
            .iter()
            .enumerate()
            .flat_map(|(i, l)| std::iter::repeat_n(i, l.workers))
            .collect()
    }

    /// The user worker `w` runs as, if any.
    pub fn worker_user(&self, w: usize) -> Option<&str> {
        if self.worker_users.is_empty() {
            self.user.as_deref()
        } else {
            Some(&self.worker_users[w % self.worker_users.len()])
        }
    }

    /// Applies `KEY=VALUE` overrides, each value read as TOML (a bare word as a string).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for an unknown key or a value of the wrong type, or a key of
    /// [`PER_LISTENER`] when the result has `[[listener]]` tables.
    pub fn with_overrides(&self, sets: &[String]) -> Result<Config, ConfigError> {
        let bad = |problem: String| ConfigError::Invalid {
            name: "--set",
            problem,
        };
        let mut table = toml::Table::try_from(self).map_err(|e| bad(e.to_string()))?;
        let mut keys = Vec::new();
        for kv in sets {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not KEY=VALUE")))?;
            let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(v.to_owned()));
            keys.push(k.trim().to_owned());
            table.insert(k.trim().to_owned(), value);
        }
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.to_string()))?;
        if !config.listeners.is_empty() {
            if let Some(key) = keys.iter().find(|k| PER_LISTENER.contains(&k.as_str())) {
                return Err(bad(per_listener_conflict(key)));
            }
        }
        Ok(config)
    }

    /// The ring capacity in effect: a request ring must hold a maximum frame plus its header
    /// in one record, and a record can use at most half a ring.
    pub fn ring_capacity(&self) -> usize {
        self.ring_capacity.unwrap_or_else(|| {
            let need = 2 * shm_ring::layout::reserved_size(self.max_frame as usize + 4) as usize;
            need.next_power_of_two().max(4 << 20)
        })
    }
}

mod cluster;
pub mod fronts;
mod validate;

pub use cluster::ClusterConfig;

#[cfg(test)]
mod tests;
