//! What the fileshare benches share: `share` child processes and what /proc says of them.

use std::{
    process::{Child, Command},
    time::Duration,
};

/// A child process killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `share` binary of this build (or the one `SHARE_BENCH_BIN` names, to compare two
/// builds with one bench binary), with no token from the environment, no colour and warnings
/// only in its log.
pub(crate) fn share() -> Command {
    let bin =
        std::env::var_os("SHARE_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_share").into());
    let mut cmd = Command::new(bin);
    cmd.env_remove("SHARE_TOKEN")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn");
    cmd
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`); 0 once the process is gone.
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of process `pid` so far (/proc/PID/stat, in ticks of 1/100 s).
#[allow(dead_code)] // not every bench reads it
pub(crate) fn cpu_time(pid: u32) -> Duration {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}
