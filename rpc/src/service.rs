//! Typed services: [`ServiceDef`] and the [`rpc_service`](crate::rpc_service)
//! attribute's support.

use futures::Stream;
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    server::Handler, server::Method, server::Server, status::Status, stream::RequestStream,
};

/// A named set of methods ready to be added to a [`Server`] with
/// [`Server::add`]: the one way methods get onto a server.
/// [`#[rpc_service]`](crate::rpc_service) builds one from a trait
/// implementation (`MyImpl.into_service()`); built by hand, it needs no
/// trait (method names chosen at run time, closures capturing state).
///
/// Each method is served as `"name.method"`. A handler gets the call's
/// [`Context`](crate::Context) and the decoded request; a request that does
/// not decode as its `Req` is answered `InvalidArgument` without calling it.
///
/// ```
/// # use netchan_rpc::{Server, ServiceDef, Status};
/// let mut server = Server::new();
/// server.add(ServiceDef::new("Math").unary("double", |_ctx, n: u64| async move {
///     n.checked_mul(2).ok_or_else(|| Status::out_of_range("too big"))
/// }));
/// ```
#[must_use = "a ServiceDef serves nothing until it is added with `Server::add`"]
pub struct ServiceDef {
    name: String,
    methods: Vec<(String, Method)>,
}

impl std::fmt::Debug for ServiceDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceDef")
            .field("name", &self.name)
            .field(
                "methods",
                &self.methods.iter().map(|(m, _)| m).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ServiceDef {
    /// An empty service called `name`; its methods are served as
    /// `"name.method"`.
    pub fn new(name: impl Into<String>) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            methods: Vec::new(),
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds unary `method`: one request, one response (or a status). A
    /// later method of the same name replaces it.
    pub fn unary<Req, Resp>(mut self, method: &str, handler: impl Handler<Req, Resp>) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        self.methods
            .push((format!("{}.{method}", self.name), Method::unary(handler)));
        self
    }

    /// Adds server-streaming `method`: the handler returns a stream of
    /// items; an `Err` item ends the call with that status. Items are pulled
    /// from the stream only as the caller grants credit.
    pub fn stream<Req, Item, S>(mut self, method: &str, handler: impl Handler<Req, S>) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        self.methods
            .push((format!("{}.{method}", self.name), Method::stream(handler)));
        self
    }
}

impl ServiceDef {
    /// Adds bidi-streaming `method`: the handler gets the caller's requests
    /// as a [`RequestStream`] and returns a stream of responses (client
    /// streaming: a stream of one). Requests flow only as the handler
    /// consumes them (credit-based, like responses).
    pub fn bidi<Req, Item, S>(
        mut self,
        method: &str,
        handler: impl Handler<RequestStream<Req>, S>,
    ) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        self.methods
            .push((format!("{}.{method}", self.name), Method::bidi(handler)));
        self
    }
}

impl Server {
    /// Serves every method of `service` (replacing same-named ones) on the
    /// conns served from now on.
    pub fn add(&mut self, service: ServiceDef) -> &mut Self {
        for (name, method) in service.methods {
            self.insert(name, method);
        }
        self
    }
}

/// What the code `#[rpc_service]` generates relies on; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use futures::Stream;
    use serde::{de::DeserializeOwned, Serialize};

    use crate::{status::Status, stream::ItemStream};

    /// `Status` made from the error type `E` of a service method: `Status`
    /// itself or anything with `From<E> for Status`.
    ///
    /// Implemented by `Status` (not by `E`) so that an `E` without the
    /// `From` impl fails on this trait's own bound, whose self type is
    /// `Status` as in the `From` bound beneath it: rustc then shows the
    /// message below rather than a bare `Status: From<E>`.
    #[diagnostic::on_unimplemented(
        message = "`{E}` cannot be the error type of an rpc method",
        label = "not `Status`, and there is no `From<{E}> for Status`",
        note = "return `Result<T, Status>`, or implement `From<{E}> for Status`"
    )]
    pub trait StatusFrom<E> {
        /// The status sent to the caller.
        fn status_from(err: E) -> Status;
    }

    impl<E> StatusFrom<E> for Status
    where
        Status: From<E>,
    {
        fn status_from(err: E) -> Status {
            Status::from(err)
        }
    }

    /// A request or response type of a service method.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be an rpc message: it must be owned, serializable and `Send`",
        label = "not `Serialize + DeserializeOwned + Send + 'static`",
        note = "derive `serde::Serialize` and `serde::Deserialize` for it, with no references or borrowed fields"
    )]
    pub trait Message: Serialize + DeserializeOwned + Send + 'static {}

    impl<T: Serialize + DeserializeOwned + Send + 'static> Message for T {}

    /// A stream of one response (client streaming answers once).
    pub fn once<T: Send + 'static>(value: T) -> ItemStream<T> {
        Box::pin(futures::stream::once(async move { Ok(value) }))
    }
}
