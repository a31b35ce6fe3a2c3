//! Hub-to-hub routing: a call for a peer another hub of the fleet holds goes to that hub as a
//! [`Relay`] call, over one long-lived session per pair of hubs.
//!
//! **The listener.** A hub of a fleet listens on a second address, its *fleet listener*,
//! which only the other hubs dial. A session there starts with the hub-to-hub hello on
//! [`FLEET_HELLO`] (the client hello's bytes, with the fleet's shared token when the fleet has
//! one); only once it succeeds does the hub listen on [`RELAY_CHANNEL`], where it serves
//! `Relay` as an rpc server. Hubs authenticate each other with the shared token, with mutual
//! TLS, or both ([`FleetOptions`]): with [`FleetTls`] the fleet listener speaks only TLS and
//! requires a certificate signed by the fleet's CA, and a dialing hub presents its own and
//! checks the other hub's against that CA (and the host of the address it dials). A
//! plaintext connection to such a listener is answered, in its hello, that the hub-to-hub
//! listener requires mutual TLS (or, for a client, that it serves hubs only). A client that
//! dials the fleet listener speaks the client hello on [`auth::CHANNEL`] and is told, in its
//! hello's answer, that this is a hub-to-hub listener; the client-facing listener never
//! listens on [`FLEET_HELLO`], so a hub that dials a client address by mistake is told so by
//! the mux (no such channel). At most
//! [`MAX_FLEET_SESSIONS`] hub-to-hub sessions are served at once; the hello must be done
//! within [`HubOptions::hello_timeout`](super::HubOptions::hello_timeout) of accept.
//!
//! **Serving.** The hub that holds the exporter serves `Relay.read` exactly as a local
//! `Hub.read` ([`HubState::forward_read`]): its slots, fairness, windows, timeouts and chunk
//! checks apply there, so an exporter is protected the same way whoever reads. The reader is
//! named `alice@hub-a` and holds at most `max_reads_per_reader` places per exporter, like a
//! local reader. Only peers published on the serving hub are served (a relayed call is never
//! relayed again, so no call loops between hubs), and only while the fleet's directory can
//! prove that hub holds their names: past its lease's TTL without reaching etcd, another hub
//! may hold them, so routed calls fail as unavailable until it has proven its claims again.
//!
//! **Routing.** A hub that gets `Hub.ls`/`stat`/`read` of a peer it does not hold asks the
//! fleet's [`Route`] which hub holds it and calls that hub over its [link](Links): one mux
//! session per remote hub, dialed on first use within [`LINK_DIAL_TIMEOUT`], kept (the mux
//! keepalive notices a dead hub), and dialed again by the next call once it has ended. The
//! calling hub holds the reader's place for that exporter, as for a local peer. A routed
//! read's chunks are passed on as they arrive, never stored: the rpc stream window of the
//! hub-to-hub call (sized from the link's round trip like a local read's, at most
//! [`MAX_RELAY_WINDOW`] chunks) bounds what the calling hub holds per read, `(window + 1) ×
//! CHUNK_SIZE`, and the holding hub keeps its own bound on its hop. A routed call whose link ends
//! fails with "peer gone: the hub holding bob is gone" (`Unavailable`, like any peer gone),
//! so the client's resume retries it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use netchan_mux::{self as mux, Session};
use netchan_rpc::{self as rpc, CallOptions, Context, ItemStream, Status};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::conn::{reader_slot, ReaderCounts, ReaderSlot};
use super::forward::window_for;
use super::registry::{validate_name, ConnId};
use super::service::check_offset;
use super::{HubState, MAX_MESSAGE};
use crate::auth::{self, AuthError, Token};
use crate::directory::Directory;
use crate::proto::{
    hub_gone, Chunk, Entry, Listing, PeerRead, Relay, RelayClient, RelayPath, RelayRead,
};
use crate::tls;

/// Mux channel of the hub-to-hub hello.
pub(crate) const FLEET_HELLO: &str = "fileshare.fleet-hello";

/// Mux channel of the [`Relay`] service, listened on once the hub-to-hub hello succeeded.
pub(crate) const RELAY_CHANNEL: &str = "fileshare.relay";

/// How long dialing another hub may take: TCP connect, the hello and the relay channel.
pub(crate) const LINK_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Hub-to-hub sessions a hub serves at once (a fleet has a handful of hubs; each dials one).
pub(crate) const MAX_FLEET_SESSIONS: usize = 256;

/// Links to other hubs a hub keeps at once.
const MAX_LINKS: usize = 256;

/// Largest stream window of a routed read, in chunks (16 MiB), whatever the link's round trip.
pub(crate) const MAX_RELAY_WINDOW: u32 = crate::proto::chunks(16 << 20);

/// Longest `reader` a `Relay` call may name: a peer name, `@`, a hub id.
const MAX_READER_LEN: usize = 2 * super::registry::MAX_NAME_LEN + 1;

/// Where peers held by other hubs are: the fleet's directory, as routing uses it.
pub(crate) trait Route: Send + Sync + 'static {
    /// The hub that holds `name`, if a hub other than this one does.
    fn remote(&self, name: &str) -> Option<RemoteHub>;
}

/// The [`Route`] of a hub that knows of no other hub: every peer it does not hold is unknown.
pub(crate) struct NoOtherHubs;

impl Route for NoOtherHubs {
    fn remote(&self, _name: &str) -> Option<RemoteHub> {
        None
    }
}

/// The [`Route`] of a hub of a fleet: the fleet's directory, from its watched copy (no
/// round trip per call).
// Used by the hub once `share hub --etcd` is wired in; until then only its tests do.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct DirectoryRoute(pub(crate) Arc<dyn Directory>);

impl Route for DirectoryRoute {
    fn remote(&self, name: &str) -> Option<RemoteHub> {
        let holder = self.0.lookup(name)?;
        (!holder.here && !holder.addr.is_empty()).then(|| RemoteHub {
            id: holder.hub.to_string(),
            addr: holder.addr,
        })
    }
}

/// Another hub of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteHub {
    /// Its id (in logs and errors).
    pub(crate) id: String,
    /// Its fleet listener's address.
    pub(crate) addr: String,
}

/// A hub's part in a fleet: who it is, how hubs authenticate each other, and where other
/// hubs' peers are. At least one of `token` and `tls` is set (`share hub` refuses to start a
/// fleet hub with neither).
#[derive(Clone)]
pub(crate) struct FleetOptions {
    /// This hub's id: readers routed from here are named `NAME@ID` at the other hub.
    pub(crate) hub_id: String,
    /// The secret every hub of the fleet presents to the others (and requires of them).
    pub(crate) token: Option<Token>,
    /// Mutual TLS between the hubs.
    pub(crate) tls: Option<FleetTls>,
    /// Where other hubs' peers are.
    pub(crate) route: Arc<dyn Route>,
}

/// Mutual TLS between the hubs of a fleet: every hub's certificate is signed by the fleet's
/// CA (`share hub --fleet-ca`).
#[derive(Clone)]
pub(crate) struct FleetTls {
    /// Serves the fleet listener with this hub's certificate, requiring a client certificate
    /// signed by the fleet's CA.
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    /// Dials the other hubs: presents this hub's certificate and trusts only the fleet's CA.
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl FleetTls {
    /// Mutual TLS with this hub's certificate chain `cert` and key `key`, and the fleet's CA
    /// certificates `fleet_ca`.
    pub(crate) fn from_pem(
        cert: &std::path::Path,
        key: &std::path::Path,
        fleet_ca: &std::path::Path,
    ) -> Result<FleetTls, tls::TlsError> {
        let server = tls::server_config(cert, key, Some(fleet_ca))?;
        let client = tls::client_config(fleet_ca, Some((cert, key)))?;
        Ok(FleetTls {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            connector: tokio_rustls::TlsConnector::from(client),
        })
    }
}

/// How a hub presents itself to another hub's fleet listener.
#[derive(Clone, Copy)]
pub(crate) struct Credentials<'a> {
    /// The fleet's shared secret, if it has one.
    pub(crate) token: Option<&'a Token>,
    /// The mutual TLS connector, if the fleet uses TLS.
    pub(crate) tls: Option<&'a tokio_rustls::TlsConnector>,
}

/// Why a link to another hub could not be made.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// The TCP connection failed.
    #[error("could not connect to {addr}: {cause}")]
    Connect {
        /// The hub's fleet address.
        addr: String,
        /// What failed.
        cause: std::io::Error,
    },
    /// The dial took longer than [`LINK_DIAL_TIMEOUT`].
    #[error("{addr} did not finish the hub-to-hub hello within {LINK_DIAL_TIMEOUT:?}")]
    Timeout {
        /// The hub's fleet address.
        addr: String,
    },
    /// The other side refused this hub's hello (typically: the fleet tokens differ).
    #[error("{addr} refused this hub: {cause}")]
    Refused {
        /// The hub's fleet address.
        addr: String,
        /// Its answer.
        cause: AuthError,
    },
    /// The other side does not serve the hub-to-hub channels: not a fleet listener.
    #[error("{addr} is not a hub's fleet listener: {cause}")]
    NotFleet {
        /// The address.
        addr: String,
        /// What the mux said.
        cause: mux::Error,
    },
    /// Mutual TLS with the other hub failed.
    #[error("mutual TLS with {addr} failed: {why}")]
    Tls {
        /// The hub's fleet address.
        addr: String,
        /// Who did not trust whom, in plain words.
        why: String,
        /// Whether a certificate was refused (a configuration to fix), rather than the link
        /// breaking during the handshake.
        refused: bool,
    },
}

/// A failed TLS exchange with the fleet listener at `addr`, in plain words, and whether a
/// certificate was refused (as opposed to the link breaking).
fn explain_fleet_tls(addr: &str, e: &std::io::Error) -> (String, bool) {
    use rustls::AlertDescription as A;
    use std::io::ErrorKind::{ConnectionReset, UnexpectedEof};
    match tls::rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(why)) => (
            format!(
                "this hub does not trust the certificate of the hub at {addr} ({why:?}): it \
                 must be signed by the fleet's CA (--fleet-ca) and name the host {}",
                tls::host_of(addr)
            ),
            true,
        ),
        Some(rustls::Error::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied
            | A::DecryptError,
        )) => (
            format!(
                "the hub at {addr} does not trust this hub's certificate: every hub's \
                 --tls-cert must be signed by the CA the others were given with --fleet-ca"
            ),
            true,
        ),
        Some(other) => (format!("the TLS exchange failed: {other}"), true),
        None if matches!(e.kind(), UnexpectedEof | ConnectionReset) => (
            format!(
                "the hub at {addr} hung up during the TLS handshake; its fleet listener may \
                 be plaintext (every hub of a fleet needs --fleet-ca, or none does)"
            ),
            false,
        ),
        None => (format!("the TLS handshake failed: {e}"), false),
    }
}

/// A hub's links to the other hubs: one per hub-to-hub address, each dialed on first use.
pub(super) struct Links {
    // A std mutex around the map (never held across `.await`); each link's tokio mutex is
    // held across its dial, so that concurrent first calls dial once.
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Link>>>>>,
}

/// One live link to another hub.
struct Link {
    /// Kept so the session lives as long as the link.
    session: Session,
    client: RelayClient,
    /// Stream window of the reads routed over it.
    window: u32,
}

impl Links {
    /// No links yet.
    pub(super) fn new() -> Links {
        Links {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Option<Link>>>>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Links currently up.
    #[cfg(test)]
    pub(super) fn live(&self) -> usize {
        self.lock()
            .values()
            .filter(|l| {
                l.try_lock()
                    .map(|l| l.as_ref().is_some_and(|l| !l.client.client().is_closed()))
                    .unwrap_or(true)
            })
            .count()
    }
}

/// Dials the fleet listener at `addr`: TCP, the TLS handshake if the fleet uses TLS, a client
/// mux session, the hub-to-hub hello with the fleet's token (if any), and the relay channel,
/// all within [`LINK_DIAL_TIMEOUT`]. Returns the session, the service's client, and the
/// hello's round trip.
pub(crate) async fn dial_hub(
    addr: &str,
    credentials: Credentials<'_>,
    config: mux::Config,
) -> Result<(Session, RelayClient, Duration), LinkError> {
    let tls_failed = |e: &std::io::Error| {
        let (why, refused) = explain_fleet_tls(addr, e);
        LinkError::Tls {
            addr: addr.to_owned(),
            why,
            refused,
        }
    };
    let dial = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|cause| LinkError::Connect {
                addr: addr.to_owned(),
                cause,
            })?;
        let _ = tcp.set_nodelay(true);
        let session = match credentials.tls {
            None => Session::client(tcp, config),
            Some(connector) => {
                let name = tls::server_name(addr, None).map_err(|e| LinkError::Tls {
                    addr: addr.to_owned(),
                    why: e.to_string(),
                    refused: true,
                })?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| tls_failed(&e))?;
                Session::client(stream, config)
            }
        };
        let refused_by_tls = || refused_by_tls(&session, credentials.tls.is_some(), addr);
        let not_fleet = |cause| LinkError::NotFleet {
            addr: addr.to_owned(),
            cause,
        };
        let mut hello = match session.dial(FLEET_HELLO).await {
            Ok(hello) => hello,
            Err(e) => return Err(refused_by_tls().await.unwrap_or_else(|| not_fleet(e))),
        };
        let start = Instant::now();
        let token = credentials.token.map(Token::secret);
        if let Err(cause) = auth::client_hello(&mut hello, token).await {
            if matches!(cause, AuthError::Io(_)) {
                if let Some(e) = refused_by_tls().await {
                    return Err(e);
                }
            }
            return Err(LinkError::Refused {
                addr: addr.to_owned(),
                cause,
            });
        }
        let rtt = start.elapsed();
        drop(hello);
        let ch = match session.dial(RELAY_CHANNEL).await {
            Ok(ch) => ch,
            Err(e) => return Err(refused_by_tls().await.unwrap_or_else(|| not_fleet(e))),
        };
        let client = RelayClient::new(rpc::Client::with_config(
            ch,
            rpc::Config::default().max_message_size(MAX_MESSAGE),
        ));
        Ok((session, client, rtt))
    };
    tokio::time::timeout(LINK_DIAL_TIMEOUT, dial)
        .await
        .map_err(|_| LinkError::Timeout {
            addr: addr.to_owned(),
        })?
}

/// Under TLS 1.3 a refused client certificate shows only after the handshake, as the
/// session's end: when a TLS `session` to `addr` ended that way, who refused whom (rather than
/// how the hello failed). Waits at most a second for the session to end.
async fn refused_by_tls(session: &Session, tls: bool, addr: &str) -> Option<LinkError> {
    if !tls {
        return None;
    }
    let ended = tokio::time::timeout(Duration::from_secs(1), session.closed()).await;
    match ended {
        Ok(mux::CloseReason::Io(e)) if tls::rustls_error(&e).is_some() => {
            let (why, refused) = explain_fleet_tls(addr, &e);
            Some(LinkError::Tls {
                addr: addr.to_owned(),
                why,
                refused,
            })
        }
        _ => None,
    }
}

/// What a reader is told when the link to the hub holding `name` could not be made.
fn link_failed(name: &str, remote: &RemoteHub, e: &LinkError) -> Status {
    match e {
        LinkError::Refused { .. }
        | LinkError::NotFleet { .. }
        | LinkError::Tls { refused: true, .. } => {
            warn!(hub = %remote.id, "hub-to-hub link refused: {e}");
            Status::internal(format!(
                "the hub holding {name:?} ({}) cannot be reached from this hub: {e}",
                remote.id
            ))
        }
        LinkError::Connect { .. }
        | LinkError::Timeout { .. }
        | LinkError::Tls { refused: false, .. } => {
            debug!(hub = %remote.id, "hub-to-hub link failed: {e}");
            hub_gone(name, format!("hub {}: {e}", remote.id))
        }
    }
}

/// Rewrites a status from the hub holding `name`: a lost link becomes "the hub holding
/// `name` is gone"; everything else is that hub's own answer, passed on as it is.
fn from_hub(name: &str, remote: &RemoteHub, s: Status) -> Status {
    if s.is_conn_lost() {
        hub_gone(name, format!("hub {}: {}", remote.id, s.message()))
    } else {
        s
    }
}

/// Checks the `reader` a `Relay` call names: a peer name, `@`, a hub id.
fn check_reader(reader: &str) -> Result<(), Status> {
    let ok = reader.len() <= MAX_READER_LEN
        && reader
            .split_once('@')
            .is_some_and(|(name, hub)| validate_name(name).is_ok() && !hub.is_empty());
    if ok && !reader.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "reader {reader:?} is not NAME@HUB"
        )))
    }
}

impl HubState {
    /// The hub that holds `name`, when this hub is part of a fleet and another hub holds it.
    pub(super) fn remote_holder(&self, name: &str) -> Option<RemoteHub> {
        self.opts.fleet.as_ref()?.route.remote(name)
    }

    /// Links to other hubs currently up.
    #[cfg(test)]
    pub(crate) fn live_links(&self) -> usize {
        self.links.live()
    }

    /// The link to `remote`, dialed if there is none or it has ended; and its reads' window.
    async fn link(&self, remote: &RemoteHub, name: &str) -> Result<(RelayClient, u32), Status> {
        let Some(fleet) = &self.opts.fleet else {
            return Err(Status::internal("this hub is not part of a fleet"));
        };
        let slot = {
            let mut map = self.links.lock();
            if !map.contains_key(&remote.addr) && map.len() >= MAX_LINKS {
                // Forget links that have ended (and are not being dialed).
                map.retain(|_, l| {
                    l.try_lock()
                        .map(|l| l.as_ref().is_some_and(|l| !l.client.client().is_closed()))
                        .unwrap_or(true)
                });
                if map.len() >= MAX_LINKS {
                    return Err(Status::resource_exhausted(format!(
                        "this hub already keeps links to {MAX_LINKS} other hubs"
                    )));
                }
            }
            map.entry(remote.addr.clone()).or_default().clone()
        };
        let mut link = slot.lock().await;
        if let Some(l) = &*link {
            if !l.client.client().is_closed() && !l.session.is_closed() {
                return Ok((l.client.clone(), l.window));
            }
            debug!(hub = %remote.id, "the link to the hub has ended: dialing it again");
        }
        let credentials = Credentials {
            token: fleet.token.as_ref(),
            tls: fleet.tls.as_ref().map(|t| &t.connector),
        };
        let (session, client, rtt) = dial_hub(&remote.addr, credentials, self.opts.mux.clone())
            .await
            .map_err(|e| link_failed(name, remote, &e))?;
        let window = window_for(&self.opts, rtt).min(MAX_RELAY_WINDOW);
        info!(hub = %remote.id, addr = %remote.addr, ?rtt, window, "hub-to-hub link up");
        *link = Some(Link {
            session,
            client: client.clone(),
            window,
        });
        Ok((client, window))
    }

    /// How long a routed `ls`/`stat` (or a routed read's first answer) may take: the holding
    /// hub's own bounds (a slot, then the exporter's answer) and some slack.
    fn relay_timeout(&self) -> Duration {
        self.opts.busy_wait + self.opts.peer_timeout + LINK_DIAL_TIMEOUT
    }

    /// `Hub.ls` of peer `name` held by `remote`, for `reader` (holding `mine`).
    pub(super) async fn relay_ls(
        &self,
        remote: &RemoteHub,
        reader: &str,
        mine: ReaderSlot,
        name: String,
        path: String,
    ) -> Result<Listing, Status> {
        let _mine = mine;
        let (client, _) = self.link(remote, &name).await?;
        let req = RelayPath {
            reader: self.routed_reader(reader),
            peer: name.clone(),
            path,
        };
        let options = CallOptions::default().timeout(self.relay_timeout());
        (client.with_options(options).ls(req).await).map_err(|s| from_hub(&name, remote, s))
    }

    /// `Hub.stat` of peer `name` held by `remote`, for `reader` (holding `mine`).
    pub(super) async fn relay_stat(
        &self,
        remote: &RemoteHub,
        reader: &str,
        mine: ReaderSlot,
        name: String,
        path: String,
    ) -> Result<Entry, Status> {
        let _mine = mine;
        let (client, _) = self.link(remote, &name).await?;
        let req = RelayPath {
            reader: self.routed_reader(reader),
            peer: name.clone(),
            path,
        };
        let options = CallOptions::default().timeout(self.relay_timeout());
        (client.with_options(options).stat(req).await).map_err(|s| from_hub(&name, remote, s))
    }

    /// `Hub.read` of `req` for `reader` (holding `mine`), routed to `remote`, which holds the
    /// peer: the chunks are passed on as they arrive, within the call's stream window.
    pub(super) async fn relay_read(
        &self,
        remote: &RemoteHub,
        reader: &str,
        mine: ReaderSlot,
        req: PeerRead,
    ) -> Result<ItemStream<Chunk>, Status> {
        let name = req.peer.clone();
        let (client, window) = self.link(remote, &name).await?;
        info!(%reader, peer = %name, hub = %remote.id, path = %req.path, window, "read routed to another hub");
        let client = client.with_options(CallOptions::default().stream_window(window));
        let call = client.read(RelayRead {
            reader: self.routed_reader(reader),
            peer: req.peer,
            path: req.path,
            offset: req.offset,
        });
        let limit = self.relay_timeout();
        let upstream = match tokio::time::timeout(limit, call).await {
            Ok(Ok(up)) => up,
            Ok(Err(s)) => return Err(from_hub(&name, remote, s)),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "the hub holding {name:?} ({}) did not answer within {limit:?}",
                    remote.id
                )))
            }
        };
        let state = Routed {
            up: Box::pin(upstream),
            name,
            remote: remote.clone(),
            done: false,
            _mine: mine,
        };
        let routed = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let item = match st.up.next().await {
                Some(Ok(chunk)) => {
                    st.done = chunk.eof;
                    Ok(chunk)
                }
                Some(Err(s)) => {
                    st.done = true;
                    Err(from_hub(&st.name, &st.remote, s))
                }
                None => {
                    st.done = true;
                    Err(hub_gone(
                        &st.name,
                        format!("hub {}: the transfer was cut short", st.remote.id),
                    ))
                }
            };
            Some((item, st))
        });
        Ok(Box::pin(routed))
    }

    /// `reader` as the other hub names it: `NAME@THIS-HUB`.
    fn routed_reader(&self, reader: &str) -> String {
        let id = self.opts.fleet.as_ref().map_or("?", |f| f.hub_id.as_str());
        format!("{reader}@{id}")
    }

    /// Serves the fleet listener until [`HubState::shutdown`]: each accepted connection is a
    /// hub-to-hub session (see the [module](self) docs), at most [`MAX_FLEET_SESSIONS`] at
    /// once. Returns once every session has closed. Does nothing for a hub without
    /// [`FleetOptions`].
    pub(crate) async fn serve_fleet(self: Arc<Self>, listener: TcpListener) {
        if self.opts.fleet.is_none() {
            return warn!("no fleet options: the fleet listener is not served");
        }
        let seats = Arc::new(Semaphore::new(MAX_FLEET_SESSIONS));
        let mut sessions = JoinSet::new();
        // Bounded: one iteration per accepted connection; finished sessions are reaped.
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        let Ok(seat) = seats.clone().try_acquire_owned() else {
                            if let Some(more) = self.refusal_log.allow() {
                                warn!(%addr, more_since_last_line = more, limit = MAX_FLEET_SESSIONS,
                                    "refusing a hub-to-hub connection: too many sessions");
                            }
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        let span = tracing::info_span!("hub-link", id, %addr);
                        sessions.spawn(self.clone().fleet_session(tcp, id, seat).instrument(span));
                    }
                    Err(e) => {
                        warn!("fleet listener: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                () = self.stop.cancelled() => break,
            }
        }
        drop(listener);
        // Bounded: each session closes within its grace once the hub stops.
        while sessions.join_next().await.is_some() {}
    }

    /// The mutual TLS handshake of a connection to a fleet listener that requires it, and
    /// its mux session; `None` if the handshake failed, the hub stopped, or the connection
    /// is plaintext (it is then told, in its hello, that mutual TLS is required, or, for a
    /// client, that this listener serves hubs only). Bounded by `deadline`.
    async fn accept_fleet_tls(
        &self,
        tcp: TcpStream,
        acceptor: &tokio_rustls::TlsAcceptor,
        deadline: Instant,
    ) -> Option<Session> {
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => peeked,
            () = self.stop.cancelled() => return None,
        };
        if !matches!(peeked, Ok(Ok(1))) {
            return None;
        }
        if first[0] != super::TLS_HANDSHAKE_RECORD {
            if let Some(more) = self.early_log.allow() {
                warn!(
                    more_since_last_line = more,
                    "hub-to-hub session refused: plaintext, and this fleet listener requires \
                     mutual TLS"
                );
            }
            let session = Session::server(tcp, self.opts.mux.clone().max_channels(2));
            let refuse = async {
                let mut fleet_hello = session.listen(FLEET_HELLO)?;
                let mut client_hello = session.listen(auth::CHANNEL)?;
                let (mut ch, refusal) = tokio::select! {
                    ch = fleet_hello.accept() => (ch?, auth::Refusal::FleetTlsRequired),
                    ch = client_hello.accept() => (ch?, auth::Refusal::HubToHubOnly),
                };
                auth::server_refuse(&mut ch, refusal).await?;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut ch).await;
                anyhow::Ok(())
            };
            let limit = deadline.min(Instant::now() + super::REFUSAL_TIME);
            tokio::select! {
                done = tokio::time::timeout_at(limit, refuse) => {
                    if let Ok(Err(e)) = done {
                        debug!("could not tell a plaintext peer it is refused: {e:#}");
                    }
                }
                () = self.stop.cancelled() => {}
            }
            session.close().await;
            return None;
        }
        let limit = deadline.min(Instant::now() + tls::HANDSHAKE_TIMEOUT);
        let done = tokio::select! {
            done = tokio::time::timeout_at(limit, acceptor.accept(tcp)) => done,
            () = self.stop.cancelled() => return None,
        };
        match done {
            Ok(Ok(stream)) => Some(Session::server(stream, self.opts.mux.clone())),
            Ok(Err(e)) => {
                if let Some(more) = self.early_log.allow() {
                    let why = match tls::rustls_error(&e) {
                        Some(rustls::Error::NoCertificatesPresented) => {
                            "the peer presented no certificate (a client, or a hub without \
                             --fleet-ca)"
                                .to_owned()
                        }
                        Some(rustls::Error::InvalidCertificate(why)) => format!(
                            "the peer's certificate is not signed by the fleet's CA ({why:?})"
                        ),
                        _ => e.to_string(),
                    };
                    warn!(
                        more_since_last_line = more,
                        "hub-to-hub session refused: {why}"
                    );
                }
                None
            }
            Err(_) => {
                if let Some(more) = self.early_log.allow() {
                    warn!(
                        more_since_last_line = more,
                        "hub-to-hub session refused: no TLS handshake within {limit:?}",
                        limit = tls::HANDSHAKE_TIMEOUT
                    );
                }
                None
            }
        }
    }

    /// Serves one hub-to-hub session: the hello (or a client's refusal), then `Relay` until
    /// the session ends or the hub stops.
    async fn fleet_session(
        self: Arc<Self>,
        tcp: TcpStream,
        id: ConnId,
        _seat: OwnedSemaphorePermit,
    ) {
        let Some(fleet) = self.opts.fleet.clone() else {
            return;
        };
        let deadline = Instant::now() + self.opts.hello_timeout;
        let session = match &fleet.tls {
            None => Session::server(tcp, self.opts.mux.clone()),
            Some(t) => match self.accept_fleet_tls(tcp, &t.acceptor, deadline).await {
                Some(session) => session,
                None => return,
            },
        };
        let hello = async {
            let mut fleet_hello = session.listen(FLEET_HELLO)?;
            let mut client_hello = session.listen(auth::CHANNEL)?;
            tokio::select! {
                ch = fleet_hello.accept() => {
                    let mut ch = ch?;
                    drop((fleet_hello, client_hello));
                    let mut relay = None;
                    let verdict = auth::server_hello(&mut ch, fleet.token.as_ref(), || {
                        relay = Some(session.listen(RELAY_CHANNEL).map_err(|e| e.to_string())?);
                        Ok(())
                    })
                    .await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut ch).await;
                    verdict?;
                    relay.ok_or_else(|| anyhow::anyhow!("no relay listener after the hello"))
                }
                ch = client_hello.accept() => {
                    let mut ch = ch?;
                    drop((fleet_hello, client_hello));
                    auth::server_refuse(&mut ch, auth::Refusal::HubToHubOnly).await?;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut ch).await;
                    Err(anyhow::anyhow!("a client dialed the hub-to-hub listener; told it to use the client address"))
                }
            }
        };
        let relay = tokio::select! {
            done = tokio::time::timeout_at(deadline, hello) => match done {
                Ok(Ok(relay)) => relay,
                Ok(Err(e)) => {
                    if let Some(more) = self.early_log.allow() {
                        warn!(more_since_last_line = more, "hub-to-hub session refused: {e:#}");
                    }
                    session.close().await;
                    return;
                }
                Err(_) => {
                    if let Some(more) = self.early_log.allow() {
                        warn!(more_since_last_line = more, "hub-to-hub session refused: no hello within {:?}", self.opts.hello_timeout);
                    }
                    session.close().await;
                    return;
                }
            },
            () = self.stop.cancelled() => {
                session.close().await;
                return;
            }
        };
        info!("hub-to-hub session up");
        let mut server = rpc::Server::with_config(
            rpc::Config::default()
                .max_message_size(MAX_MESSAGE)
                .max_in_flight(4096),
        );
        server.add(
            RelayService {
                hub: self.clone(),
                session: id,
                reads: Arc::new(Mutex::new(HashMap::new())),
            }
            .into_service(),
        );
        tokio::select! {
            () = server.serve_all(relay) => {}
            () = self.stop.cancelled() => {}
        }
        session.close().await;
        info!("hub-to-hub session ended");
    }
}

/// A read routed to another hub, as its reader's stream sees it.
struct Routed {
    up: ItemStream<Chunk>,
    name: String,
    remote: RemoteHub,
    /// The eof chunk or an error has been passed on.
    done: bool,
    /// The reader's place for this exporter, held while the read lasts.
    _mine: ReaderSlot,
}

/// The [`Relay`] service as one hub-to-hub session sees it.
struct RelayService {
    hub: Arc<HubState>,
    /// The session's id (distinguishes its readers from another session's).
    session: ConnId,
    /// Calls in flight per routed reader and exporter.
    reads: ReaderCounts,
}

impl RelayService {
    /// The fairness identity of routed reader `reader`: stable for the session's life, apart
    /// from every local connection's (the top bit is set).
    fn conn_of(&self, reader: &str) -> ConnId {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.session, reader).hash(&mut h);
        h.finish() | (1 << 63)
    }

    /// A place for `reader`'s call to exporter `peer`.
    fn place(&self, reader: &str, peer: &str) -> Result<ReaderSlot, Status> {
        check_reader(reader)?;
        reader_slot(
            &self.hub.opts,
            &self.reads,
            format!("{reader}\n{peer}"),
            peer,
        )
    }
}

impl Relay for RelayService {
    async fn ls(&self, _ctx: Context, req: RelayPath) -> Result<Listing, Status> {
        let RelayPath { reader, peer, path } = req;
        let mine = self.place(&reader, &peer)?;
        let handle = self.hub.peer_for_fleet(&peer)?;
        let conn = self.conn_of(&reader);
        let call = |export: crate::proto::ExportClient| async move { export.ls(path).await };
        (self.hub)
            .forward_call(reader, conn, mine, &peer, handle, call)
            .await
    }

    async fn stat(&self, _ctx: Context, req: RelayPath) -> Result<Entry, Status> {
        let RelayPath { reader, peer, path } = req;
        let mine = self.place(&reader, &peer)?;
        let handle = self.hub.peer_for_fleet(&peer)?;
        let conn = self.conn_of(&reader);
        let call = |export: crate::proto::ExportClient| async move { export.stat(path).await };
        (self.hub)
            .forward_call(reader, conn, mine, &peer, handle, call)
            .await
    }

    async fn read(&self, ctx: Context, req: RelayRead) -> Result<ItemStream<Chunk>, Status> {
        let RelayRead {
            reader,
            peer,
            path,
            offset,
        } = req;
        check_offset(offset)?;
        let mine = self.place(&reader, &peer)?;
        let handle = self.hub.peer_for_fleet(&peer)?;
        let conn = self.conn_of(&reader);
        let req = PeerRead { peer, path, offset };
        (self.hub)
            .forward_read(reader, conn, mine, handle, ctx, req)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_must_be_name_at_hub() {
        for ok in ["alice@hub-a", "ünï@h"] {
            check_reader(ok).unwrap();
        }
        for bad in [
            "alice",
            "@hub",
            "alice@",
            "a b@h",
            "a@h\n",
            &"x".repeat(200),
        ] {
            let s = check_reader(bad).unwrap_err();
            assert_eq!(s.code(), rpc::Code::InvalidArgument, "{bad:?}");
        }
    }
}
