//! Making a running front spin without a test hook: through ptrace, its main thread is sent to
//! a `jmp .` written over the instruction it was about to run. The process then burns CPU,
//! runnable and running, and its loop never stamps activity again: what a front stuck in an
//! endless loop looks like to the supervisor. x86_64 only (the instruction bytes).

use std::io;

/// `jmp .` (jump to itself): EB FE.
const JMP_SELF: u64 = 0xFEEB;

fn check(r: libc::c_long, what: &str) -> io::Result<libc::c_long> {
    if r == -1 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

/// Sends `pid`'s main thread into an endless loop at its current instruction. The process is
/// unusable afterwards (only SIGKILL ends it).
pub fn make_spin(pid: u32) -> io::Result<()> {
    let pid = pid as libc::pid_t;
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: PTRACE_ATTACH takes no pointers; it stops the tracee with SIGSTOP.
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, null, null) };
    check(r, "PTRACE_ATTACH")?;
    let result = rewrite(pid);
    // SAFETY: PTRACE_DETACH with signal 0 resumes the tracee and drops the attach's SIGSTOP.
    let detached = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null, null) };
    result?;
    check(detached, "PTRACE_DETACH").map(drop)
}

/// With the tracee stopped: writes `jmp .` at its instruction pointer and makes sure an
/// interrupted system call is not restarted (which would move it back to the `syscall`).
fn rewrite(pid: libc::pid_t) -> io::Result<()> {
    let null = std::ptr::null_mut::<libc::c_void>();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int into a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid && libc::WIFSTOPPED(status) {
            break;
        }
        if r == -1 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        if r == pid {
            return Err(io::Error::other("the front exited while being attached"));
        }
    }
    // SAFETY: user_regs_struct is plain integers; all zeros is a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GETREGS writes one user_regs_struct into `regs`, which lives across it.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            pid,
            null,
            &mut regs as *mut libc::user_regs_struct,
        )
    };
    check(r, "PTRACE_GETREGS")?;
    let at = regs.rip as *mut libc::c_void;
    // PEEKTEXT returns the word itself, so -1 is only an error if errno says so.
    // SAFETY: __errno_location is this thread's errno; PEEKTEXT reads the tracee, not us.
    let word = unsafe {
        *libc::__errno_location() = 0;
        let w = libc::ptrace(libc::PTRACE_PEEKTEXT, pid, at, null);
        if w == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        w as u64
    };
    let patched = (word & !0xFFFF) | JMP_SELF;
    // SAFETY: POKETEXT writes one word into the tracee's (private, copied-on-write) text.
    let r = unsafe { libc::ptrace(libc::PTRACE_POKETEXT, pid, at, patched as *mut libc::c_void) };
    check(r, "PTRACE_POKETEXT")?;
    // Not inside a system call any more: no restart, so it resumes at `at`.
    regs.orig_rax = u64::MAX;
    // SAFETY: PTRACE_SETREGS reads one user_regs_struct from `regs`.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGS,
            pid,
            null,
            &regs as *const libc::user_regs_struct,
        )
    };
    check(r, "PTRACE_SETREGS")?;
    Ok(())
}
