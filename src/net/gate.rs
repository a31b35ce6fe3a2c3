//! Starting a session with a setup step that runs before the session reads anything from the
//! peer (listeners registered first: no listen race), over any byte stream or, for unix
//! sockets, with file-descriptor passing.

use std::{fmt, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixStream,
};

use crate::mux::{Session, SessionBuilder};

/// A setup step run on each new session before it reads anything from the peer.
#[derive(Clone)]
pub(crate) struct OnSession(pub(crate) Arc<dyn Fn(&Session) + Send + Sync>);

impl fmt::Debug for OnSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnSession(..)")
    }
}

/// Starts a session over `io` in `mode`, running `setup` (if any) before the session reads
/// from the peer.
pub(crate) fn start<T>(
    io: T,
    mode: crate::mux::Mode,
    config: crate::mux::Config,
    setup: Option<&OnSession>,
) -> Session
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    run(Session::builder(io, mode, config), setup)
}

/// [`start`] over a unix socket: the session also passes file descriptors
/// ([`Session::with_fds`]).
pub(crate) fn start_unix(
    io: UnixStream,
    mode: crate::mux::Mode,
    config: crate::mux::Config,
    setup: Option<&OnSession>,
) -> Session {
    run(Session::builder_with_fds(io, mode, config), setup)
}

fn run<T>(builder: SessionBuilder<T>, setup: Option<&OnSession>) -> Session
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if let Some(setup) = setup {
        (setup.0)(builder.session());
    }
    builder.start()
}
