//! A control message the kernel truncates (`MSG_CTRUNC`: the receiver cannot install the
//! descriptors) ends that session with `CloseReason::FdsTruncated`. A binary of its own: it
//! lowers the process's descriptor limit while it runs.
#![cfg(target_os = "linux")]

use netchan_mux::{CloseReason, Config, Mode, Session};
use netchan_testkit::within;
use rustix::{
    net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags},
    process::{getrlimit, setrlimit, Resource, Rlimit},
};
use std::{io::IoSlice, mem::MaybeUninit, os::fd::AsFd};
use tokio::net::UnixStream;

/// The lowest descriptor number not in use: the next one the kernel hands out.
fn lowest_free_fd() -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap_or(0)
}

#[tokio::test(flavor = "current_thread")]
async fn descriptors_the_kernel_cannot_install_end_the_session_with_a_typed_reason() {
    within(20, "truncated control message", async {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let receiver = Session::with_fds(ours, Mode::Server, Config::default());
        let raw = theirs.into_std().unwrap();
        raw.set_nonblocking(false).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let batch = vec![file.as_fd(); 200];

        // An Fds frame for stream 1 announcing them (the session takes such frames: it
        // announced fd passing itself), sent before the receiver's driver (on this thread)
        // can run.
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(200))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        assert!(cmsg.push(SendAncillaryMessage::ScmRights(&batch)));
        let frame = [0u8, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 200];
        rustix::net::sendmsg(&raw, &[IoSlice::new(&frame)], &mut cmsg, SendFlags::empty()).unwrap();
        // Then room for at most two more descriptors in this process (new ones take the
        // lowest free numbers, all below the limit): receiving needs 200.
        let saved = getrlimit(Resource::Nofile);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(lowest_free_fd() + 2),
                maximum: saved.maximum,
            },
        )
        .unwrap();
        let reason = receiver.closed().await;
        setrlimit(Resource::Nofile, saved).unwrap();
        assert!(matches!(reason, CloseReason::FdsTruncated), "{reason:?}");
        assert!(reason.to_string().contains("truncated"), "{reason}");
    })
    .await;
}
