//! No file descriptor outlives its use: whatever happens to a channel or session carrying
//! them, the process's open descriptors (`/proc/self/fd`) return to what they were.
//!
//! One test in a binary of its own, scenarios one after another, so nothing else in the
//! process opens or closes descriptors while it counts.
#![cfg(target_os = "linux")]

use netchan_mux::{CloseReason, Config, Mode, Session};
use netchan_testkit::{
    fds::{back_to, open_fds, unlinked_file},
    within,
};
use std::{mem::MaybeUninit, os::fd::AsFd, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

fn pair() -> (Session, Session, netchan_mux::Listener) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let builder = Session::builder_with_fds(b, Mode::Server, Config::default());
    let listener = builder.listen("fds").expect("listen");
    let server = builder.start();
    (
        Session::with_fds(a, Mode::Client, Config::default()),
        server,
        listener,
    )
}

#[tokio::test(flavor = "current_thread")]
async fn no_descriptor_outlives_its_channel_or_session() {
    within(60, "fd leak scenarios", async {
        // Warm up whatever the runtime opens once.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let file = unlinked_file("x");
        let baseline = open_fds();

        // 1. Sent, arrived, never taken: closed with the receiving channel.
        {
            let (client, server, mut l) = pair();
            let (a, b) = tokio::join!(client.dial("fds"), l.accept());
            let (mut a, mut b) = (a.unwrap(), b.unwrap());
            for _ in 0..10 {
                a.send_fds(&[file.as_fd(), file.as_fd()]).unwrap();
                a.write_all(b"y").await.unwrap();
            }
            let mut buf = [0u8; 10];
            b.read_exact(&mut buf).await.unwrap();
            assert!(open_fds() >= baseline + 20, "the peer's copies are open");
            drop((a, b, l));
            client.close().await;
            server.close().await;
        }
        back_to(baseline, "untaken fds on a dropped channel").await;

        // 2. Arrived but not yet read up to when the sessions are torn down.
        {
            let (client, server, mut l) = pair();
            let (a, b) = tokio::join!(client.dial("fds"), l.accept());
            let (mut a, b) = (a.unwrap(), b.unwrap());
            a.write_all(&[0u8; 1000]).await.unwrap();
            a.send_fds(&[file.as_fd(); 5]).unwrap();
            a.write_all(b"after").await.unwrap();
            drop(client);
            drop(server);
            drop((a, b, l));
        }
        back_to(baseline, "fds queued in a channel at session end").await;

        // 3. Queued to send when the session ends: our own duplicates are closed.
        {
            let (client, server, mut l) = pair();
            let (a, b) = tokio::join!(client.dial("fds"), l.accept());
            let (mut a, b) = (a.unwrap(), b.unwrap());
            for _ in 0..50 {
                a.send_fds(&[file.as_fd()]).unwrap();
            }
            drop(server);
            drop((b, l));
            drop(a);
            drop(client);
        }
        back_to(baseline, "fds queued for sending at session end").await;

        // 4. A hostile peer: fds sent as ancillary data with no frame to claim them. The
        //    session ends (they exceed what it holds unclaimed) and closes them all.
        {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let session =
                Session::with_fds(ours, Mode::Server, Config::default().max_received_fds(16));
            let raw = theirs.into_std().unwrap();
            raw.set_nonblocking(false).unwrap();
            let fds = vec![file.as_fd(); 10];
            for _ in 0..3 {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(10))];
                let mut cmsg = rustix::net::SendAncillaryBuffer::new(&mut space);
                assert!(cmsg.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
                // A ping header (harmless bytes) to carry them.
                let ping = [0u8, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9];
                rustix::net::sendmsg(
                    &raw,
                    &[std::io::IoSlice::new(&ping)],
                    &mut cmsg,
                    rustix::net::SendFlags::empty(),
                )
                .unwrap();
            }
            let reason = session.closed().await;
            assert!(
                matches!(reason, CloseReason::ProtocolViolation(_)),
                "{reason:?}"
            );
            drop(raw);
            drop(session);
        }
        back_to(baseline, "unframed fds from a hostile peer").await;
    })
    .await;
}
