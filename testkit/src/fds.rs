//! File-descriptor helpers for the fd-passing tests: files only a descriptor reaches, and
//! counting the process's open descriptors.

use std::{
    fs::File,
    io::{Read, Seek, Write},
    os::fd::OwnedFd,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// An open file holding `text`, already unlinked: only its descriptor reaches it.
pub fn unlinked_file(text: &str) -> File {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "netchan-testkit-fd-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create temp file");
    std::fs::remove_file(&path).expect("unlink temp file");
    file.write_all(text.as_bytes()).expect("write temp file");
    file
}

/// Everything in the file behind `fd`, from its start.
pub fn contents(fd: OwnedFd) -> String {
    let mut file = File::from(fd);
    file.rewind().expect("rewind");
    let mut text = String::new();
    file.read_to_string(&mut text).expect("read");
    text
}

/// How many descriptors this process has open (`/proc/self/fd`, Linux).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Waits, at most 5 s, until the process holds `baseline` descriptors again; panics naming
/// `scenario` otherwise. Descriptors close as tasks wind down, not at a moment a test can
/// await, so this polls.
pub async fn back_to(baseline: usize, scenario: &str) {
    for _ in 0..500 {
        if open_fds() == baseline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{scenario}: {} descriptors open, {baseline} before",
        open_fds()
    );
}

/// The descriptors open in this process, sorted, each with what it points at (`readlink
/// /proc/self/fd/N`, Linux). The descriptor that reads the directory is closed again by the
/// time its link is read, so it is not listed.
pub fn open_fd_list() -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let names: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut fds: Vec<(i32, String)> = names
        .into_iter()
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect();
    fds.sort_unstable();
    fds
}
