//! One connection's life at the hub: the hello, the rpc peer link, the publish deadline, and
//! the departure that frees its name (see the [parent module](super) for the rules).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use netchan_mux::{self as mux, Session};
use netchan_rpc::{self as rpc, Status};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::admission::Pending;
use super::registry::ConnId;
use super::service::HubService;
use super::{HubState, EXPORT_DIAL_TIMEOUT, MAX_MESSAGE};
use crate::auth;
use crate::proto::{Hub as _, EXPORT_CHANNEL};

impl HubState {
    /// Serves one client connection over `io` (any byte stream) until it ends, with the
    /// default hello deadline from now and no admission slot (tests drive the hub this way).
    #[cfg(test)]
    pub(crate) async fn serve_io<T>(self: Arc<Self>, io: T, id: ConnId, label: String)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let deadline = Instant::now() + self.opts.hello_timeout;
        self.serve_conn(io, id, label, None, deadline).await;
    }

    /// Serves one client connection over `io` (any byte stream) until it ends. The hello must
    /// be done by `deadline`; `pending` is released once the connection has published.
    pub(super) async fn serve_conn<T>(
        self: Arc<Self>,
        io: T,
        id: ConnId,
        label: String,
        pending: Option<Pending>,
        deadline: Instant,
    ) where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shed = pending
            .as_ref()
            .map_or_else(CancellationToken::new, Pending::shed);
        let session = Session::server(io, self.opts.mux.clone());
        let hello = tokio::select! {
            hello = self.hello(&session, deadline) => hello,
            () = self.stop.cancelled() => Err(anyhow::anyhow!("the hub is shutting down")),
            () = shed.cancelled() => Err(anyhow::anyhow!("shed to make room for a newer connection")),
        };
        match hello {
            Ok(()) => {}
            Err(e) => {
                if let Some(more) = self.early_log.allow() {
                    warn!(
                        more_since_last_line = more,
                        "refused before publishing: {e:#}"
                    );
                }
                // Let the refusal reach the client before the link goes.
                session.close().await;
                return;
            }
        };
        debug!("hello ok");
        let conn = Arc::new(ConnState {
            id,
            label: label.clone(),
            session: session.clone(),
            hub: self.clone(),
            published: tokio::sync::Mutex::new(Published::No),
            is_published: AtomicBool::new(false),
            publish_deadline: Instant::now() + self.opts.publish_timeout,
            pending: Mutex::new(pending),
            shed,
            seat: Mutex::new(None),
            reads: Mutex::new(HashMap::new()),
        });
        // A client gets at most this many calls running at once on its peer link: plenty for a
        // REPL, a bound against floods. Requests are small (a name, a path); replies can be
        // `ls` listings of up to 3 MiB, and a client that does not read them may leave at most
        // 8 MiB waiting until the write-stall bound (rpc default, 30 s) ends the link. The
        // hub's calls to the client's export (`ls`/`stat`) use the same settings.
        let mut server = rpc::Server::with_config(
            rpc::Config::default()
                .max_in_flight(64)
                .max_in_flight_bytes(1 << 20)
                .max_outbound_bytes(8 << 20)
                .max_message_size(MAX_MESSAGE),
        );
        server.add(HubService(conn.clone()).into_service());
        // Both directions over the session, set up by the publish deadline at the latest.
        let peer = tokio::select! {
            peer = tokio::time::timeout_at(
                conn.publish_deadline,
                rpc::Peer::connect(&session, server),
            ) => peer,
            () = self.stop.cancelled() => {
                session.close().await;
                return;
            }
            () = conn.shed.cancelled() => {
                debug!("shed before its rpc link was up");
                session.close().await;
                return;
            }
        };
        let peer = match peer {
            Ok(Ok(peer)) => peer,
            Ok(Err(e)) => {
                warn!("refused: no rpc peer link: {e}");
                session.close().await;
                return;
            }
            Err(_) => {
                let after = self.opts.publish_timeout;
                warn!(
                    ?after,
                    "refused: no rpc peer link within the publish deadline"
                );
                session.close().await;
                return;
            }
        };
        let reason = watch_conn(&conn).await;
        drop(peer);
        let mut published = conn.published.lock().await;
        if let Published::As(name) = &*published {
            if self.peers.remove(name, id) {
                // Bounded by the directory's call timeout; if it fails, the directory removes
                // the key itself once it can (or it expires with this hub's lease).
                if let Err(e) = self.directory.release(name).await {
                    warn!(peer = %name, "could not release the name in the fleet's directory: {e}");
                }
                self.changed();
                if reason.is_error() {
                    info!(peer = %name, "left: {reason}");
                } else {
                    info!(peer = %name, "left");
                }
            }
        } else {
            debug!("connection ended before publishing: {reason}");
        }
        *published = Published::Gone;
    }

    /// Runs the hello exchange, all of it by `deadline`; on success the rpc peer link may be
    /// set up.
    async fn hello(&self, session: &Session, deadline: Instant) -> anyhow::Result<()> {
        let exchange = async {
            let mut hello = session.listen(auth::CHANNEL)?;
            let mut ch = hello.accept().await?;
            drop(hello);
            let verdict = auth::server_hello(&mut ch, self.opts.token.as_ref(), || Ok(())).await;
            // End with FIN, never a reset: some yamux implementations drop unread data on RST.
            // Bounded by the hello deadline around this block.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut ch).await;
            verdict?;
            anyhow::Ok(())
        };
        let limit = self.opts.hello_timeout;
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no hello within {limit:?} of connecting"))?
    }
}

/// Waits for the connection's session to end; returns why it ended. Closes the session
/// gracefully itself when the hub shuts down, or when the connection has not published by
/// its publish deadline (whatever a publish in progress is doing).
async fn watch_conn(conn: &ConnState) -> mux::CloseReason {
    let session = &conn.session;
    let stop = &conn.hub.stop;
    let publish_deadline = tokio::time::sleep_until(conn.publish_deadline);
    tokio::pin!(publish_deadline);
    let mut awaiting_publish = true;
    // Bounded: the publish deadline fires at most once; every other branch returns.
    loop {
        tokio::select! {
            reason = session.closed() => return reason,
            () = stop.cancelled() => {
                debug!("closing the session: the hub is shutting down");
                session.close().await;
                return session.closed().await;
            }
            () = conn.shed.cancelled(), if awaiting_publish => {
                awaiting_publish = false;
                if !conn.is_published.load(Ordering::SeqCst) {
                    debug!("closing: shed to make room for a newer connection");
                    session.close().await;
                    return session.closed().await;
                }
            }
            () = &mut publish_deadline, if awaiting_publish => {
                awaiting_publish = false;
                if !conn.is_published.load(Ordering::SeqCst) {
                    let after = conn.hub.opts.publish_timeout;
                    if let Some(more) = conn.hub.early_log.allow() {
                        warn!(
                            ?after,
                            more_since_last_line = more,
                            "closing: the connection did not publish in time"
                        );
                    }
                    session.close().await;
                    return session.closed().await;
                }
            }
        }
    }
}

/// A connection's publish state.
pub(super) enum Published {
    /// Not yet.
    No,
    /// As this name.
    As(String),
    /// The connection has ended; publishing is no longer possible.
    Gone,
}

/// Per-connection state shared by that connection's service instances.
pub(super) struct ConnState {
    pub(super) id: ConnId,
    pub(super) label: String,
    pub(super) session: Session,
    pub(super) hub: Arc<HubState>,
    // A tokio mutex: held across the dial back to the client, so that publish and the
    // departure cleanup are ordered.
    pub(super) published: tokio::sync::Mutex<Published>,
    /// Set once published; read by the publish deadline without waiting for the lock.
    pub(super) is_published: AtomicBool,
    /// When the connection must have published.
    pub(super) publish_deadline: Instant,
    /// Its admission place, released when it publishes.
    pub(super) pending: Mutex<Option<Pending>>,
    /// Cancelled if admission sheds the connection before it has published.
    pub(super) shed: CancellationToken,
    /// Its seat among the published clients, taken by the publish.
    pub(super) seat: Mutex<Option<OwnedSemaphorePermit>>,
    /// Calls this connection has forwarded to each exporter right now.
    pub(super) reads: Mutex<HashMap<String, usize>>,
}

impl ConnState {
    /// The name this connection published; `FailedPrecondition` if it has not (only published
    /// peers may look at others: every reader is also a named, exporting peer).
    pub(super) async fn published_name(&self) -> Result<String, Status> {
        match &*self.published.lock().await {
            Published::As(name) => Ok(name.clone()),
            Published::No => Err(Status::failed_precondition(
                "publish first: this connection has not published a name",
            )),
            Published::Gone => Err(Status::unavailable("the connection is closing")),
        }
    }

    /// Opens a channel to this client's export service, by the publish deadline at the latest.
    pub(super) async fn dial_export(&self) -> Result<mux::Conn, Status> {
        let limit = self
            .publish_deadline
            .saturating_duration_since(Instant::now())
            .min(EXPORT_DIAL_TIMEOUT);
        tokio::time::timeout(limit, self.session.dial(EXPORT_CHANNEL))
            .await
            .map_err(|_| {
                Status::failed_precondition(format!(
                    "could not open your {EXPORT_CHANNEL:?} channel within {limit:?}"
                ))
            })?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "could not open your {EXPORT_CHANNEL:?} channel: {e}"
                ))
            })
    }

    /// Takes one of this reader's places for calls to exporter `peer`, or refuses at once if
    /// it already holds `max_reads_per_reader` of them.
    pub(super) fn reader_slot(self: &Arc<Self>, peer: &str) -> Result<ReaderSlot, Status> {
        let opts = &self.hub.opts;
        let limit = opts
            .max_reads_per_reader
            .clamp(1, opts.max_reads_per_peer.max(1));
        let mut reads = self
            .reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = reads.entry(peer.to_owned()).or_insert(0);
        if *n >= limit {
            return Err(Status::resource_exhausted(format!(
                "you already have {limit} calls to peer {peer:?} in flight (the most one reader \
                 may have); wait for one to finish"
            )));
        }
        *n += 1;
        Ok(ReaderSlot {
            conn: self.clone(),
            peer: peer.to_owned(),
        })
    }
}

/// One of a reader's places for calls to one exporter; dropping it frees it.
pub(super) struct ReaderSlot {
    conn: Arc<ConnState>,
    peer: String,
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        let mut reads = self
            .conn
            .reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = reads.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                reads.remove(&self.peer);
            }
        }
    }
}
