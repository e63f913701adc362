//! Operating-system pieces of `relaybench ring`: child processes that die with the parent and
//! get their file descriptors at fixed numbers, the control pipe, CPU pinning, a shared page in
//! a memfd and raw futex calls.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::ChildSpec;

/// First fd number a child finds its inherited descriptors at: 3 is the control pipe (child ->
/// parent), 4, 5, ... are the transport's descriptors in the order the parent passed them.
const FIRST_FD: RawFd = 3;
/// Most descriptors a child inherits (control pipe included).
const MAX_FDS: usize = 8;

/// The environment variable through which a unit test hands a child its spec (the test binary
/// is re-executed with a filter that runs only `ring::tests::child_entry`).
#[cfg(test)]
pub const CHILD_ENV: &str = "RELAYBENCH_RING_CHILD";

/// What a child tells its parent over the control pipe, one JSON object per line.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum Msg {
    /// Attached to its transport; the parent may start the clock.
    Ready,
    /// The child's side of the case is done.
    Report(Report),
}

/// What the receiving or echoing side counted.
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
pub struct Report {
    /// Data frames received (all of them, warm-up included).
    pub frames: u64,
    /// Wrapping sum of the 8-byte words of every payload received (see `ring_data::sum_words`).
    pub sum: u64,
    /// Data frames between the MARK and END frames.
    pub measured_frames: u64,
    /// Nanoseconds between receiving MARK and END.
    pub measured_ns: u64,
    /// Times this side went to sleep in the kernel (park mode).
    pub parks: u64,
}

/// A benchmark child process: killed if dropped while still running, and (through
/// `PR_SET_PDEATHSIG`) killed by the kernel if this process dies first.
pub struct ChildProc {
    child: Child,
    ctl: File,
    buf: Vec<u8>,
}

/// The command that runs a child: this binary again, with hidden arguments.
#[cfg(not(test))]
fn child_command(spec_json: &str) -> Result<Command> {
    let exe = std::env::current_exe().context("locating the relaybench binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["ring", "--child", spec_json]);
    Ok(cmd)
}

/// Under `cargo test` the current executable is the test harness: run only the test that turns
/// into a child when it finds the spec in the environment.
#[cfg(test)]
fn child_command(spec_json: &str) -> Result<Command> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "ring::tests::child_entry",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd.env(CHILD_ENV, spec_json);
    Ok(cmd)
}

impl ChildProc {
    /// Starts a child for `spec`, handing it `fds` as 4, 5, ... (3 is the control pipe).
    pub fn spawn(spec: &ChildSpec, fds: &[RawFd]) -> Result<ChildProc> {
        if fds.len() + 1 > MAX_FDS {
            bail!("too many descriptors for a child: {}", fds.len());
        }
        let (ctl_r, ctl_w) = pipe()?;
        let mut inherit = [0 as RawFd; MAX_FDS];
        inherit[0] = ctl_w.as_raw_fd();
        inherit[1..=fds.len()].copy_from_slice(fds);
        let n = fds.len() + 1;
        let parent = std::process::id() as libc::pid_t;
        let json = serde_json::to_string(spec)?;
        let mut cmd = child_command(&json)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
        // (fcntl, dup2, close, prctl, getppid) on a copied array, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Move the sources above the targets first, so that placing one descriptor at
                // its number never closes another source that happens to have that number.
                let mut tmp = [0 as RawFd; MAX_FDS];
                for i in 0..n {
                    let t = libc::fcntl(inherit[i], libc::F_DUPFD_CLOEXEC, FIRST_FD + n as RawFd);
                    if t < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    tmp[i] = t;
                }
                for (i, &t) in tmp.iter().enumerate().take(n) {
                    // dup2 leaves FD_CLOEXEC clear on the new number: it survives exec.
                    if libc::dup2(t, FIRST_FD + i as RawFd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(t);
                }
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting a benchmark child process")?;
        drop(ctl_w);
        Ok(ChildProc {
            child,
            ctl: File::from(ctl_r),
            buf: Vec::new(),
        })
    }

    /// The next control message, waiting at most `timeout`; an error if the child exits first.
    pub fn recv(&mut self, timeout: Duration) -> Result<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line[..i]).with_context(|| {
                    format!("bad control line {:?}", String::from_utf8_lossy(&line))
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("benchmark child sent nothing for {timeout:?}");
            }
            let mut pfd = libc::pollfd {
                fd: self.ctl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 100) as libc::c_int;
            // SAFETY: one valid pollfd, count 1.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            match self.ctl.read(&mut chunk) {
                Ok(0) => {
                    let status = self.wait(Duration::from_secs(5))?;
                    bail!("benchmark child exited early ({status})");
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the control pipe"),
            }
        }
    }

    /// Waits for the `Ready` message.
    pub fn expect_ready(&mut self) -> Result<()> {
        match self.recv(Duration::from_secs(10))? {
            Msg::Ready => Ok(()),
            other => bail!("expected ready from the child, got {other:?}"),
        }
    }

    /// Waits for the `Report` message.
    pub fn expect_report(&mut self, timeout: Duration) -> Result<Report> {
        match self.recv(timeout)? {
            Msg::Report(r) => Ok(r),
            other => bail!("expected a report from the child, got {other:?}"),
        }
    }

    /// Errors if the child has exited (it never should before sending its report).
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("benchmark child exited early ({status})"),
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("benchmark child did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for a clean exit.
    pub fn finish(mut self) -> Result<()> {
        let status = self.wait(Duration::from_secs(10))?;
        if !status.success() {
            bail!("benchmark child failed ({status})");
        }
        Ok(())
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child's end of the control pipe.
pub struct Ctl(File);

impl Ctl {
    /// Sends one message.
    pub fn send(&mut self, msg: &Msg) -> Result<()> {
        let mut line = serde_json::to_vec(msg)?;
        line.push(b'\n');
        self.0.write_all(&line).context("writing the control pipe")
    }
}

/// In a child: takes the descriptors the parent placed at 3, 4, ...: the control pipe and
/// `n` transport descriptors.
pub fn take_child_fds(n: usize) -> (Ctl, Vec<OwnedFd>) {
    let take = |fd: RawFd| {
        // SAFETY: `ChildProc::spawn` put an open descriptor at this number for this process,
        // and each number is taken once, here.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let ctl = Ctl(File::from(take(FIRST_FD)));
    let fds = (0..n).map(|i| take(FIRST_FD + 1 + i as RawFd)).collect();
    (ctl, fds)
}

/// A pipe with both ends close-on-exec.
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into a live two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets a pipe's buffer size (best effort: the kernel caps it at /proc/sys/fs/pipe-max-size).
pub fn set_pipe_size(fd: &OwnedFd, bytes: usize) {
    // SAFETY: fcntl on a descriptor we own; no memory arguments.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as libc::c_int) };
}

/// Sets a socket's send and receive buffer sizes (best effort).
pub fn set_socket_buffers(fd: RawFd, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads one c_int from a live local.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the set; the index is below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of a live set; `cpu` comes from `allowed_cpus`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads one live cpu_set_t; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// One page of shared memory in a memfd (nothing under /dev/shm: it disappears with the last
/// descriptor and mapping), for the raw futex ping-pong.
pub struct SharedPage {
    ptr: *mut libc::c_void,
    fd: OwnedFd,
}

const PAGE: usize = 4096;

impl SharedPage {
    /// A new zeroed page.
    pub fn create() -> Result<SharedPage> {
        // SAFETY: memfd_create reads a NUL-terminated name from a static C string.
        let fd = unsafe { libc::memfd_create(c"relaybench-futex".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), PAGE as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error()).context("ftruncate");
        }
        SharedPage::map(fd)
    }

    /// Maps a page created by another process.
    pub fn map(fd: OwnedFd) -> Result<SharedPage> {
        // SAFETY: a new shared mapping of a file of at least PAGE bytes (created above, or by
        // the parent, which never shrinks it); the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mmap");
        }
        Ok(SharedPage { ptr, fd })
    }

    /// The memfd, to hand to a child.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The 32-bit word at cache line `line` (0..32; 128-byte lines).
    pub fn word(&self, line: usize) -> &AtomicU32 {
        assert!(line < PAGE / 128);
        // SAFETY: the offset is inside the mapping and 4-aligned; the mapping lives as long as
        // `self`; AtomicU32 may alias memory another process writes (every bit pattern is valid).
        unsafe { &*(self.ptr.cast::<u8>().add(line * 128).cast::<AtomicU32>()) }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives self.
        unsafe { libc::munmap(self.ptr, PAGE) };
    }
}

/// Sleeps while `*word == expected`, at most `timeout` (shared futex: the word is in memory two
/// processes map, so no FUTEX_PRIVATE_FLAG). Returns on wake, timeout, signal or a changed word.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32 for the call; the timespec is a live local.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes one sleeper on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address of a live aligned u32 as a key.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
}

/// A point in time after which a case is declared hung.
#[derive(Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Errors once the deadline has passed.
    pub fn check(&self, what: &str) -> Result<()> {
        if Instant::now() >= self.0 {
            return Err(anyhow!("timed out {what}"));
        }
        Ok(())
    }
}
