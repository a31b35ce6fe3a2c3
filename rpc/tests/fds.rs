//! File descriptors with calls: requests and responses carrying open files and sockets over a
//! unix-socket mux session that passes them, many at once on several channels, and the clear
//! refusals where they cannot go. (Leak counts: `fd_leaks.rs`, a binary of its own.)
#![cfg(unix)]

use netchan_mux::{Config as MuxConfig, Mode, Session};
use netchan_rpc::{rpc_service, CallOptions, Client, Code, Context, Server, ServiceDef, Status};
use netchan_testkit::{fds::contents, within};
use std::{
    fs::File,
    io::{Seek, Write},
    os::fd::OwnedFd,
};

/// An open file holding `text`, already unlinked, as a descriptor to send.
fn unlinked_file(text: &str) -> OwnedFd {
    netchan_testkit::fds::unlinked_file(text).into()
}

/// A typed service whose methods take and return descriptors through the context.
#[rpc_service]
pub trait Notes {
    /// Appends `line` to the file the call carries; answers with a copy of it, reopened.
    async fn append(&self, ctx: Context, line: String) -> Result<usize, Status>;
}

struct NotesImpl;

impl Notes for NotesImpl {
    async fn append(&self, ctx: Context, line: String) -> Result<usize, Status> {
        let Some(fd) = ctx.take_fds().pop() else {
            return Err(Status::invalid_argument("no file"));
        };
        let mut file = File::from(fd);
        file.seek(std::io::SeekFrom::End(0))?;
        file.write_all(line.as_bytes())?;
        let copy = file.try_clone()?;
        ctx.reply_fds(vec![copy.into()])?;
        Ok(line.len())
    }
}

/// A server serving `Files.*` and `Notes.*` on every channel of a fd-passing session.
fn files_server() -> Server {
    let mut server = Server::new();
    server.add(NotesImpl.into_service());
    // Reads the file it is handed; answers with a new file holding the text reversed.
    server.add(
        ServiceDef::new("Files").unary("reverse", |ctx: Context, tag: String| async move {
            let mut fds = ctx.take_fds();
            if fds.len() != 1 {
                return Err(Status::invalid_argument(format!("{} fds", fds.len())));
            }
            let text = contents(fds.remove(0));
            if !text.starts_with(&tag) {
                return Err(Status::internal(format!("{tag}: got the file of {text}")));
            }
            ctx.reply_fds(vec![unlinked_file(&text.chars().rev().collect::<String>())])?;
            Ok(text.len() as u64)
        }),
    );
    server.add(
        ServiceDef::new("Files").unary("count", |ctx: Context, (): ()| async move {
            Ok(ctx.take_fds().len() as u64)
        }),
    );
    server.add(
        ServiceDef::new("Files").unary("plain", |ctx: Context, (): ()| async move {
            // Tries to answer with a descriptor where the link cannot carry it.
            ctx.reply_fds(vec![unlinked_file("x")])?;
            Ok(())
        }),
    );
    server
}

/// Serves [`files_server`] on every channel `listener` accepts.
fn serve_files(mut listener: netchan_mux::Listener) {
    let server = files_server();
    tokio::spawn(async move {
        while let Ok(conn) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let _ = server.serve(conn).await;
            });
        }
    });
}

/// Both ends of a unix-socket session that passes fds, `rpc` served on the server end.
async fn fd_session() -> (Session, Session) {
    let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
    let builder = Session::builder_with_fds(b, Mode::Server, MuxConfig::default());
    let listener = builder.listen("rpc").expect("listen");
    let server_session = builder.start();
    serve_files(listener);
    (
        Session::with_fds(a, Mode::Client, MuxConfig::default()),
        server_session,
    )
}

#[tokio::test]
async fn a_request_and_its_response_each_carry_a_file() {
    within(20, "fds with a call", async {
        let (client_session, _server) = fd_session().await;
        let client = Client::new(client_session.dial("rpc").await.unwrap());
        let opts = CallOptions::default().fds([unlinked_file("hello-0 world")]);
        let (len, mut fds): (u64, _) = client
            .call_with_fds("Files.reverse", "hello-0", opts)
            .await
            .unwrap();
        assert_eq!(len, 13);
        assert_eq!(fds.len(), 1);
        assert_eq!(contents(fds.remove(0)), "dlrow 0-olleh");
        // A call without descriptors gets none, and the handler sees none.
        let n: u64 = client.call("Files.count", &()).await.unwrap();
        assert_eq!(n, 0);
        let many = CallOptions::default().fds((0..5).map(|i| unlinked_file(&i.to_string())));
        let n: u64 = client.call_with("Files.count", &(), many).await.unwrap();
        assert_eq!(n, 5);
    })
    .await;
}

#[tokio::test]
async fn a_typed_client_sends_and_receives_descriptors() {
    within(20, "typed fds", async {
        let (client_session, _server) = fd_session().await;
        let notes = NotesClient::new(Client::new(client_session.dial("rpc").await.unwrap()));
        let with_file = notes.with_options(CallOptions::default().fds([unlinked_file("a\n")]));
        let (n, mut fds) = with_file.append_with_fds("b\n".into()).await.unwrap();
        assert_eq!(n, 2);
        assert_eq!(contents(fds.remove(0)), "a\nb\n");
        // The options keep their descriptor: the same file again.
        assert_eq!(with_file.append("c\n".into()).await.unwrap(), 2);
        let (_, mut fds) = with_file.append_with_fds("d\n".into()).await.unwrap();
        assert_eq!(contents(fds.remove(0)), "a\nb\nc\nd\n");
        let err = notes.append("x".into()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    })
    .await;
}

#[tokio::test]
async fn many_calls_with_files_in_flight_on_several_channels_each_get_their_own() {
    within(60, "many calls", async {
        let (client_session, _server) = fd_session().await;
        let mut tasks = tokio::task::JoinSet::new();
        for ch in 0..4 {
            let client = Client::new(client_session.dial("rpc").await.unwrap());
            for i in 0..25 {
                let client = client.clone();
                tasks.spawn(async move {
                    let tag = format!("c{ch}-{i}");
                    let text = format!("{tag} payload {}", "x".repeat(i * 97));
                    let opts = CallOptions::default().fds([unlinked_file(&text)]);
                    let (len, mut fds): (u64, _) = client
                        .call_with_fds("Files.reverse", &tag, opts)
                        .await
                        .unwrap_or_else(|s| panic!("{tag}: {s}"));
                    assert_eq!(len as usize, text.len());
                    let back = contents(fds.remove(0));
                    assert_eq!(back, text.chars().rev().collect::<String>(), "{tag}");
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("call task");
        }
    })
    .await;
}

#[tokio::test]
async fn links_that_cannot_carry_descriptors_refuse_calls_with_them_at_once() {
    within(20, "refusals", async {
        // rpc straight over a TCP connection, and over a mux channel of a TCP session.
        let (a, b) = netchan_testkit::tcp_pair().await;
        let server = files_server();
        tokio::spawn(async move {
            let _ = server.serve(b).await;
        });
        let tcp = Client::new(a);
        let (x, y) = netchan_testkit::tcp_pair().await;
        let builder = Session::builder(y, Mode::Server, MuxConfig::default());
        let listener = builder.listen("rpc").unwrap();
        let _s = builder.start();
        serve_files(listener);
        let over_mux = Client::new(
            Session::client(x, MuxConfig::default())
                .dial("rpc")
                .await
                .unwrap(),
        );
        for client in [&tcp, &over_mux] {
            let opts = CallOptions::default().fds([unlinked_file("x")]);
            let err = client
                .call_with::<_, u64>("Files.count", &(), opts)
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
            assert!(
                err.message().contains("cannot send file descriptors"),
                "{err}"
            );
            // Nothing was sent: the conn carries on, and a handler that tries to answer
            // with descriptors gets the same refusal.
            let err = client.call::<_, ()>("Files.plain", &()).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
            let n: u64 = client.call("Files.count", &()).await.unwrap();
            assert_eq!(n, 0);
        }
    })
    .await;
}

#[tokio::test]
async fn more_than_253_descriptors_in_one_message_are_refused() {
    within(20, "cap", async {
        let (client_session, _server) = fd_session().await;
        let client = Client::new(client_session.dial("rpc").await.unwrap());
        let file = File::from(unlinked_file("x"));
        let dup = |_| OwnedFd::from(file.try_clone().unwrap());
        let too_many = CallOptions::default().fds((0..254).map(dup));
        let err = client
            .call_with::<_, u64>("Files.count", &(), too_many)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("at most 253"), "{err}");
        let most = CallOptions::default().fds((0..253).map(dup));
        let n: u64 = client.call_with("Files.count", &(), most).await.unwrap();
        assert_eq!(n, 253);
    })
    .await;
}
