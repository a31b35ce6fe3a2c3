//! The one module of the crate allowed `unsafe`: putting the child's end of the socket pair at
//! a fixed fd number in the child, and taking it back as an owned fd there.
//!
//! std's `Command` can place an fd only at 0, 1 or 2; any other number needs code that runs
//! in the child between `fork` and `exec` (`pre_exec`), which is `unsafe` by nature. Leaving
//! the socket inheritable in the parent instead would be safe code but wrong: every other
//! process the parent spawns meanwhile (from any thread) would inherit it too, and the parent
//! would then miss the child's exit. So the parent's copy stays close-on-exec, and only the
//! forked child clears the flag on its own copy.

#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// Arranges for `fd` to be open at `target` (and inheritable) in the child `cmd` spawns, and
/// for every fd above `target` to be closed on exec, whatever the parent left inheritable.
///
/// `fd` must stay open until `cmd` is spawned, and `cmd` must be spawned once (the caller
/// consumes it).
pub(super) fn inherit_as(cmd: &mut tokio::process::Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It makes only raw syscalls (fcntl, dup2, close_range, getrlimit)
    // through libc, allocates nothing, takes no lock and touches no state shared with the
    // parent; its captures are two integers.
    unsafe {
        cmd.pre_exec(move || {
            place(fd, target)?;
            cloexec_from(target + 1);
            Ok(())
        });
    }
}

/// In the child: makes `fd` available at `target` without close-on-exec.
fn place(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // dup2 onto itself is a no-op that keeps FD_CLOEXEC: clear the flag instead.
        // SAFETY: fcntl on an fd we were given; F_SETFD with 0 only clears FD_CLOEXEC.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
            return Err(io::Error::last_os_error());
        }
    } else {
        // SAFETY: dup2 only (re)places fd number `target` in this, the child's, fd table; the
        // copy it makes has FD_CLOEXEC clear.
        if unsafe { libc::dup2(fd, target) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// In the child: marks every fd from `first` up close-on-exec, so nothing the parent left
/// inheritable (by accident, or from its own parent) reaches the program.
fn cloexec_from(first: RawFd) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC sets a flag on fds of this
        // (child) process; it closes nothing now. Linux 5.11+; older kernels return ENOSYS
        // or EINVAL and we fall through to the loop.
        let done = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        } == 0;
        if done {
            return;
        }
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(1 << 20) as RawFd
    } else {
        4096
    };
    for fd in first..max {
        // SAFETY: F_GETFD/F_SETFD on a number that may not be open: EBADF then, no effect.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// In the child process: takes the inherited fd `fd` as an owned, close-on-exec socket.
///
/// The caller guarantees this runs at most once per process for `fd` (the module above keeps
/// an atomic flag), so no other `OwnedFd` for it exists.
pub(super) fn take(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the borrow lives only for this statement; `try_clone_to_owned` is an fcntl
    // F_DUPFD_CLOEXEC that fails with EBADF if `fd` is not open, so a wrong number in the
    // environment gives an error, not a dangling handle.
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // Close the inherited number (it is not close-on-exec, so it would reach our own
    // children); we keep the close-on-exec duplicate.
    // SAFETY: `fd` is open (the dup succeeded) and, by the caller's guarantee, nothing else in
    // this process owns it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    debug_assert_ne!(dup.as_raw_fd(), fd);
    Ok(dup)
}
