//! `fronts = "auto"` and the open-files limit: how many fronts a relay needs for its
//! `max_conns`, and refusing a configuration whose connections cannot fit its fronts' fds.
//!
//! Every connection is one fd of the front that holds it, and a process cannot hold more fds
//! than `RLIMIT_NOFILE` (20,000 on the test machines, not raisable). A front also holds a few
//! fds of its own (listeners, rings, eventfds, the control socket): [`front_reserve`].

use super::{Config, ConfigError};

/// `fronts` as stored in [`Config`] when the setting is `"auto"` (the default).
pub const AUTO: usize = 0;
/// `max_conns` when the setting is not given: this many, or what the configured fronts can
/// hold if that is less.
pub const DEFAULT_MAX_CONNS: u64 = 100_000;

/// What this host allows the relay's processes, read once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_NOFILE` (soft) of the relay's processes.
    pub nofile: u64,
    /// CPUs this process may run on.
    pub cores: usize,
}

impl Limits {
    /// This process's limits, after raising the soft open-files limit to the hard one (the
    /// fronts and workers inherit it). Best effort: where it cannot be raised, the soft limit
    /// is what the fronts get, and what the fronts are sized for.
    pub fn of_this_process() -> Limits {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let nofile = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) => {
                if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                    hard
                } else {
                    soft
                }
            }
            Err(_) => 1024,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Limits { nofile, cores }
    }
}

/// Fds a front holds besides its connections: stdio, epoll, its doorbell and control socket,
/// the control segment, each listener, and per worker two ring fds (four while a new ring
/// generation replaces the old) and the worker's doorbell; with room to spare for the
/// short-lived ones (`/proc` reads, the ready pipe).
pub fn front_reserve(cfg: &Config) -> u64 {
    64 + cfg.listeners().len() as u64 + 6 * cfg.total_workers() as u64
}

/// Connections one front can hold under `limits`.
pub fn per_front(cfg: &Config, limits: &Limits) -> u64 {
    limits.nofile.saturating_sub(front_reserve(cfg))
}

/// Fds the supervisor holds: every ring (two per front and worker), every front's listening
/// sockets, an eventfd per process, a control socket per front, and room for the rest.
fn supervisor_fds(cfg: &Config, fronts: usize) -> u64 {
    let (f, w, l) = (
        fronts as u64,
        cfg.total_workers() as u64,
        cfg.listeners().len() as u64,
    );
    2 * f * w + f * l + 2 * f + w + 256
}

/// Fronts for `max_conns` connections: enough that each holds its share under the
/// open-files limit, and at least one per core so the network side can use every core.
///
/// ```
/// use shmrelay::config::fronts::{auto_fronts, Limits};
/// let limits = Limits { nofile: 20_000, cores: 2 };
/// let cfg = shmrelay::config::Config::default();
/// assert_eq!(auto_fronts(&cfg, 1_000, &limits), 2, "one per core");
/// assert_eq!(auto_fronts(&cfg, 20_000, &limits), 2, "20,000 do not fit one front");
/// assert_eq!(auto_fronts(&cfg, 1_000_000, &limits), 51);
/// ```
pub fn auto_fronts(cfg: &Config, max_conns: u64, limits: &Limits) -> usize {
    let each = per_front(cfg, limits).max(1);
    let need = max_conns.div_ceil(each).max(1);
    need.max(limits.cores as u64).min(usize::MAX as u64) as usize
}

impl Config {
    /// The settings with `fronts = "auto"` and an unset `max_conns` worked out for `limits`
    /// (what the fronts are started with).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when `max_conns` cannot fit: more connections than the
    /// configured fronts can hold under the open-files limit, more fronts needed than a
    /// relay can have, or more ring fds than the supervisor can hold. The message says what
    /// fits and what to change.
    pub fn resolve(&self, limits: &Limits) -> Result<Config, ConfigError> {
        let mut c = self.clone();
        let each = per_front(self, limits);
        let max_fronts = crate::stats::MAX_FRONTS;
        let auto = self.fronts == AUTO;
        let nofile = limits.nofile;
        if each == 0 {
            return Err(ConfigError::Invalid {
                name: "fronts",
                problem: format!(
                    "the open-files limit (RLIMIT_NOFILE {nofile}) leaves no room for connections: a front needs {} fds for itself",
                    front_reserve(self)
                ),
            });
        }
        if auto {
            let want = self.max_conns.unwrap_or(DEFAULT_MAX_CONNS);
            let need = auto_fronts(self, want, limits);
            if need > max_fronts && self.max_conns.is_some() {
                return Err(ConfigError::Invalid {
                    name: "max_conns",
                    problem: format!(
                        "{want} connections need {need} fronts at {each} connections each (RLIMIT_NOFILE {nofile}), and a relay has at most {max_fronts} fronts: at most {} connections",
                        each * max_fronts as u64
                    ),
                });
            }
            c.fronts = need.min(max_fronts);
        }
        let fits = each.saturating_mul(c.fronts as u64);
        match self.max_conns {
            Some(n) if n > fits => {
                let need = n.div_ceil(each);
                return Err(ConfigError::Invalid {
                    name: "max_conns",
                    problem: format!(
                        "{n} connections do not fit {} front(s): each holds at most {each} (RLIMIT_NOFILE {nofile} minus {} fds of its own), so {fits} in all; use fronts >= {need} or fronts = \"auto\", or lower max_conns",
                        c.fronts,
                        front_reserve(self)
                    ),
                });
            }
            Some(_) => {}
            None => c.max_conns = Some(DEFAULT_MAX_CONNS.min(fits)),
        }
        let sup = supervisor_fds(self, c.fronts);
        if sup > nofile {
            return Err(ConfigError::Invalid {
                name: "fronts",
                problem: format!(
                    "{} fronts x {} workers need {sup} fds in the supervisor (two rings per front and worker), above RLIMIT_NOFILE {nofile}: use fewer fronts or workers",
                    c.fronts,
                    self.total_workers()
                ),
            });
        }
        Ok(c)
    }

    /// `max_conns` in effect (after [`resolve`](Config::resolve): the resolved value).
    pub fn max_conns(&self) -> u64 {
        self.max_conns.unwrap_or(DEFAULT_MAX_CONNS)
    }
}

/// `fronts` in the settings file: a count, or `"auto"` ([`AUTO`]), as `serde(with)`.
pub(super) mod setting {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(fronts: &usize, s: S) -> Result<S::Ok, S::Error> {
        match *fronts {
            super::AUTO => s.serialize_str("auto"),
            n => s.serialize_u64(n as u64),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = usize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of fronts (1 or more) or \"auto\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
                match usize::try_from(v) {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(E::custom(format!(
                        "fronts = {v}: use 1 or more, or \"auto\""
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
                super::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `--fronts` and `fronts = "..."`: `auto` or a count of at least 1.
///
/// ```
/// use shmrelay::config::fronts::{parse, AUTO};
/// assert_eq!(parse("auto"), Ok(AUTO));
/// assert_eq!(parse("3"), Ok(3));
/// assert!(parse("0").is_err());
/// ```
///
/// # Errors
///
/// Anything else, with the reason.
pub fn parse(v: &str) -> Result<usize, String> {
    match v.trim() {
        "auto" => Ok(AUTO),
        n => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("fronts = {v:?}: use 1 or more, or \"auto\"")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: Limits = Limits {
        nofile: 20_000,
        cores: 2,
    };

    fn cfg(text: &str) -> Config {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn auto_is_the_default_and_reads_and_writes_as_auto() {
        let c = Config::default();
        assert_eq!(c.fronts, AUTO);
        assert_eq!(c.max_conns, None);
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("fronts = \"auto\""), "{text}");
        assert_eq!(cfg(&text), c);
        assert_eq!(cfg("fronts = 3").fronts, 3);
        assert_eq!(cfg("fronts = \"4\"").fronts, 4);
        assert!(toml::from_str::<Config>("fronts = 0").is_err());
        assert!(toml::from_str::<Config>("fronts = \"many\"").is_err());
        let set = Config::default()
            .with_overrides(&["fronts=auto".into(), "max_conns=5".into()])
            .unwrap();
        assert_eq!((set.fronts, set.max_conns), (AUTO, Some(5)));
    }

    #[test]
    fn auto_sizes_the_fronts_for_max_conns_under_the_fd_limit() {
        let r = cfg("max_conns = 1000000").resolve(&HERE).unwrap();
        assert_eq!(r.fronts, 51);
        assert_eq!(r.max_conns, Some(1_000_000));
        // What the fronts are started with says how many.
        let back: Config = toml::from_str(&toml::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.fronts, 51);
        // The default: 100,000 connections, six fronts here.
        let d = Config::default().resolve(&HERE).unwrap();
        assert_eq!((d.fronts, d.max_conns), (6, Some(100_000)));
        // Many cores: one front each at least.
        let big = Limits {
            nofile: 1 << 20,
            cores: 16,
        };
        assert_eq!(Config::default().resolve(&big).unwrap().fronts, 16);
    }

    #[test]
    fn explicit_fronts_cap_the_default_max_conns_and_refuse_a_larger_one() {
        let one = cfg("fronts = 1").resolve(&HERE).unwrap();
        assert_eq!(one.max_conns, Some(per_front(&one, &HERE)));
        assert!(one.max_conns() < 20_000);
        let err = cfg("fronts = 2\nmax_conns = 1000000")
            .resolve(&HERE)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid setting max_conns: "), "{err}");
        assert!(err.contains("do not fit 2 front(s)"), "{err}");
        assert!(err.contains("fronts >= 51"), "{err}");
        assert!(err.contains("RLIMIT_NOFILE 20000"), "{err}");
        cfg("fronts = 2\nmax_conns = 39000").resolve(&HERE).unwrap();
    }

    #[test]
    fn more_than_a_relay_can_have_is_refused() {
        let err = cfg("max_conns = 2000000")
            .resolve(&HERE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 64 fronts"), "{err}");
        let tiny = Limits {
            nofile: 50,
            cores: 1,
        };
        let err = Config::default().resolve(&tiny).unwrap_err().to_string();
        assert!(err.contains("leaves no room"), "{err}");
        let err = cfg("fronts = 64\nworkers = 64")
            .resolve(&Limits {
                nofile: 4096,
                cores: 2,
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("in the supervisor"), "{err}");
    }
}
