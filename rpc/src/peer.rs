//! [`Peer`]: both directions of RPC over one mux session.

use std::{fmt, sync::Arc, time::Duration};

use netchan_mux::Session;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{client::Client, config::Config, context::Origin, server::Server};

/// The mux channel name both sides of a [`Peer`] listen on and dial.
pub const PEER_CHANNEL: &str = "netchan-rpc/peer";

/// Longest pause between two dials while the other side has not set up
/// its `Peer` yet.
const MAX_DIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Why [`Peer::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The session refused the peer channel (closed, name in use, too many
    /// channels).
    #[error("could not open the rpc peer channel {name:?}: {error}")]
    Mux {
        /// The channel name, [`PEER_CHANNEL`].
        name: &'static str,
        /// What the session said (shown in the message, so not also a `source`).
        error: netchan_mux::Error,
    },
    /// The other side did not set up its `Peer` in time.
    #[error("the other side set up no rpc peer within {after:?}")]
    Timeout {
        /// The wait: the server's [`Config::handshake_timeout`](crate::Config::handshake_timeout).
        after: Duration,
    },
}

/// One end of a bidirectional RPC link: over one mux [`Session`], it serves
/// a set of services to the other side and holds a [`Client`] to the other
/// side's services. Both ends are peers: each calls [`Peer::connect`] with
/// its own [`Server`].
///
/// Inside a handler served by a peer, [`Context::callback`](crate::Context::callback)
/// is a client to the side that made the call, so a hub can call back the
/// very client whose call it is serving — also when that client is behind
/// a NAT and only it could open the connection.
///
/// Cheap to clone. **Keep a clone for as long as this side should serve:**
/// when the last clone is dropped, this side stops serving at once, so the
/// other side's calls to it (and callbacks from the other side's handlers)
/// fail with `Unavailable`, even while clones of [`Peer::client`] still
/// call the other side. The session itself lives on while other handles to
/// it do.
///
/// ```
/// use netchan_mux::{Config as MuxConfig, Session};
/// use netchan_rpc::{Peer, Server, ServiceDef, Status};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (a, b) = tokio::io::duplex(64 << 10);
/// let (near, far) = (Session::client(a, MuxConfig::default()), Session::server(b, MuxConfig::default()));
///
/// // The far side serves `Far.name` and, inside it, calls the caller back.
/// let mut far_server = Server::new();
/// far_server.add(ServiceDef::new("Far").unary("greet", |ctx, ()| async move {
///     let name: String = ctx.callback()?.call("Near.name", &()).await?;
///     Ok(format!("hello, {name}"))
/// }));
/// let mut near_server = Server::new();
/// near_server.add(ServiceDef::new("Near").unary("name", |_ctx, ()| async move {
///     Ok::<_, Status>("ada".to_string())
/// }));
///
/// let (near, _far) = tokio::try_join!(
///     Peer::connect(&near, near_server),
///     Peer::connect(&far, far_server),
/// )?;
/// let greeting: String = near.client().call("Far.greet", &()).await?;
/// assert_eq!(greeting, "hello, ada");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use = "dropping the last Peer clone stops serving and closes its client"]
pub struct Peer {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    client: Client,
    /// Serves the other side's calls; aborted with the last handle.
    serving: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("client", &self.inner.client)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Sets up both directions over `session`: serves `server` to the other
    /// side and connects a client to the other side's `Peer`. Both sides
    /// call it, in any order; it resolves once both directions are up.
    ///
    /// Ordering: each side listens on [`PEER_CHANNEL`] *before* it dials the
    /// other's, so whichever side comes second finds the first listening.
    /// The side that comes first finds nobody listening yet and dials again
    /// (backing off up to 100 ms) until the other side listens, for at most
    /// the server's [`Config::handshake_timeout`](crate::Config::handshake_timeout)
    /// (default 10 s): then [`PeerError::Timeout`]. One `Peer` per session
    /// (the channel name is taken while connecting).
    ///
    /// Settings: `server`'s [`Config`] governs both halves here, serving
    /// the other side's calls and this side's client to it;
    /// [`Peer::connect_with`] gives the client its own.
    ///
    /// Not cancel-safe: a dropped `connect` abandons the half-built link,
    /// and the other side's `connect` times out.
    pub async fn connect(session: &Session, server: Server) -> Result<Peer, PeerError> {
        let client = server.config().clone();
        Peer::connect_with(session, server, client).await
    }

    /// [`Peer::connect`], with `client` as the settings of this side's
    /// client to the other side. Which settings apply where:
    ///
    /// - `server.config()` governs serving the other side's calls (the limits
    ///   on its requests: `max_in_flight`, `max_in_flight_bytes`,
    ///   `max_outbound_bytes`; the message size it accepts and announces on
    ///   that conn; timeouts there), and bounds the wait for the other side
    ///   to set up its `Peer` (`handshake_timeout`);
    /// - `client` governs this side's calls (the message size it accepts and
    ///   announces on its conn, `stream_window`, `write_queue_bytes`, the
    ///   frame, handshake and write-stall timeouts there).
    ///
    /// Not cancel-safe, as [`Peer::connect`].
    pub async fn connect_with(
        session: &Session,
        server: Server,
        client: Config,
    ) -> Result<Peer, PeerError> {
        let mux = |error| PeerError::Mux {
            name: PEER_CHANNEL,
            error,
        };
        let mut listener = session.listen(PEER_CHANNEL).map_err(mux)?;
        let after = server.config().handshake_timeout;
        let dial = async {
            let mut backoff = Duration::from_millis(1);
            loop {
                match session.dial(PEER_CHANNEL).await {
                    Err(netchan_mux::Error::NoListener { .. }) => {
                        // The other side has not listened yet.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_DIAL_BACKOFF);
                    }
                    res => return res,
                }
            }
        };
        let (outgoing, incoming) =
            tokio::time::timeout(after, futures::future::try_join(dial, listener.accept()))
                .await
                .map_err(|_| PeerError::Timeout { after })?
                .map_err(mux)?;
        // Frees the name; a later dial to it is refused.
        drop(listener);

        let client = Client::with_config(outgoing, client);
        let origin = Origin {
            label: Some(Arc::from("peer")),
            callback: Some(client.downgrade()),
            ..Origin::default()
        };
        let serving = tokio::spawn(async move {
            if let Err(e) = server
                .serve_conn(incoming, origin, CancellationToken::new())
                .await
            {
                tracing::debug!(error = %crate::error::chain(&e), "rpc peer conn ended");
            }
        });
        Ok(Peer {
            inner: Arc::new(Inner {
                session: session.clone(),
                client,
                serving,
            }),
        })
    }

    /// The client to the other side's services; wrap it in a typed client
    /// (`RemoteClient::new(peer.client().clone())`).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The session the peer runs on.
    pub fn session(&self) -> &Session {
        &self.inner.session
    }

    /// Resolves when the link to the other side is gone (its conn or the
    /// session ended). Cancel-safe.
    pub async fn closed(&self) {
        self.inner.client.closed().await
    }
}
