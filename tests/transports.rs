//! netchan end to end over each kind of link it is meant for, each made with
//! `netchan::bind`/`netchan::connect`: loopback TCP, TCP under mutual TLS, a Unix socket at a
//! path and an abstract Unix socket; and a socket pair as handed to a subprocess. On every link both peers serve a typed
//! service and call the other's, including the hub calling back into the client while it serves
//! the client's call, with metadata, a deadline and a flow-controlled server stream.

use std::{future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use netchan::{
    mux::{self, Session},
    net::{TlsClient, TlsServer},
    rpc::{self, rpc_service, CallOptions, Code, Context, ItemStream, Status},
    BindOptions, ConnectOptions,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::UnixStream;

/// Every wait in this file is bounded by this.
const BOUND: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(f: F) -> F::Output {
    netchan_testkit::within(BOUND.as_secs(), "the operation of this test", f).await
}

/// What the hub serves to its clients.
#[rpc_service]
pub trait Hub {
    /// Asks the hub to relay `text` back through the caller's own `Phone` service.
    async fn relay(&self, ctx: Context, text: String) -> Result<String, Status>;
    /// Counts from 0 to `n` (exclusive); `n` over 1000 is out of range.
    async fn count(&self, ctx: Context, n: u32) -> Result<ItemStream<u32>, Status>;
}

/// What each client exports to the hub, over the client's own connection.
#[rpc_service]
pub trait Phone {
    /// Answers with `text` in upper case.
    async fn shout(&self, ctx: Context, text: String) -> Result<String, Status>;
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

/// The client side's session config: the hub keeps its channel to the client's Phone open to
/// the end, so the client's graceful close waits out its grace period: keep that short.
fn client_config() -> mux::Config {
    mux::Config::default().close_grace(Duration::from_millis(200))
}

/// Binds `addr`, connects to it and runs the whole exchange over that link.
async fn over(addr: &str, bind: BindOptions, connect: ConnectOptions) {
    let mut listener = netchan::bind(addr, bind).await.expect("bind");
    let local = listener.local_addr().clone();
    let connect = connect.mux(client_config());
    let (client, hub) =
        bounded(async { tokio::join!(netchan::connect(&local, connect), listener.accept()) }).await;
    exercise(client.expect("connect"), hub.expect("accept")).await;
}

/// Runs the whole bidirectional exchange over one link, `client` being the side that
/// connected and `hub` the side that accepted.
async fn exercise(client: Session, hub: Session) {
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

/// The hub's side, built as a rustls config by hand: requires a client certificate.
fn server_tls(pki: &Pki) -> TlsServer {
    let verifier = rustls::server::WebPkiClientVerifier::builder(pki.roots.clone())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.0.clone(), pki.server.1.clone_key())
        .unwrap();
    TlsServer::from_config(Arc::new(config))
}

fn client_tls(pki: &Pki) -> TlsClient {
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(pki.roots.clone())
        .with_client_auth_cert(pki.client.0.clone(), pki.client.1.clone_key())
        .unwrap();
    TlsClient::from_config(Arc::new(config)).server_name("localhost")
}

#[tokio::test]
async fn both_peers_serve_and_call_over_loopback_tcp() {
    over(
        "127.0.0.1:0",
        BindOptions::default(),
        ConnectOptions::default(),
    )
    .await;
}

#[tokio::test]
async fn both_peers_serve_and_call_over_mutual_tls_on_loopback_tcp() {
    let pki = pki();
    over(
        "tls://127.0.0.1:0",
        BindOptions::default().tls(server_tls(&pki)),
        ConnectOptions::default().tls(client_tls(&pki)),
    )
    .await;
}

#[tokio::test]
async fn both_peers_serve_and_call_over_a_unix_socket_path() {
    let dir = std::env::temp_dir().join(format!("netchan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("unix:{}", dir.join("link.sock").display());
    over(&addr, BindOptions::default(), ConnectOptions::default()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn both_peers_serve_and_call_over_an_abstract_unix_socket() {
    let addr = format!("unix:@netchan-test-{}-abstract", std::process::id());
    over(&addr, BindOptions::default(), ConnectOptions::default()).await;
}

#[tokio::test]
async fn both_peers_serve_and_call_over_a_socket_pair_as_passed_to_a_subprocess() {
    // The shape of "RPC to a subprocess over an inherited socket": one end of a socketpair each
    // (tests/child.rs runs a real child process).
    let (parent, child) = UnixStream::pair().unwrap();
    exercise(
        Session::client(parent, client_config()),
        Session::server(child, mux::Config::default()),
    )
    .await;
}
