//! [`Server`]: serves its services' methods on any number of conns.
//!
//! The server is split the way its work is:
//!
//! - `handler` — handler erasure: a typed [`Handler`] becomes a `Method`.
//! - this file — the registry ([`Server`]: method name → `Method`, plus the
//!   [`Config`]) and the public API.
//! - `conn` — the per-conn loop: `serve` runs the conn's reader inline,
//!   spawns its writer (see `transport`) and dispatches frames; each call
//!   becomes a task.
//! - `in_flight` — admission and in-flight tracking: the per-conn map (id →
//!   cancellation token and stream credit) through which a `Cancel` or
//!   `Credit` frame finds its call, and whose size enforces
//!   [`Config::max_in_flight`].
//! - `call` — one call's task: it races its handler against the call's
//!   cancellation and deadline, drops the handler when either wins, and
//!   sends the answer.

mod call;
mod conn;
mod handler;
mod in_flight;
mod incoming;

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher, Hasher},
    sync::Arc,
};

use tokio::io::{AsyncRead, AsyncWrite};

pub use handler::Handler;
pub(crate) use handler::Method;
pub use incoming::{FromStream, Incoming};

use tokio_util::sync::CancellationToken;

use crate::{
    config::Config, context::Origin, error::Error, metadata::Interceptor, metadata::Metadata,
    status::Status,
};

/// Serves the methods of the [`ServiceDef`](crate::ServiceDef)s added to it
/// ([`Server::add`]); cheap to clone, serves many conns at once with shared
/// state (whatever the handlers capture).
#[derive(Clone, Default)]
pub struct Server {
    inner: Arc<Registry>,
}

#[derive(Clone, Default)]
struct Registry {
    /// Each name shared with the contexts of its calls.
    methods: HashMap<Arc<str>, Method, NameHash>,
    config: Config,
    /// Run in order before every call's handler.
    interceptors: Vec<Interceptor>,
}

/// Hashes method names with FNV-1a instead of SipHash (every call looks its
/// name up). Flooding needs no defence here: the table holds only this
/// server's own registered names, so a name a peer calls costs at most the
/// probes those names cause, however it is chosen.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NameHash;

/// The hasher [`NameHash`] builds.
#[derive(Debug)]
pub(crate) struct NameHasher(u64);

impl BuildHasher for NameHash {
    type Hasher = NameHasher;

    fn build_hasher(&self) -> NameHasher {
        NameHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut methods: Vec<&str> = self.inner.methods.keys().map(|m| &**m).collect();
        methods.sort_unstable();
        f.debug_struct("Server")
            .field("methods", &methods)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Server {
    /// A server with no methods and the default [`Config`].
    pub fn new() -> Server {
        Server::default()
    }

    /// A server with no methods and `config`.
    pub fn with_config(config: Config) -> Server {
        Server {
            inner: Arc::new(Registry {
                methods: HashMap::default(),
                interceptors: Vec::new(),
                config,
            }),
        }
    }

    /// The server's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Adds `interceptor` to run before every call's handler, after those
    /// added before it (see [`Interceptor`]): it may read and change the
    /// call's metadata (the handler sees the result in
    /// [`Context::metadata`](crate::Context::metadata)) or refuse the call
    /// with a status, which the caller gets as the call's answer. Like
    /// [`Server::add`], it applies to conns served from now on.
    ///
    /// ```
    /// # use netchan_rpc::{Server, Status};
    /// let mut server = Server::new();
    /// server.intercept(|method, md| {
    ///     if method.starts_with("Admin.") && md.get("token") != Some("s3cret") {
    ///         return Err(Status::unauthenticated("admin calls need a token"));
    ///     }
    ///     md.set("authenticated", "yes");
    ///     Ok(())
    /// });
    /// ```
    pub fn intercept(
        &mut self,
        interceptor: impl Fn(&str, &mut Metadata) -> Result<(), Status> + Send + Sync + 'static,
    ) -> &mut Self {
        Arc::make_mut(&mut self.inner)
            .interceptors
            .push(Arc::new(interceptor));
        self
    }

    pub(crate) fn insert(&mut self, name: String, method: Method) -> &mut Self {
        // Registering on a clone forks the method table: conns already
        // being served keep the table they started with.
        let reg = Arc::make_mut(&mut self.inner);
        if reg
            .methods
            .insert(Arc::from(name.as_str()), method)
            .is_some()
        {
            tracing::debug!(method = %name, "rpc method re-registered; the new handler wins");
        }
        self
    }

    /// Serves one conn until the peer closes it (`Ok`) or it fails (a
    /// transport or protocol [`Error`]; other conns are unaffected).
    ///
    /// Cancel-safe in the sense that dropping the future ends the conn and
    /// drops every in-flight handler.
    pub async fn serve<T>(&self, conn: T) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_conn(conn, Origin::default(), CancellationToken::new())
            .await
    }

    /// [`Server::serve`], labelling the conn `peer` (handlers see it as
    /// [`Context::peer`](crate::Context::peer); logs carry it). Cancel-safe as `serve`.
    pub async fn serve_named<T>(&self, conn: T, peer: impl Into<String>) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let origin = Origin {
            label: Some(Arc::from(peer.into())),
            ..Origin::default()
        };
        self.serve_conn(conn, origin, CancellationToken::new())
            .await
    }
}
