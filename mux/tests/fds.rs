//! File descriptors with a channel's bytes, on unix-socket sessions made with
//! `Session::with_fds`: delivery in order and to the right channel, the refusals (links that
//! cannot carry them, a peer without the extension, too many at once), and the session's
//! bound on descriptors nobody takes. (Leak counts are in `fd_leaks.rs`, a binary of its own
//! so that no other test opens descriptors meanwhile.)
#![cfg(unix)]

use netchan_mux::{CloseReason, Config, Conn, Error, Mode, Session, Violation};
use netchan_testkit::{
    fds::{contents, unlinked_file},
    within,
};
use std::{
    io::{Read, Write},
    os::fd::AsFd,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

/// Both ends of a unix-socket session that passes fds; `b` listens on `names` first.
fn fd_pair(names: &[&str], config: Config) -> (Session, Session, Vec<netchan_mux::Listener>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let builder = Session::builder_with_fds(b, Mode::Server, config.clone());
    let listeners = names
        .iter()
        .map(|n| builder.listen(n).expect("listen"))
        .collect();
    let server = builder.start();
    (
        Session::with_fds(a, Mode::Client, config),
        server,
        listeners,
    )
}

async fn connect(
    client: &Session,
    listener: &mut netchan_mux::Listener,
    name: &str,
) -> (Conn, Conn) {
    let (dialed, accepted) = tokio::join!(client.dial(name), listener.accept());
    (dialed.expect("dial"), accepted.expect("accept"))
}

#[tokio::test]
async fn an_unlinked_file_reaches_the_peer_with_its_bytes_both_ways() {
    within(20, "fds both ways", async {
        let (client, _server, mut ls) = fd_pair(&["files"], Config::default());
        let (mut a, mut b) = connect(&client, &mut ls[0], "files").await;
        assert!(a.can_send_fds() && b.can_send_fds());

        let file = unlinked_file("from a");
        a.send_fds(&[file.as_fd()]).unwrap();
        drop(file); // the receiver's copy keeps it open
        a.write_all(b"take it").await.unwrap();
        let mut buf = [0u8; 7];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"take it");
        let mut fds = b.take_fds();
        assert_eq!(fds.len(), 1);
        assert_eq!(contents(fds.remove(0)), "from a");
        assert!(b.take_fds().is_empty(), "taken once");

        // And back, two at once, the second a socket.
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = unlinked_file("from b");
        b.send_fds(&[file.as_fd(), theirs.as_fd()]).unwrap();
        b.write_all(b"!").await.unwrap();
        let mut one = [0u8; 1];
        a.read_exact(&mut one).await.unwrap();
        let mut fds = a.take_fds();
        assert_eq!(fds.len(), 2);
        let sock = std::os::unix::net::UnixStream::from(fds.remove(1));
        assert_eq!(contents(fds.remove(0)), "from b");
        (&sock).write_all(b"via the passed socket").unwrap();
        drop(sock);
        drop(theirs);
        let mut got = String::new();
        (&mine).read_to_string(&mut got).unwrap();
        assert_eq!(got, "via the passed socket");
    })
    .await;
}

#[tokio::test]
async fn a_read_stops_where_descriptors_arrived_so_each_batch_is_placed_exactly() {
    within(20, "placement", async {
        let (client, _server, mut ls) = fd_pair(&["order"], Config::default());
        let (mut a, mut b) = connect(&client, &mut ls[0], "order").await;
        let (f1, f2) = (unlinked_file("one"), unlinked_file("two"));
        a.write_all(b"aa").await.unwrap();
        a.send_fds(&[f1.as_fd()]).unwrap();
        a.write_all(b"bbb").await.unwrap();
        a.send_fds(&[f2.as_fd()]).unwrap();
        a.write_all(b"c").await.unwrap();
        a.shutdown().await.unwrap();

        let mut buf = [0u8; 64];
        // Nothing is takeable before the bytes ahead of it are read.
        let n = b.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"aa", "a read never crosses a batch");
        let fds = b.take_fds();
        assert_eq!(fds.len(), 1);
        assert_eq!(contents(fds.into_iter().next().unwrap()), "one");
        let n = b.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"bbb");
        let fds = b.take_fds();
        assert_eq!(contents(fds.into_iter().next().unwrap()), "two");
        let n = b.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"c");
        assert!(b.take_fds().is_empty());
        assert_eq!(b.read(&mut buf).await.unwrap(), 0, "then the end");
    })
    .await;
}

#[tokio::test]
async fn many_batches_on_many_channels_each_arrive_with_their_own_bytes() {
    within(60, "many channels", async {
        const CHANNELS: usize = 6;
        const BATCHES: usize = 40;
        let (client, _server, mut ls) = fd_pair(&["many"], Config::default());
        let mut pairs = Vec::new();
        for _ in 0..CHANNELS {
            pairs.push(connect(&client, &mut ls[0], "many").await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (ch, (mut a, mut b)) in pairs.into_iter().enumerate() {
            tasks.spawn(async move {
                let writer = async move {
                    for i in 0..BATCHES {
                        let tag = format!("{ch:02}-{i:03}");
                        let f = unlinked_file(&tag);
                        a.send_fds(&[f.as_fd()]).unwrap();
                        // A line per batch, with bulk between them so frames interleave.
                        a.write_all(format!("{tag}\n").as_bytes()).await.unwrap();
                        a.write_all(&vec![b'.'; 3000 * (i % 5)]).await.unwrap();
                        a.write_all(b"\n").await.unwrap();
                    }
                    a.shutdown().await.unwrap();
                    a
                };
                let reader = async move {
                    let mut seen = 0;
                    let mut text = Vec::new();
                    let mut buf = vec![0u8; 8192];
                    loop {
                        let lines = |t: &[u8]| t.iter().filter(|&&c| c == b'\n').count();
                        let n = b.read(&mut buf).await.unwrap();
                        let before = lines(&text);
                        text.extend_from_slice(&buf[..n]);
                        let after = lines(&text);
                        // A read never crosses a batch, so one taken now sat at its start
                        // (it arrived while the read waited) or at its end.
                        for fd in b.take_fds() {
                            let tag = format!("{ch:02}-{seen:03}");
                            assert_eq!(contents(fd), tag, "channel {ch}: batch {seen}");
                            assert!(
                                before == 2 * seen || after == 2 * seen,
                                "channel {ch}: batch {seen} placed right before its tag line \
                                 ({before}..{after} lines read)"
                            );
                            seen += 1;
                        }
                        if n == 0 {
                            break;
                        }
                    }
                    assert_eq!(seen, BATCHES, "channel {ch}: every batch arrived");
                    b
                };
                tokio::join!(writer, reader)
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("channel task");
        }
    })
    .await;
}

#[tokio::test]
async fn links_that_cannot_carry_descriptors_refuse_them_at_once() {
    within(20, "refusals", async {
        let file = unlinked_file("x");
        // A duplex: the link itself cannot.
        let (x, y) = tokio::io::duplex(1 << 16);
        let builder = Session::builder(y, Mode::Server, Config::default());
        let mut l = builder.listen("c").unwrap();
        let _server = builder.start();
        let client = Session::client(x, Config::default());
        let (mut a, _b) = connect(&client, &mut l, "c").await;
        assert!(!a.can_send_fds());
        match a.send_fds(&[file.as_fd()]) {
            Err(e @ Error::FdsUnsupported { .. }) => {
                assert!(e.to_string().contains("link does not carry"), "{e}")
            }
            other => panic!("expected FdsUnsupported, got {other:?}"),
        }

        // A unix socket whose peer runs a plain session: the peer never announced.
        let (u, v) = UnixStream::pair().unwrap();
        let builder = Session::builder(v, Mode::Server, Config::default());
        let mut l = builder.listen("c").unwrap();
        let _plain = builder.start();
        let client = Session::with_fds(u, Mode::Client, Config::default());
        let (mut a, mut b) = connect(&client, &mut l, "c").await;
        match a.send_fds(&[file.as_fd()]) {
            Err(e @ Error::FdsUnsupported { .. }) => {
                assert!(e.to_string().contains("did not announce"), "{e}")
            }
            other => panic!("expected FdsUnsupported, got {other:?}"),
        }
        // The session itself works as usual.
        a.write_all(b"still fine").await.unwrap();
        let mut buf = [0u8; 10];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still fine");
    })
    .await;
}

#[tokio::test]
async fn more_than_253_at_once_is_refused_and_nothing_is_sent() {
    within(20, "per-message cap", async {
        let (client, _server, mut ls) = fd_pair(&["cap"], Config::default());
        let (mut a, mut b) = connect(&client, &mut ls[0], "cap").await;
        let file = unlinked_file("x");
        let many = vec![file.as_fd(); 254];
        match a.send_fds(&many) {
            Err(Error::TooManyFds {
                count: 254,
                limit: 253,
                ..
            }) => {}
            other => panic!("expected TooManyFds, got {other:?}"),
        }
        a.send_fds(&many[..253]).unwrap();
        a.write_all(b"k").await.unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        assert_eq!(b.take_fds().len(), 253);
    })
    .await;
}

#[tokio::test]
async fn a_peer_sending_more_than_the_session_holds_unclaimed_ends_only_that_session() {
    within(20, "unclaimed cap", async {
        let config = Config::default().max_received_fds(4);
        let (client, server, mut ls) = fd_pair(&["flood"], config);
        let (mut a, _b) = connect(&client, &mut ls[0], "flood").await;
        let file = unlinked_file("x");
        for _ in 0..5 {
            // Nobody takes them on the other side.
            a.send_fds(&[file.as_fd()]).unwrap();
            a.write_all(b"x").await.unwrap();
        }
        let reason = server.closed().await;
        assert!(
            matches!(
                reason,
                CloseReason::ProtocolViolation(Violation::TooManyFds { limit: 4 })
            ),
            "{reason:?}"
        );
        // Another session in the same process is untouched.
        let (c2, _s2, mut l2) = fd_pair(&["ok"], Config::default());
        let (mut x, mut y) = connect(&c2, &mut l2[0], "ok").await;
        x.send_fds(&[file.as_fd()]).unwrap();
        x.write_all(b"y").await.unwrap();
        let mut one = [0u8; 1];
        y.read_exact(&mut one).await.unwrap();
        assert_eq!(y.take_fds().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn the_descriptor_handle_works_from_both_halves_of_a_split_channel() {
    within(20, "split", async {
        let (client, _server, mut ls) = fd_pair(&["split"], Config::default());
        let (a, b) = connect(&client, &mut ls[0], "split").await;
        let (a_fds, b_fds) = (a.fds(), b.fds());
        let (_ar, mut aw) = tokio::io::split(a);
        let (mut br, _bw) = tokio::io::split(b);
        let file = unlinked_file("split");
        a_fds.send(&[file.as_fd()]).unwrap();
        aw.write_all(b"z").await.unwrap();
        let mut one = [0u8; 1];
        br.read_exact(&mut one).await.unwrap();
        let fds = b_fds.take();
        assert_eq!(contents(fds.into_iter().next().unwrap()), "split");
    })
    .await;
}
