//! `relayctl`: inspect shmrelay instances on this host from the stats views their supervisors
//! publish, and clean up what dead instances left behind.
//!
//! Reading copies a view into private memory (never a mapping another process could shrink),
//! never writes to a relay's memory nor takes a lock the relay could wait on, so it works while
//! the relay is overloaded or a worker is stopped. Liveness is the lock the live supervisor
//! holds on its view; files that are not regular files of this user are reported, never read
//! or removed (see `shmrelay::view` and `shmrelay::names::open_checked`). `--json` prints the structs of
//! `shmrelay::report`, whose rustdoc is the schema.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Serialize;
use shmrelay::names;
use shmrelay::report::{self, host, InstanceReport, ReportError};

mod gc_one;
mod render;
mod term;

const EXIT_STATUS: &str = "\
ENVIRONMENT:
    SHMRELAY_SHM_DIR    Directory of the segments (default /dev/shm), as for shmrelay.

EXIT STATUS:
    0    Success, and nothing needs attention.
    1    Problems found: `stat` of a dead instance or of one whose report lists problems
         (failed pool, hung or dead worker, stalled ring, leaks); `leaks` found something;
         `top` watched an instance that is dead or went away.
    2    An error: bad usage, no such instance (or several live ones and none named), a
         segment that cannot be read, a file `gc` could not remove, a live instance named
         to `gc`.

A closed standard output (for example `relayctl top | head`) is not an error: relayctl
stops and exits 0.";

/// Inspect shmrelay instances on this host and clean up after dead ones.
///
/// Reads the stats view an instance's supervisor publishes under /dev/shm (or
/// $SHMRELAY_SHM_DIR): counters and ring snapshots, so it never disturbs the relay's data path.
#[derive(Parser, Debug)]
#[command(name = "relayctl", version, after_long_help = EXIT_STATUS)]
struct Cli {
    /// Print JSON instead of text: the structs of `shmrelay::report`, whose rustdoc documents
    /// every field (each subcommand's help says which it prints).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the instances on this host: name, supervisor pid, uptime, alive (its supervisor
    /// holds the lock on its view) or dead.
    List,
    /// Show an instance's rings, fronts, workers and leak counters, with rates.
    ///
    /// Takes two samples `--interval` apart to compute frames/s and bytes/s.
    Stat {
        /// Instance name [default: the only live instance].
        instance: Option<String>,
        /// Seconds between the two samples the rates come from; 0 for one sample, no rates.
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
        interval: Duration,
    },
    /// A live view refreshing in place, busiest rings first; q or Ctrl-C quits.
    ///
    /// When standard output is not a terminal, prints one plain frame per interval.
    Top {
        /// Instance name [default: the only live instance].
        instance: Option<String>,
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
        interval: Duration,
        /// Stop after this many refreshes [default: until q or Ctrl-C].
        #[arg(long, value_name = "N")]
        iterations: Option<u64>,
        /// Lay the text out in this many columns, dropping the least important ones [default:
        /// the terminal's width; unlimited when standard output is not a terminal].
        #[arg(long, value_name = "COLS", value_parser = clap::value_parser!(u16).range(1..))]
        width: Option<u16>,
        /// Show at most this many lines, summarising the rows that do not fit [default: the
        /// terminal's height; unlimited when standard output is not a terminal].
        #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u16).range(1..))]
        height: Option<u16>,
    },
    /// List dead-lettered frames: per worker, how many, and the last one (its connection,
    /// request position and time). A frame is dead-lettered when it crashed its worker at its
    /// first delivery and at each of `dead_letter_after` redeliveries.
    DeadLetters {
        /// Instance name [default: the only live instance].
        instance: Option<String>,
    },
    /// Show the cluster workers' NATS state: connected, subjects subscribed, messages in and
    /// out, errors, reconnects (workers of a relay with a `[cluster]` section).
    Cluster {
        /// Instance name [default: the only live instance].
        instance: Option<String>,
    },
    /// Show leaks: dead instances' segments, orphan files, stale rings, leak counters.
    ///
    /// Dead instances and orphan files are looked for host-wide; the leak counters and stale
    /// rings of INSTANCE only, or of every live instance without it.
    Leaks {
        /// Instance name [default: all].
        instance: Option<String>,
    },
    /// Remove the segments of dead instances (supervisor gone) and orphan files: of every
    /// instance, or of INSTANCE only.
    ///
    /// A live instance's files are never removed (its lock is held; naming one is an error),
    /// nor any file that is not a regular file of this user (listed as untrusted).
    Gc {
        /// Only this instance's files [default: every dead instance's, and every orphan file].
        instance: Option<String>,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// What `--json` prints, by subcommand: its help there, in place of the global one.
const JSON_HELP: [(&str, &str); 7] = [
    (
        "list",
        "Print JSON: one `host::ListReport`, every instance with its pid, liveness and files",
    ),
    (
        "stat",
        "Print JSON: one `InstanceReport`, with rates unless `--interval 0`",
    ),
    (
        "top",
        "Print JSON: one `InstanceReport` per line per refresh, no screen and no keys",
    ),
    (
        "dead-letters",
        "Print JSON: the `WorkerReport`s of the workers that dead-lettered frames",
    ),
    (
        "cluster",
        "Print JSON: the `WorkerReport`s of the cluster workers (their `cluster` field)",
    ),
    (
        "leaks",
        "Print JSON: one `host::LeaksReport`, dead instances, orphan files, leak counters",
    ),
    (
        "gc",
        "Print JSON: one `host::GcReport`, the files removed (or that would be), failed, untrusted",
    ),
];

/// The command line: [`Cli`] with each subcommand's own help for `--json` (an argument of the
/// same id in a subcommand takes the place of the global one there; the value still reaches
/// `Cli::json` wherever it is given).
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for (name, help) in JSON_HELP {
        cmd = cmd.mut_subcommand(name, |sc| {
            sc.arg(
                clap::Arg::new("json")
                    .long("json")
                    .action(clap::ArgAction::SetTrue)
                    .help(help),
            )
        });
    }
    cmd
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(0.0..=86400.0).contains(&v) {
        return Err(format!("`{s}`: between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("relayctl: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn code(problems: bool) -> ExitCode {
    if problems {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let mut out = io::stdout().lock();
    match cli.cmd {
        Cmd::List => {
            let l = host::list();
            emit(&mut out, cli.json, &l, || render::list(&l))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stat { instance, interval } => {
            let name = resolve(instance)?;
            let r = sample(&name, interval)?;
            emit(&mut out, cli.json, &r, || render::stat(&r))?;
            Ok(code(!r.problems.is_empty()))
        }
        Cmd::Top {
            instance,
            interval,
            iterations,
            width,
            height,
        } => {
            let name = resolve(instance)?;
            let size = Size {
                width: width.map(usize::from),
                height: height.map(usize::from),
            };
            top(&mut out, &name, interval, iterations, size, cli.json)
        }
        Cmd::DeadLetters { instance } => {
            let name = resolve(instance)?;
            dead_letters(&mut out, &name, cli.json)
        }
        Cmd::Cluster { instance } => {
            let name = resolve(instance)?;
            let r = sample(&name, Duration::ZERO)?;
            let workers: Vec<&report::WorkerReport> =
                r.workers.iter().filter(|w| w.cluster.is_some()).collect();
            emit(&mut out, cli.json, &workers, || render::cluster(&name, &r))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Leaks { instance } => {
            let l = host::leaks(instance.as_deref()).map_err(not_found_hint)?;
            emit(&mut out, cli.json, &l, || render::leaks(&l))?;
            Ok(code(!l.problems.is_empty()))
        }
        Cmd::Gc { instance, dry_run } => {
            let g = match instance {
                Some(name) => {
                    check_name(&name)?;
                    gc_one::gc_one(&name, dry_run)?
                }
                None => host::gc(dry_run),
            };
            emit(&mut out, cli.json, &g, || render::gc(&g))?;
            if !g.failed.is_empty() {
                eprintln!(
                    "relayctl: {} file(s) could not be removed (permissions? run as their owner)",
                    g.failed.len()
                );
                return Ok(ExitCode::from(2));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `relayctl dead-letters`: the workers' dead-letter counts and last dead letters, from one
/// sample of the instance report (JSON: the `WorkerReport`s that have any).
fn dead_letters(out: &mut impl Write, name: &str, json: bool) -> Result<ExitCode> {
    let r = sample(name, Duration::ZERO)?;
    let workers: Vec<&report::WorkerReport> =
        r.workers.iter().filter(|w| w.dead_letters > 0).collect();
    emit(out, json, &workers, || {
        if workers.is_empty() {
            return format!("{name}: no dead-lettered frames\n");
        }
        let mut s = String::from("worker  dead_letters  last_conn  front  position  unix_ms\n");
        for w in &workers {
            let last = w.last_dead_letter.as_ref();
            s += &format!(
                "{:<7} {:<13} {:<10} {:<6} {:<9} {}\n",
                w.index,
                w.dead_letters,
                last.map_or("-", |d| d.conn.as_str()),
                last.map_or(0, |d| d.front),
                last.map_or(0, |d| d.position),
                last.map_or(0, |d| d.unix_ms)
            );
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `value` as one pretty JSON document, or the text `human` makes.
fn emit<T: Serialize>(
    out: &mut impl Write,
    json: bool,
    value: &T,
    human: impl FnOnce() -> String,
) -> Result<()> {
    if json {
        let s = serde_json::to_string_pretty(value).context("serialising the report")?;
        writeln!(out, "{s}")?;
    } else {
        out.write_all(human().as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// The instance to look at: the one named (which must exist), or the only live one.
fn resolve(instance: Option<String>) -> Result<String> {
    let dir = names::shm_dir();
    if let Some(name) = instance {
        check_name(&name)?;
        if !names::stats_path(&name).exists() {
            return Err(no_such_instance(&name));
        }
        return Ok(name);
    }
    let all = host::list().instances;
    let (live, dead): (Vec<_>, Vec<_>) = all.into_iter().partition(|i| i.alive);
    match live.as_slice() {
        [one] => Ok(one.name.clone()),
        [] => {
            let dead_note = if dead.is_empty() {
                String::new()
            } else {
                format!(
                    " (dead: {}; `relayctl stat NAME` shows one, `relayctl gc` removes them)",
                    dead.iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            bail!("no live shmrelay instance in {}{dead_note}", dir.display())
        }
        many => bail!(
            "{} live instances ({}): name one, e.g. `relayctl stat {}`",
            many.len(),
            many.iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            many[0].name
        ),
    }
}

/// Refuses what cannot be an instance name before any path is made of it.
fn check_name(name: &str) -> Result<()> {
    if !names::valid_instance(name) {
        bail!("`{name}` is not a valid instance name (letters, digits, '-' and '_', at most 64)");
    }
    Ok(())
}

/// The error for an instance name with nothing in the shm directory, naming those there are.
fn no_such_instance(name: &str) -> anyhow::Error {
    let known = names::instances();
    anyhow::anyhow!(
        "no instance `{name}` in {}{}",
        names::shm_dir().display(),
        if known.is_empty() {
            String::new()
        } else {
            format!("; instances here: {}", known.join(", "))
        }
    )
}

fn not_found_hint(e: ReportError) -> anyhow::Error {
    match &e {
        ReportError::NotFound { .. } => {
            anyhow::Error::new(e).context("see `relayctl list` for the instances on this host")
        }
        _ => anyhow::Error::new(e),
    }
}

/// A report with rates over `interval` (none if it is zero).
fn sample(name: &str, interval: Duration) -> Result<InstanceReport> {
    let first = InstanceReport::read(name).map_err(not_found_hint)?;
    if interval.is_zero() || !first.alive {
        return Ok(first);
    }
    let t0 = Instant::now();
    std::thread::sleep(interval);
    let mut second = InstanceReport::read(name)
        .with_context(|| format!("instance `{name}` went away while sampling"))?;
    report::fill_rates(&first, &mut second, t0.elapsed());
    Ok(second)
}

/// The layout `top` was asked for; what is not given is the terminal's.
#[derive(Clone, Copy, Debug)]
struct Size {
    width: Option<usize>,
    height: Option<usize>,
}

impl Size {
    /// Columns and rows to lay out to: the ones given, else the terminal's (`screen`: output
    /// goes to a terminal), else unlimited; `None` when nothing limits the layout.
    fn resolve(self, screen: bool) -> Option<(usize, usize)> {
        let term = if screen { term::window_size() } else { None };
        let width = self.width.or(term.map(|t| t.0));
        let height = self.height.or(term.map(|t| t.1));
        if width.is_none() && height.is_none() {
            return None;
        }
        Some((width.unwrap_or(usize::MAX), height.unwrap_or(usize::MAX)))
    }
}

fn top(
    out: &mut impl Write,
    name: &str,
    interval: Duration,
    iterations: Option<u64>,
    size: Size,
    json: bool,
) -> Result<ExitCode> {
    let quit = term::QuitSignals::install().context("installing signal handlers")?;
    let screen = !json && io::stdout().is_terminal();
    // Raw input only when someone can type at a terminal that also shows the screen.
    let raw = if screen && io::stdin().is_terminal() {
        Some(term::RawMode::enable().context("switching the terminal to raw mode")?)
    } else {
        None
    };
    let keys = raw.is_some();
    let _alt = if screen {
        Some(term::AltScreen::enter(out)?)
    } else {
        None
    };
    let interval = interval.max(Duration::from_millis(50));
    let mut prev: Option<(InstanceReport, Instant)> = None;
    let mut frames = 0u64;
    let mut problems;
    loop {
        let now = Instant::now();
        let mut r = match InstanceReport::read(name) {
            Ok(r) => r,
            Err(e) => {
                drop(_alt);
                drop(raw);
                eprintln!("relayctl: instance `{name}` went away: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        if let Some((p, t)) = &prev {
            report::fill_rates(p, &mut r, now.duration_since(*t));
        }
        problems = !r.alive;
        if json {
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        } else if screen {
            // Asked each frame: the window may have been resized.
            let frame = render::top(&r, size.resolve(true));
            let mut buf = String::from("\x1b[H");
            for line in frame.lines() {
                buf.push_str(line);
                // \r: raw mode turns off the terminal's own \n -> \r\n.
                buf.push_str(if keys { "\x1b[K\r\n" } else { "\x1b[K\n" });
            }
            buf.push_str("\x1b[J");
            out.write_all(buf.as_bytes())?;
        } else {
            if frames > 0 {
                writeln!(out)?;
            }
            out.write_all(render::top(&r, size.resolve(false)).as_bytes())?;
        }
        out.flush()?;
        frames += 1;
        prev = Some((r, now));
        if iterations.is_some_and(|n| frames >= n) {
            break;
        }
        if term::wait(&quit, keys, interval)? == term::Wake::Quit {
            break;
        }
    }
    Ok(code(problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn json_help_is_each_subcommands_own() {
        let mut cmd = command();
        cmd.build();
        for sc in cmd.get_subcommands().filter(|sc| sc.get_name() != "help") {
            let name = sc.get_name();
            let json = sc
                .get_arguments()
                .find(|a| a.get_id() == "json")
                .unwrap_or_else(|| panic!("{name} has no --json"));
            let help = json.get_help().expect("help").to_string();
            let own = JSON_HELP.iter().find(|(n, _)| *n == name).map(|(_, h)| *h);
            assert_eq!(Some(help.as_str()), own, "{name}");
            assert_eq!(help.contains("refresh"), name == "top", "{name}: {help}");
        }
    }

    #[test]
    fn json_is_seen_before_and_after_the_subcommand() {
        for args in [
            &["relayctl", "--json", "gc", "x"][..],
            &["relayctl", "gc", "x", "--json"],
            &["relayctl", "top", "--json"],
        ] {
            let m = command().try_get_matches_from(args).unwrap();
            assert!(Cli::from_arg_matches(&m).unwrap().json, "{args:?}");
        }
        let m = command()
            .try_get_matches_from(["relayctl", "stat"])
            .unwrap();
        assert!(!Cli::from_arg_matches(&m).unwrap().json);
    }

    #[test]
    fn exit_status_is_in_the_long_help() {
        let help = command().render_long_help().to_string();
        assert!(help.contains("EXIT STATUS"), "{help}");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_secs("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_secs("0.25s").unwrap(), Duration::from_millis(250));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("x").is_err());
    }
}
