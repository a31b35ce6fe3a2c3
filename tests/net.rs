//! `netchan::connect` and `netchan::bind` over every address form, with the failures users
//! meet: a stale or busy Unix socket file, a connect that never completes, and every way TLS
//! can refuse (each side not trusting the other, a missing client certificate, a stalled
//! handshake).

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use netchan::{
    mux::{self, CloseReason, Session},
    net::{
        AcceptError, Addr, BindError, ConnectError, ConnectOptions, Listener, TlsClient, TlsError,
        TlsServer,
    },
    BindOptions,
};
use netchan_testkit::within;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes one message on a channel named "echo" from `server` and checks it from `client`.
async fn echo_works(client: &Session, server: &Session) {
    let mut echo = server.listen("echo").expect("listen echo");
    let (dialled, accepted) = within(20, "dial and accept echo", async {
        tokio::join!(client.dial("echo"), echo.accept())
    })
    .await;
    let (mut to, mut from) = (dialled.expect("dial echo"), accepted.expect("accept echo"));
    to.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within(20, "read ping", from.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"ping");
}

async fn connect_and_accept(
    listener: &mut Listener,
    options: ConnectOptions,
) -> (Result<Session, ConnectError>, Result<Session, AcceptError>) {
    let addr = listener.local_addr().clone();
    within(20, "connect and accept", async {
        tokio::join!(netchan::connect(&addr, options), listener.accept())
    })
    .await
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("netchan-net-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_session_runs_over_tcp_given_as_host_port_or_tcp_url() {
    for bind_at in ["127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://[::1]:0"] {
        let mut listener = netchan::bind(bind_at, BindOptions::default())
            .await
            .unwrap();
        let local = listener.local_addr().clone();
        assert!(
            matches!(local, Addr::Tcp { port, .. } if port != 0),
            "{local}"
        );
        let (client, server) = connect_and_accept(&mut listener, ConnectOptions::default()).await;
        echo_works(&client.unwrap(), &server.unwrap()).await;
    }
}

#[tokio::test]
async fn a_session_runs_over_a_unix_socket_file_which_the_listener_removes_when_dropped() {
    let dir = temp_dir("unix");
    let path = dir.join("hub.sock");
    let addr = format!("unix:{}", path.display());
    let mut listener = netchan::bind(&addr, BindOptions::default()).await.unwrap();
    assert_eq!(listener.local_addr().to_string(), addr);
    let (client, server) = connect_and_accept(&mut listener, ConnectOptions::default()).await;
    echo_works(&client.unwrap(), &server.unwrap()).await;
    drop(listener);
    assert!(!path.exists(), "the listener removed its socket file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_session_runs_over_an_abstract_unix_socket() {
    let addr = format!("unix:@netchan-net-test-{}", std::process::id());
    let mut listener = netchan::bind(addr.as_str(), BindOptions::default())
        .await
        .unwrap();
    let (client, server) = connect_and_accept(&mut listener, ConnectOptions::default()).await;
    echo_works(&client.unwrap(), &server.unwrap()).await;
}

#[tokio::test]
async fn the_listener_is_a_stream_of_sessions() {
    let mut listener = netchan::bind("127.0.0.1:0", BindOptions::default())
        .await
        .unwrap();
    let addr = listener.local_addr().clone();
    let client = within(20, "connect", netchan::connect(&addr, Default::default()))
        .await
        .unwrap();
    let server = within(20, "next session", listener.next())
        .await
        .expect("a listener does not end")
        .unwrap();
    echo_works(&client, &server).await;
}

#[tokio::test]
async fn a_stale_unix_socket_file_is_replaced_but_a_live_one_or_a_plain_file_is_not() {
    let dir = temp_dir("stale");
    let path = dir.join("hub.sock");
    // A socket file whose listener is gone, as after a crash.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let addr = format!("unix:{}", path.display());
    let mut listener = netchan::bind(&addr, BindOptions::default()).await.unwrap();
    let (client, server) = connect_and_accept(&mut listener, ConnectOptions::default()).await;
    echo_works(&client.unwrap(), &server.unwrap()).await;

    // While that listener lives, a second bind is refused and the file stays. (Its probe
    // reaches the live listener as a connection that ends at once, as any vanished client.)
    let err = netchan::bind(&addr, BindOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BindError::UnixSocketInUse { .. }), "{err:?}");
    assert!(err.to_string().contains("hub.sock"), "{err}");
    assert!(path.exists());

    let plain = dir.join("notes.txt");
    std::fs::write(&plain, "keep me").unwrap();
    let err = netchan::bind(format!("unix:{}", plain.display()), BindOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BindError::NotASocket { .. }), "{err:?}");
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep me");
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn connect_errors_name_the_address_and_the_problem() {
    let err = netchan::connect("unix:", ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Addr(_)), "{err:?}");
    assert!(err.to_string().contains("needs a path"), "{err}");

    let err = netchan::connect("127.0.0.1:70000", ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("port \"70000\""), "{err}");

    let dir = temp_dir("missing");
    let missing = format!("unix:{}", dir.join("nobody.sock").display());
    let err = within(
        20,
        "connect",
        netchan::connect(missing.as_str(), Default::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::Io { .. }), "{err:?}");
    // The cause is in the message itself (issue 24, item 10), and not
    // repeated as a source.
    assert!(err.to_string().contains("nobody.sock: "), "{err}");
    assert!(err.to_string().contains("No such file"), "{err}");
    assert!(std::error::Error::source(&err).is_none());
    let _ = std::fs::remove_dir_all(&dir);

    let err = within(
        20,
        "connect",
        netchan::connect("tls://127.0.0.1:1", Default::default()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ConnectError::TlsNotConfigured { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_connect_that_does_not_complete_times_out() {
    // A listener with a backlog of 1 that never accepts: once its queue is full the kernel
    // drops further SYNs, and a connect hangs until our timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let _listener = socket.listen(1).unwrap();
    let options = ConnectOptions::default().timeout(Duration::from_millis(300));
    let mut kept = Vec::new();
    let mut timed_out = None;
    for _ in 0..16 {
        match within(
            20,
            "connect",
            netchan::connect(addr.to_string(), options.clone()),
        )
        .await
        {
            Ok(session) => kept.push(session),
            Err(e) => {
                timed_out = Some(e);
                break;
            }
        }
    }
    let err = timed_out.expect("a connect to a full backlog fails");
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out after 300ms"), "{err}");
}

struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    /// A CA with a server certificate for `localhost`/127.0.0.1 and a client certificate, and
    /// a second, unrelated CA with its own client certificate; all written as PEM files.
    fn new(tag: &str) -> Pki {
        let dir = temp_dir(tag);
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            Issuer::new(params, key)
        };
        let leaf = |issuer: &Issuer<'_, KeyPair>, name: &str, sans: &[&str]| {
            let key = KeyPair::generate().unwrap();
            let sans = sans.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, issuer)
                .unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        let good = ca("ca");
        leaf(&good, "server", &["localhost", "127.0.0.1"]);
        leaf(&good, "client", &["client.test"]);
        let other = ca("other-ca");
        leaf(&other, "stranger", &["stranger.test"]);
        Pki { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    fn server(&self, mutual: bool) -> TlsServer {
        if mutual {
            TlsServer::mutual_from_pem_files(
                self.path("server.pem"),
                self.path("server.key"),
                self.path("ca.pem"),
            )
        } else {
            TlsServer::from_pem_files(self.path("server.pem"), self.path("server.key"))
        }
        .unwrap()
    }

    fn client(&self, ca: &str, cert: Option<&str>) -> TlsClient {
        match cert {
            None => TlsClient::from_pem_files(self.path(ca)),
            Some(name) => TlsClient::mutual_from_pem_files(
                self.path(ca),
                self.path(&format!("{name}.pem")),
                self.path(&format!("{name}.key")),
            ),
        }
        .unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_listener(server: TlsServer) -> Listener {
    let options = BindOptions::default()
        .tls(server)
        .handshake_timeout(Duration::from_secs(10));
    netchan::bind("tls://127.0.0.1:0", options).await.unwrap()
}

#[tokio::test]
async fn a_session_runs_over_tls_with_server_auth_and_with_mutual_auth() {
    let pki = Pki::new("tls-ok");
    let mut listener = tls_listener(pki.server(false)).await;
    assert!(listener
        .local_addr()
        .to_string()
        .starts_with("tls://127.0.0.1:"));
    let options = ConnectOptions::default().tls(pki.client("ca.pem", None));
    let (client, server) = connect_and_accept(&mut listener, options).await;
    echo_works(&client.unwrap(), &server.unwrap()).await;

    let mut listener = tls_listener(pki.server(true)).await;
    // Verified by name: `localhost` is in the server's certificate.
    let port = match listener.local_addr() {
        Addr::Tls { port, .. } => *port,
        other => panic!("{other}"),
    };
    let options = ConnectOptions::default().tls(pki.client("ca.pem", Some("client")));
    let addr = format!("tls://localhost:{port}");
    let (client, server) = within(20, "connect and accept", async {
        tokio::join!(netchan::connect(addr.as_str(), options), listener.accept())
    })
    .await;
    echo_works(&client.unwrap(), &server.unwrap()).await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_server_says_so_and_so_does_the_server() {
    let pki = Pki::new("tls-untrusted-server");
    let mut listener = tls_listener(pki.server(false)).await;
    let options = ConnectOptions::default().tls(pki.client("other-ca.pem", None));
    let (client, server) = connect_and_accept(&mut listener, options).await;
    let err = client.unwrap_err();
    assert!(
        matches!(
            &err,
            ConnectError::Tls {
                error: TlsError::ClientDoesNotTrustServer { .. },
                ..
            }
        ),
        "{err:?}"
    );
    // The whole reason is in the message, once (not repeated by a source).
    let shown = err.to_string();
    assert!(
        shown.starts_with("TLS with tls://")
            && shown.contains("failed: this client does not trust the server's certificate: ")
            && shown.contains("invalid peer certificate"),
        "{shown}"
    );
    assert_eq!(anyhow_chain(&err), shown);
    let err = server.unwrap_err();
    assert!(
        matches!(
            &err,
            AcceptError::Tls {
                error: TlsError::ClientDoesNotTrustThisServer { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let shown = err.to_string();
    assert!(
        shown.starts_with("TLS with 127.0.0.1:")
            && shown.contains("failed: the client does not trust this server's certificate"),
        "{shown}"
    );
    assert_eq!(anyhow_chain(&err), shown);
}

#[tokio::test]
async fn a_server_requiring_a_client_certificate_refuses_a_client_without_one_and_both_say_why() {
    let pki = Pki::new("tls-no-client-cert");
    let mut listener = tls_listener(pki.server(true)).await;
    let options = ConnectOptions::default().tls(pki.client("ca.pem", None));
    let (client, server) = connect_and_accept(&mut listener, options).await;
    let err = server.unwrap_err();
    assert!(
        matches!(
            &err,
            AcceptError::Tls {
                error: TlsError::ClientSentNoCertificate,
                ..
            }
        ),
        "{err:?}"
    );
    // Under TLS 1.3 the client's handshake is done before the server checks: the refusal
    // arrives on the first read and ends the session with the reason named.
    let reason = match client {
        Err(err) => anyhow_chain(&err),
        Ok(session) => {
            let _ = within(20, "a dial on a refused link", session.dial("x")).await;
            let reason = within(20, "the session ends", session.closed()).await;
            assert!(matches!(reason, CloseReason::Io(_)), "{reason:?}");
            reason.to_string()
        }
    };
    assert!(
        reason.contains("the server requires a client certificate and this client sent none"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_server_that_does_not_trust_the_client_certificate_says_so_and_so_does_the_client() {
    let pki = Pki::new("tls-untrusted-client");
    let mut listener = tls_listener(pki.server(true)).await;
    let options = ConnectOptions::default().tls(pki.client("ca.pem", Some("stranger")));
    let (client, server) = connect_and_accept(&mut listener, options).await;
    let err = server.unwrap_err();
    assert!(
        matches!(
            &err,
            AcceptError::Tls {
                error: TlsError::ServerDoesNotTrustClientCertificate { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let reason = match client {
        Err(err) => anyhow_chain(&err),
        Ok(session) => {
            let _ = within(20, "a dial on a refused link", session.dial("x")).await;
            within(20, "the session ends", session.closed())
                .await
                .to_string()
        }
    };
    assert!(
        reason.contains("the server does not trust this client's certificate"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_stalled_tls_handshake_times_out_on_either_side() {
    let pki = Pki::new("tls-stall");
    // Client side: a TCP listener that never speaks TLS (the kernel accepts for it).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tls://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let options = ConnectOptions::default()
        .tls(pki.client("ca.pem", None))
        .timeout(Duration::from_millis(500));
    let err = within(20, "connect", netchan::connect(addr.as_str(), options))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ConnectError::Tls {
                error: TlsError::HandshakeTimeout { .. },
                ..
            }
        ),
        "{err:?}"
    );

    // Server side: a client that connects and says nothing; a good client still gets in.
    let options = BindOptions::default()
        .tls(pki.server(false))
        .handshake_timeout(Duration::from_millis(500));
    let mut listener = netchan::bind("tls://127.0.0.1:0", options).await.unwrap();
    let port = match listener.local_addr() {
        Addr::Tls { port, .. } => *port,
        other => panic!("{other}"),
    };
    let _mute = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let good = ConnectOptions::default().tls(pki.client("ca.pem", None));
    let (client, server) = connect_and_accept(&mut listener, good).await;
    echo_works(&client.unwrap(), &server.unwrap()).await;
    let err = within(20, "the stalled handshake's error", listener.accept())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            AcceptError::Tls {
                error: TlsError::HandshakeTimeout { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn tls_options_are_refused_for_a_plain_address_and_required_for_a_tls_one() {
    let pki = Pki::new("tls-mismatch");
    let err = netchan::bind("127.0.0.1:0", BindOptions::default().tls(pki.server(false)))
        .await
        .unwrap_err();
    assert!(matches!(err, BindError::TlsForPlainAddr { .. }), "{err:?}");
    let err = netchan::bind("tls://127.0.0.1:0", BindOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BindError::TlsNotConfigured { .. }), "{err:?}");
    let tls = ConnectOptions::default().tls(pki.client("ca.pem", None));
    let err = netchan::connect("127.0.0.1:1", tls).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::TlsForPlainAddr { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn tls_from_hand_built_rustls_configs_works_too() {
    let pki = Pki::new("tls-configs");
    let server = netchan::net::tls::server_config(
        pki.path("server.pem"),
        pki.path("server.key"),
        Some(&pki.path("ca.pem")),
    )
    .unwrap();
    let client = netchan::net::tls::client_config(
        pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    )
    .unwrap();
    let mut listener = tls_listener(TlsServer::from_config(server)).await;
    let options = ConnectOptions::default()
        .tls(TlsClient::from_config(Arc::clone(&client)).server_name("localhost"))
        .mux(mux::Config::default());
    let (client, server) = connect_and_accept(&mut listener, options).await;
    echo_works(&client.unwrap(), &server.unwrap()).await;
}

/// The error and its sources, joined as `{:#}` would print them.
fn anyhow_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_registered_in_on_session_is_there_for_the_peers_first_dial() {
    // Without the setup hook, a dial right after connect could race the server's listen and
    // fail with NoListener; with it, the session reads nothing before the listen is done.
    let options = BindOptions::default().on_session(|session| {
        let mut echo = session.listen("ready").expect("listen");
        tokio::spawn(async move { while echo.accept().await.is_ok() {} });
    });
    let mut listener = netchan::bind("127.0.0.1:0", options).await.unwrap();
    let addr = listener.local_addr().clone();
    tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    for _ in 0..20 {
        let client = within(20, "connect", netchan::connect(&addr, Default::default()))
            .await
            .unwrap();
        within(20, "the first dial", client.dial("ready"))
            .await
            .expect("the listener is registered before the first dial is read");
    }
}
