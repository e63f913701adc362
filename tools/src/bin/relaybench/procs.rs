//! Child processes of relaybench (the `--procs` of `load` and `hold`, the consumer of `ring`):
//! the parent re-executes this binary as `relaybench SUB --child-plan PLAN` once per process,
//! and parent and children talk in lines of JSON ([`ChildMsg`]) on the children's stdin and
//! stdout:
//!
//! 1. each child connects its share and writes `ready` with its connect counters;
//! 2. once every child is ready, the parent writes `go` to all of them;
//! 3. each child runs, writes its `report` and exits (or writes `failed` at any point).

use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Lines a child process writes on stdout (one JSON object each). `C` are the subcommand's
/// counters, `R` its report (a struct: its fields stand next to `"msg": "report"`).
#[derive(Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum ChildMsg<C, R> {
    Ready { counters: C },
    Report(R),
    Failed { error: String },
}

/// Child side: parses the plan, then `run(plan, gate)` does the work and returns the report.
/// `gate` is to be called once connected, with the connect counters: it reports `ready` to
/// the parent and returns once the parent says `go`.
pub(crate) fn run_child<P, C, R, F>(plan_json: &str, run: F) -> Result<()>
where
    P: DeserializeOwned,
    C: Serialize + Clone,
    R: Serialize,
    F: FnOnce(P, &dyn Fn(&C) -> Result<()>) -> Result<R>,
{
    let plan: P = serde_json::from_str(plan_json).context("bad --child-plan")?;
    // Do not outlive a parent that was killed: its connections would stay open on the server
    // (and keep loading it).
    // SAFETY: PR_SET_PDEATHSIG takes a signal number by value and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let send = |m: &ChildMsg<C, R>| -> Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(m)?)?;
        out.flush()?;
        Ok(())
    };
    let gate = |c: &C| -> Result<()> {
        send(&ChildMsg::Ready {
            counters: c.clone(),
        })?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != "go" {
            bail!("the parent relaybench went away before the start");
        }
        Ok(())
    };
    match run(plan, &gate) {
        Ok(r) => send(&ChildMsg::Report(r)),
        Err(e) => {
            let _ = send(&ChildMsg::Failed {
                error: format!("{e:#}"),
            });
            Err(e)
        }
    }
}

/// Parent side: the child processes of a `--procs` run, killed if the parent gives up early.
pub(crate) struct Children<C, R> {
    /// The subcommand, for the child's command line and for messages.
    sub: &'static str,
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    /// Lines of all children: `(i, Some(line))`, then `(i, None)` when child `i` closes its
    /// stdout.
    rx: mpsc::Receiver<(usize, Option<String>)>,
    msg: PhantomData<fn() -> (C, R)>,
}

impl<C: DeserializeOwned, R: DeserializeOwned> Children<C, R> {
    /// Starts `relaybench SUB --child-plan PLAN` for each plan, child `i` with the `i`-th.
    pub(crate) fn spawn<P: Serialize>(
        sub: &'static str,
        plans: impl IntoIterator<Item = P>,
    ) -> Result<Self> {
        let exe =
            std::env::current_exe().context("cannot find the relaybench executable to re-run")?;
        let (tx, rx) = mpsc::channel();
        let mut kids = Children {
            sub,
            children: Vec::new(),
            stdins: Vec::new(),
            rx,
            msg: PhantomData,
        };
        for (i, plan) in plans.into_iter().enumerate() {
            kids.spawn_one(&exe, &serde_json::to_string(&plan)?, i, &tx)?;
        }
        Ok(kids)
    }

    /// Starts child `i` and forwards each line it prints to `tx` as `(i, Some(line))`, then
    /// `(i, None)` when it closes its output.
    fn spawn_one(
        &mut self,
        exe: &std::path::Path,
        plan_json: &str,
        i: usize,
        tx: &mpsc::Sender<(usize, Option<String>)>,
    ) -> Result<()> {
        let sub = self.sub;
        let mut child = Command::new(exe)
            .arg(sub)
            .arg("--child-plan")
            .arg(plan_json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {sub} process {i}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        self.stdins.push(child.stdin.take().expect("piped stdin"));
        self.children.push(child);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send((i, Some(l))).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send((i, None));
        });
        Ok(())
    }

    /// Next message of any child; `None` when that child closed its stdout (exited). A
    /// `failed` message is an error.
    fn recv(&self, deadline: Instant, what: &str) -> Result<(usize, Option<ChildMsg<C, R>>)> {
        let sub = self.sub;
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, line) = self
            .rx
            .recv_timeout(left)
            .map_err(|_| anyhow!("{sub} processes did not {what} in time"))?;
        let Some(line) = line else {
            return Ok((i, None));
        };
        let msg: ChildMsg<C, R> = serde_json::from_str(&line)
            .with_context(|| format!("{sub} process {i} wrote an unexpected line: {line:?}"))?;
        if let ChildMsg::Failed { error } = msg {
            bail!("{sub} process {i} failed: {error}");
        }
        Ok((i, Some(msg)))
    }

    /// Waits until every child is connected; returns their connect counters in the order
    /// they came.
    pub(crate) fn wait_ready(&self, deadline: Instant) -> Result<Vec<C>> {
        let sub = self.sub;
        let mut ready = vec![false; self.children.len()];
        let mut counters = Vec::new();
        while ready.iter().any(|r| !r) {
            match self.recv(deadline, "connect")? {
                (i, Some(ChildMsg::Ready { counters: c })) => {
                    counters.push(c);
                    ready[i] = true;
                }
                (i, None) => bail!("{sub} process {i} exited before it was ready"),
                (i, Some(_)) => bail!("{sub} process {i} reported out of order"),
            }
        }
        Ok(counters)
    }

    /// An error if a child has exited (none should before it has reported).
    pub(crate) fn check_running(&mut self) -> Result<()> {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                bail!("{} process {i} exited early ({status})", self.sub);
            }
        }
        Ok(())
    }

    /// Tells every child to start.
    pub(crate) fn go(&mut self) -> Result<()> {
        for (i, s) in self.stdins.iter_mut().enumerate() {
            writeln!(s, "go")
                .and_then(|_| s.flush())
                .with_context(|| format!("cannot start {} process {i}", self.sub))?;
        }
        Ok(())
    }

    /// Hands every child's report to `merge` as it comes in.
    pub(crate) fn collect_reports(
        &self,
        deadline: Instant,
        mut merge: impl FnMut(R) -> Result<()>,
    ) -> Result<()> {
        let sub = self.sub;
        let mut reported = vec![false; self.children.len()];
        while reported.iter().any(|r| !r) {
            match self.recv(deadline, "report")? {
                (i, Some(ChildMsg::Report(r))) => {
                    merge(r)?;
                    reported[i] = true;
                }
                (i, None) if reported[i] => {} // exited after its report, as it should
                (i, None) => bail!("{sub} process {i} exited before it could report"),
                (i, Some(_)) => bail!("{sub} process {i} reported out of order"),
            }
        }
        Ok(())
    }

    /// Closes the children's stdin and waits for them to exit; an unsuccessful exit is an
    /// error.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.stdins.clear();
        for (i, c) in self.children.iter_mut().enumerate() {
            let status = c.wait()?;
            if !status.success() {
                bail!("{} process {i} exited with {status}", self.sub);
            }
        }
        Ok(())
    }
}

impl<C, R> Drop for Children<C, R> {
    fn drop(&mut self) {
        self.stdins.clear();
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Report {
        counters: u64,
        cpu_seconds: f64,
    }

    #[test]
    fn child_lines_are_flat_json_objects_tagged_by_msg() {
        let lines = [
            (
                ChildMsg::Ready { counters: 3 },
                r#"{"msg":"ready","counters":3}"#,
            ),
            (
                ChildMsg::Report(Report {
                    counters: 5,
                    cpu_seconds: 0.5,
                }),
                r#"{"msg":"report","counters":5,"cpu_seconds":0.5}"#,
            ),
            (
                ChildMsg::Failed { error: "x".into() },
                r#"{"msg":"failed","error":"x"}"#,
            ),
        ];
        for (msg, line) in lines {
            assert_eq!(serde_json::to_string(&msg).unwrap(), line);
            let back: ChildMsg<u64, Report> = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), line);
        }
    }
}
