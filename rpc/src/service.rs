//! Typed services: [`ServiceDef`], the [`rpc_service`](crate::rpc_service)
//! attribute's support, and the older [`service!`](crate::service) macro.

use futures::Stream;
use serde::{de::DeserializeOwned, Serialize};

use crate::{server::Method, Handler, RequestStream, Server, Status};

/// A named set of methods ready to be added to a [`Server`] with
/// [`Server::add`]. [`service!`](crate::service) builds one from a trait
/// implementation (`MyImpl.into_service()`); it can also be built by hand.
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

    /// Adds unary `method` (see [`Server::register`]).
    pub fn unary<Req, Resp>(&mut self, method: &str, handler: impl Handler<Req, Resp>) -> &mut Self
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        self.methods
            .push((format!("{}.{method}", self.name), Method::unary(handler)));
        self
    }

    /// Adds server-streaming `method` (see [`Server::register_stream`]).
    pub fn stream<Req, Item, S>(&mut self, method: &str, handler: impl Handler<Req, S>) -> &mut Self
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
    /// Adds bidi-streaming `method` (see [`Server::register_bidi`]).
    pub fn bidi<Req, Item, S>(
        &mut self,
        method: &str,
        handler: impl Handler<RequestStream<Req>, S>,
    ) -> &mut Self
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
    /// Registers every method of `service` (replacing same-named ones).
    pub fn add(&mut self, service: ServiceDef) -> &mut Self {
        for (name, method) in service.methods {
            self.insert(name, method);
        }
        self
    }
}

/// Declares a typed service: a trait to implement, a typed client and a
/// registration, from one trait-like definition.
///
/// **Deprecated: use [`#[rpc_service]`](crate::rpc_service)**, which takes
/// any number of arguments, checks the error and message types with clear
/// messages, and generates the same `"Trait.method"` names on the wire (so
/// moving a service over changes nothing for deployed peers). This macro
/// keeps working.
///
/// Methods are `async fn` (unary), `stream fn` (server streaming, returning
/// `Result<ItemStream<Item>, Status>`) or `bidi fn` (bidi streaming:
/// the request argument is a [`RequestStream<Req>`](crate::RequestStream),
/// the return type as for `stream fn`); each takes `&self`, a [`Context`](crate::Context)
/// and one request. The block ends with the name of the client struct to
/// generate. On the wire the methods are `"Trait.method"`.
///
/// Generated:
/// - the trait, with every method as `fn m(&self, ctx, req) -> impl
///   Future<Output = ...> + Send` (implement it with `async fn`), plus a
///   provided `into_service(self) -> ServiceDef` for [`Server::add`];
/// - the client struct wrapping a [`Client`](crate::Client), with one
///   `async fn m(&self, req)` per method (for `bidi fn`: `async fn
///   m(&self, requests)` taking a `Stream` of requests and returning the
///   [`ResponseStream`](crate::ResponseStream) once the server accepted
///   the call, as [`Client::call_bidi`](crate::Client::call_bidi)) and `with_options(CallOptions)` to
///   set a deadline or metadata for the calls made through the copy it
///   returns.
///
/// ```
/// # #![allow(deprecated)]
/// use futures::StreamExt;
/// use netchan_rpc::{service, Client, Context, ItemStream, RequestStream, Server, Status};
///
/// service! {
///     /// Counts things.
///     pub trait Counter {
///         /// Adds one.
///         async fn incr(&self, ctx: Context, n: u64) -> Result<u64, Status>;
///         /// Counts from zero to `n`.
///         stream fn upto(&self, ctx: Context, n: u64) -> Result<ItemStream<u64>, Status>;
///         /// Adds up the numbers sent (client streaming: one answer).
///         bidi fn sum(&self, ctx: Context, ns: RequestStream<u64>) -> Result<ItemStream<u64>, Status>;
///     }
///     /// Typed client for [`Counter`].
///     pub struct CounterClient;
/// }
///
/// struct MyCounter;
///
/// impl Counter for MyCounter {
///     async fn incr(&self, _ctx: Context, n: u64) -> Result<u64, Status> {
///         n.checked_add(1).ok_or_else(|| Status::out_of_range("overflow"))
///     }
///     async fn upto(&self, _ctx: Context, n: u64) -> Result<ItemStream<u64>, Status> {
///         Ok(Box::pin(futures::stream::iter((0..n).map(Ok))))
///     }
///     async fn sum(&self, _ctx: Context, mut ns: RequestStream<u64>) -> Result<ItemStream<u64>, Status> {
///         let mut total = 0u64;
///         while let Some(n) = ns.next().await {
///             total += n?;
///         }
///         Ok(Box::pin(futures::stream::once(async move { Ok(total) })))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (a, b) = tokio::io::duplex(64 << 10);
/// let mut server = Server::new();
/// server.add(MyCounter.into_service());
/// tokio::spawn(async move { server.serve(b).await });
///
/// let counter = CounterClient::new(Client::new(a));
/// assert_eq!(counter.incr(41).await?, 42);
/// let all: Vec<u64> = counter.upto(3).await?.map(|r| r.unwrap()).collect().await;
/// assert_eq!(all, [0, 1, 2]);
///
/// let mut total = counter.sum(futures::stream::iter([1, 2, 3])).await?;
/// assert_eq!(total.next().await.transpose()?, Some(6));
/// # Ok(())
/// # }
/// ```
#[macro_export]
#[deprecated(note = "use `#[rpc_service]`")]
macro_rules! service {
    (
        $(#[$attr:meta])*
        $vis:vis trait $name:ident {
            $(
                $(#[$mattr:meta])*
                $kind:ident fn $method:ident(
                    &self, $ctx:ident : $ctx_ty:ty, $req:ident : $req_ty:ty $(,)?
                ) -> Result<$ret:ty, $err:ty>;
            )*
        }
        $(#[$cattr:meta])*
        $cvis:vis struct $client:ident;
    ) => {
        $(#[$attr])*
        $vis trait $name: ::std::marker::Send + ::std::marker::Sync + 'static {
            $(
                $(#[$mattr])*
                fn $method(
                    &self,
                    $ctx: $ctx_ty,
                    $req: $req_ty,
                ) -> impl ::std::future::Future<Output = ::std::result::Result<$ret, $crate::Status>>
                       + ::std::marker::Send;
            )*

            /// Bundles this implementation as a service for
            /// [`Server::add`]($crate::Server::add).
            fn into_service(self) -> $crate::ServiceDef
            where
                Self: ::std::marker::Sized,
            {
                let this = ::std::sync::Arc::new(self);
                let mut def = $crate::ServiceDef::new(::std::stringify!($name));
                $(
                    $crate::__service_register!($kind def, this, $method);
                )*
                def
            }
        }

        $(#[$cattr])*
        #[derive(Clone, Debug)]
        $cvis struct $client {
            client: $crate::Client,
            options: $crate::CallOptions,
        }

        impl $client {
            /// Wraps `client`; calls use default options.
            pub fn new(client: $crate::Client) -> Self {
                Self { client, options: $crate::CallOptions::default() }
            }

            /// A copy whose calls use `options` (deadline, metadata); a
            /// timeout counts from the start of each call.
            pub fn with_options(&self, options: $crate::CallOptions) -> Self {
                Self { client: self.client.clone(), options }
            }

            /// The underlying untyped client.
            pub fn client(&self) -> &$crate::Client {
                &self.client
            }

            $(
                $crate::__service_client_method!(
                    $kind $name, $method, $req_ty, $ret, $(#[$mattr])*
                );
            )*
        }
    };
}

/// Implementation detail of [`service!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __service_register {
    (async $def:ident, $this:ident, $method:ident) => {{
        let this = ::std::sync::Arc::clone(&$this);
        $def.unary(::std::stringify!($method), move |ctx, req| {
            let this = ::std::sync::Arc::clone(&this);
            async move { this.$method(ctx, req).await }
        });
    }};
    (stream $def:ident, $this:ident, $method:ident) => {{
        let this = ::std::sync::Arc::clone(&$this);
        $def.stream(::std::stringify!($method), move |ctx, req| {
            let this = ::std::sync::Arc::clone(&this);
            async move { this.$method(ctx, req).await }
        });
    }};
    (bidi $def:ident, $this:ident, $method:ident) => {{
        let this = ::std::sync::Arc::clone(&$this);
        $def.bidi(::std::stringify!($method), move |ctx, req| {
            let this = ::std::sync::Arc::clone(&this);
            async move { this.$method(ctx, req).await }
        });
    }};
}

/// Implementation detail of [`service!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __service_client_method {
    (async $name:ident, $method:ident, $req_ty:ty, $ret:ty, $(#[$mattr:meta])*) => {
        $(#[$mattr])*
        ///
        /// Calls the remote method; dropping the future cancels the call.
        pub async fn $method(&self, req: $req_ty) -> ::std::result::Result<$ret, $crate::Status> {
            self.client
                .call_with(
                    ::std::concat!(::std::stringify!($name), ".", ::std::stringify!($method)),
                    &req,
                    self.options.clone(),
                )
                .await
        }
    };
    (stream $name:ident, $method:ident, $req_ty:ty, $ret:ty, $(#[$mattr:meta])*) => {
        $(#[$mattr])*
        ///
        /// Starts the remote stream; dropping the stream cancels the call.
        pub async fn $method(
            &self,
            req: $req_ty,
        ) -> ::std::result::Result<
            $crate::ResponseStream<<$ret as $crate::StreamReturn>::Item>,
            $crate::Status,
        > {
            self.client
                .call_stream(
                    ::std::concat!(::std::stringify!($name), ".", ::std::stringify!($method)),
                    &req,
                    self.options.clone(),
                )
                .await
        }
    };
    (bidi $name:ident, $method:ident, $req_ty:ty, $ret:ty, $(#[$mattr:meta])*) => {
        $(#[$mattr])*
        ///
        /// Starts the remote call with a stream of requests (sent while the
        /// call runs): resolves once the server accepted the call, then
        /// yields the responses; dropping the stream cancels the call.
        pub async fn $method(
            &self,
            requests: impl $crate::__private::Stream<Item = <$req_ty as $crate::StreamArg>::Item>
                + ::std::marker::Send
                + 'static,
        ) -> ::std::result::Result<
            $crate::ResponseStream<<$ret as $crate::StreamReturn>::Item>,
            $crate::Status,
        > {
            self.client
                .call_bidi(
                    ::std::concat!(::std::stringify!($name), ".", ::std::stringify!($method)),
                    requests,
                    self.options.clone(),
                )
                .await
        }
    };
}

/// What the code `#[rpc_service]` generates relies on; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use futures::Stream;
    use serde::{de::DeserializeOwned, Serialize};

    use crate::{ItemStream, Status};

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
