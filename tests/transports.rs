//! netchan end to end over each kind of link it is meant for: loopback TCP under mutual TLS,
//! a Unix socket at a path, and an abstract Unix socket. On every link both peers serve a typed
//! service and call the other's, including the hub calling back into the client while it serves
//! the client's call, with metadata, a deadline and a flow-controlled server stream.

use std::{future::Future, io, sync::Arc, time::Duration};

use futures::StreamExt;
use netchan::{
    mux::{self, Session},
    rpc::{self, service, CallOptions, Code, Context, ItemStream, Status},
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
};

/// Every wait in this file is bounded by this.
const BOUND: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the operation did not finish within the test's bound")
}

service! {
    /// What the hub serves to its clients.
    pub trait Hub {
        /// Asks the hub to relay `text` back through the caller's own `Phone` service.
        async fn relay(&self, ctx: Context, text: String) -> Result<String, Status>;
        /// Counts from 0 to `n` (exclusive); `n` over 1000 is out of range.
        stream fn count(&self, ctx: Context, n: u32) -> Result<ItemStream<u32>, Status>;
    }
    /// Typed client for [`Hub`].
    pub struct HubClient;
}

service! {
    /// What each client exports to the hub, over the client's own connection.
    pub trait Phone {
        /// Answers with `text` in upper case.
        async fn shout(&self, ctx: Context, text: String) -> Result<String, Status>;
    }
    /// Typed client for [`Phone`].
    pub struct PhoneClient;
}

struct HubImpl {
    /// The hub's client of the one peer in these tests, dialled over the peer's session.
    phone: PhoneClient,
}

impl Hub for HubImpl {
    async fn relay(&self, ctx: Context, text: String) -> Result<String, Status> {
        if ctx.metadata().get("token") != Some("s3cret") {
            return Err(Status::unauthenticated("missing or wrong token"));
        }
        // Call back into the caller while its call to us is still open.
        let shouted = self.phone.shout(text).await?;
        Ok(format!("hub relayed: {shouted}"))
    }

    async fn count(&self, _ctx: Context, n: u32) -> Result<ItemStream<u32>, Status> {
        if n > 1000 {
            return Err(Status::out_of_range(format!("{n} is over 1000")));
        }
        Ok(Box::pin(futures::stream::iter((0..n).map(Ok))))
    }
}

struct PhoneImpl;

impl Phone for PhoneImpl {
    async fn shout(&self, _ctx: Context, text: String) -> Result<String, Status> {
        Ok(text.to_uppercase())
    }
}

/// Runs the whole bidirectional exchange over one link, `client_io` being the side that
/// connected and `hub_io` the side that accepted.
async fn exercise<C, H>(client_io: C, hub_io: H)
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The hub keeps its channel to the client's Phone open to the end, so the client's graceful
    // close waits out its grace period: keep that short.
    let client_config = mux::Config::default().close_grace(Duration::from_millis(200));
    let client = Session::client(client_io, client_config);
    let hub = Session::server(hub_io, mux::Config::default());

    // The client exports Phone on its own connection...
    let mut phone_listener = client.listen("phone").expect("listen phone");
    let phone_server = {
        let mut server = rpc::Server::new();
        server.add(PhoneImpl.into_service());
        server
    };
    tokio::spawn(async move {
        while let Ok(conn) = phone_listener.accept().await {
            let server = phone_server.clone();
            tokio::spawn(async move { server.serve_named(conn, "phone").await });
        }
    });

    // ...and the hub serves Hub, calling the client back over that same connection.
    let mut hub_listener = hub.listen("hub").expect("listen hub");
    let phone = PhoneClient::new(rpc::Client::new(
        bounded(hub.dial("phone")).await.expect("hub dials phone"),
    ));
    let hub_server = {
        let mut server = rpc::Server::new();
        server.add(HubImpl { phone }.into_service());
        server
    };
    tokio::spawn(async move {
        while let Ok(conn) = hub_listener.accept().await {
            let server = hub_server.clone();
            tokio::spawn(async move { server.serve_named(conn, "hub").await });
        }
    });

    let hub_client = HubClient::new(rpc::Client::new(
        bounded(client.dial("hub")).await.expect("client dials hub"),
    ));

    let authed = hub_client.with_options(
        CallOptions::default()
            .metadata("token", "s3cret")
            .timeout(Duration::from_secs(10)),
    );
    let reply = bounded(authed.relay("hello".to_string())).await.unwrap();
    assert_eq!(reply, "hub relayed: HELLO");

    let err = bounded(hub_client.relay("no token".to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Fifty callbacks at once on the one link.
    let calls = (0..50).map(|i| {
        let authed = authed.clone();
        async move { authed.relay(format!("call {i}")).await }
    });
    let replies = bounded(futures::future::join_all(calls)).await;
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.unwrap(), format!("hub relayed: CALL {i}"));
    }

    let items: Vec<u32> = bounded(async {
        let stream = hub_client.count(500).await.unwrap();
        stream.map(|item| item.unwrap()).collect().await
    })
    .await;
    assert_eq!(items, (0..500).collect::<Vec<_>>());

    let err = match bounded(hub_client.count(5000)).await {
        Ok(mut stream) => bounded(stream.next())
            .await
            .expect("a refused stream ends with its status")
            .unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(err.code(), Code::OutOfRange);

    bounded(client.close()).await;
    let reason = bounded(hub.closed()).await;
    assert!(
        matches!(reason, mux::CloseReason::Peer),
        "the hub sees the client's graceful close, got {reason:?}"
    );
}

struct Pki {
    roots: Arc<rustls::RootCertStore>,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

/// A throwaway CA with one server certificate (for `localhost`) and one client certificate.
fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    };

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    Pki {
        roots: Arc::new(roots),
        server: leaf("localhost"),
        client: leaf("client.test"),
    }
}

fn server_tls(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    let verifier = rustls::server::WebPkiClientVerifier::builder(pki.roots.clone())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.0.clone(), pki.server.1.clone_key())
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn client_tls(pki: &Pki, with_cert: bool) -> tokio_rustls::TlsConnector {
    let builder = rustls::ClientConfig::builder().with_root_certificates(pki.roots.clone());
    let config = if with_cert {
        builder
            .with_client_auth_cert(pki.client.0.clone(), pki.client.1.clone_key())
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;
type HubTls = tokio_rustls::server::TlsStream<TcpStream>;

/// Connects a TLS client (with or without its certificate) to a TLS hub requiring client
/// certificates over loopback TCP, and returns what each side's handshake gave.
async fn tls_link(pki: &Pki, client_cert: bool) -> (io::Result<ClientTls>, io::Result<HubTls>) {
    let acceptor = server_tls(pki);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        acceptor.accept(tcp).await
    });
    let tcp = bounded(TcpStream::connect(addr)).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let client = bounded(client_tls(pki, client_cert).connect(name, tcp)).await;
    let hub = bounded(accepted).await.unwrap();
    (client, hub)
}

#[tokio::test]
async fn both_peers_serve_and_call_over_mutual_tls_on_loopback_tcp() {
    let (client, hub) = tls_link(&pki(), true).await;
    let client_io = client.expect("the TLS handshake succeeds with a client certificate");
    exercise(client_io, hub.unwrap()).await;
}

#[tokio::test]
async fn a_hub_requiring_client_certificates_refuses_a_client_without_one() {
    // TLS 1.3 reports a refused client certificate on the client's first read, after the
    // handshake, so either side may be the one to see the failure first.
    let (client, hub) = tls_link(&pki(), false).await;
    let err = hub.expect_err("the hub refuses a client without a certificate");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "the error names the missing certificate: {err}"
    );
    if let Ok(client_io) = client {
        // Whatever the client thinks, no session can run on this link.
        let session = Session::client(client_io, mux::Config::default());
        let dial = bounded(session.dial("hub")).await;
        assert!(dial.is_err(), "no channel opens over a refused TLS link");
    }
}

#[tokio::test]
async fn both_peers_serve_and_call_over_a_unix_socket_path() {
    let dir = std::env::temp_dir().join(format!("netchan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("link.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let accepted = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
    let client_io = bounded(UnixStream::connect(&path)).await.unwrap();
    let hub_io = bounded(accepted).await.unwrap().unwrap();
    exercise(client_io, hub_io).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn both_peers_serve_and_call_over_an_abstract_unix_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("netchan-test-{}-abstract", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let std_listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let listener = UnixListener::from_std(std_listener).unwrap();
    let accepted = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
    let std_client = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
    std_client.set_nonblocking(true).unwrap();
    let client_io = UnixStream::from_std(std_client).unwrap();
    let hub_io = bounded(accepted).await.unwrap().unwrap();
    exercise(client_io, hub_io).await;
}

#[tokio::test]
async fn both_peers_serve_and_call_over_a_socket_pair_as_passed_to_a_subprocess() {
    // The shape of "RPC to a subprocess over an inherited socket": one end of a socketpair each.
    let (parent, child) = UnixStream::pair().unwrap();
    exercise(parent, child).await;
}
