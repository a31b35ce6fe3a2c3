//! The `#[rpc_service]` attribute of netchan-rpc; use it through
//! `netchan_rpc::rpc_service`, whose documentation describes what it
//! generates.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::{
    parse::Parser, parse_macro_input, punctuated::Punctuated, spanned::Spanned, FnArg,
    GenericArgument, ItemTrait, LitStr, Pat, PathArguments, ReturnType, Token, TraitItem,
    TraitItemFn, Type,
};

/// (The attribute is implemented in the `netchan-rpc-macros` crate.)
#[proc_macro_attribute]
pub fn rpc_service(
    attr: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    let item = parse_macro_input!(item as ItemTrait);
    match expand(attr.into(), item) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// The shape of a method, from its signature.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Unary,
    ServerStreaming,
    ClientStreaming,
    Bidi,
}

struct Method {
    attrs: Vec<syn::Attribute>,
    name: syn::Ident,
    ctx: (Pat, Type),
    /// The request arguments (for the streaming-request kinds: the one
    /// `RequestStream<T>` argument).
    args: Vec<(syn::Ident, Type)>,
    /// `T` of `Result<T, E>` (for a server stream: the item type).
    ok: Type,
    /// `T` of `Result<T, E>` as written (`ItemStream<Item>` for a server
    /// stream): the trait uses the user's own path, so their import counts.
    ret: Type,
    /// `T` of the `RequestStream<T>` argument.
    req_item: Option<Type>,
    err: Type,
    kind: Kind,
}

fn expand(attr: TokenStream, item: ItemTrait) -> syn::Result<TokenStream> {
    let krate = parse_crate_path(attr)?;
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "an rpc service trait cannot be generic",
        ));
    }
    let mut methods = Vec::new();
    for it in &item.items {
        match it {
            TraitItem::Fn(f) => methods.push(parse_method(f)?),
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    "an rpc service trait holds only `async fn` methods",
                ))
            }
        }
    }
    let vis = &item.vis;
    let name = &item.ident;
    let attrs = &item.attrs;
    let client = format_ident!("{}Client", name);
    let service_name = LitStr::new(&name.to_string(), name.span());

    let mut trait_fns = Vec::new();
    let mut service_bounds = Vec::new();
    let mut registrations = Vec::new();
    let mut client_fns = Vec::new();
    for m in &methods {
        let Method {
            attrs,
            name: mname,
            ctx: (ctx_pat, ctx_ty),
            args,
            ok,
            ret,
            req_item,
            err,
            kind,
        } = m;
        let arg_names: Vec<_> = args.iter().map(|(n, _)| n).collect();
        let arg_tys: Vec<_> = args.iter().map(|(_, t)| t).collect();
        trait_fns.push(quote! {
            #(#attrs)*
            fn #mname(&self, #ctx_pat: #ctx_ty, #(#arg_names: #arg_tys),*)
                -> impl ::std::future::Future<Output = ::std::result::Result<#ret, #err>>
                    + ::std::marker::Send;
        });

        // Spanned, path included, at the user's error type: a type that
        // does not convert into `Status` is reported there, once.
        let krate_at_err = respanned(&krate, err.span());
        let to_status = quote_spanned! {err.span()=>
            |e| <#krate_at_err::Status as #krate_at_err::__private::StatusFrom<#err>>::status_from(e)
        };
        let msg_types: Vec<&Type> = match kind {
            Kind::Unary | Kind::ServerStreaming => arg_tys.iter().copied().chain([ok]).collect(),
            Kind::ClientStreaming | Kind::Bidi => req_item.iter().chain([ok]).collect(),
        };
        // Each message type must be a `Message`: required by where-clauses
        // spanned at the user's type, so a type that does not fit is
        // reported there (with `Message`'s own wording), and the code
        // generated under them, which relies on them, adds no error.
        let bounds: Vec<TokenStream> = msg_types
            .iter()
            .map(|ty| {
                let krate_at_ty = respanned(&krate, ty.span());
                quote_spanned! {ty.span()=> #ty: #krate_at_ty::__private::Message, }
            })
            .collect();
        service_bounds.extend(bounds.iter().cloned());

        let method_lit = LitStr::new(&mname.to_string(), mname.span());
        let wire = LitStr::new(&format!("{name}.{mname}"), mname.span());
        // The request on the wire: nothing, the one argument, or a tuple.
        let (req_pat, req_ty, req_expr) = match args.len() {
            0 => (quote!(()), quote!(()), quote!(&())),
            1 => {
                let (n, t) = &args[0];
                (quote!(#n), quote!(#t), quote!(&#n))
            }
            _ => (
                quote!((#(#arg_names),*)),
                quote!((#(#arg_tys),*)),
                quote!(&(#(#arg_names),*)),
            ),
        };
        let call_self = quote! {
            let this = ::std::sync::Arc::clone(&this);
        };
        registrations.push(match kind {
            Kind::Unary => quote! {{
                let this = ::std::sync::Arc::clone(&this);
                def = def.unary(#method_lit, move |ctx, #req_pat: #req_ty| {
                    #call_self
                    async move {
                        this.#mname(ctx, #(#arg_names),*).await.map_err(#to_status)
                    }
                });
            }},
            Kind::ServerStreaming => quote! {{
                let this = ::std::sync::Arc::clone(&this);
                def = def.stream(#method_lit, move |ctx, #req_pat: #req_ty| {
                    #call_self
                    async move {
                        this.#mname(ctx, #(#arg_names),*).await.map_err(#to_status)
                    }
                });
            }},
            Kind::Bidi => quote! {{
                let this = ::std::sync::Arc::clone(&this);
                def = def.bidi(#method_lit, move |ctx, requests| {
                    #call_self
                    async move {
                        this.#mname(ctx, requests).await.map_err(#to_status)
                    }
                });
            }},
            Kind::ClientStreaming => quote! {{
                let this = ::std::sync::Arc::clone(&this);
                def = def.bidi(#method_lit, move |ctx, requests| {
                    #call_self
                    async move {
                        let response = this
                            .#mname(ctx, requests)
                            .await
                            .map_err(#to_status)?;
                        ::std::result::Result::Ok(#krate::__private::once(response))
                    }
                });
            }},
        });

        let doc_call = match kind {
            Kind::Unary => "Calls the remote method; dropping the future cancels the call.",
            Kind::ServerStreaming => {
                "Starts the remote stream: resolves once the server accepted the call (its \
                 early error is this call's error); dropping the stream cancels the call."
            }
            Kind::ClientStreaming => {
                "Calls the remote method with a stream of requests (sent while the call runs) \
                 and resolves with its answer, or the handler's error; dropping the future \
                 cancels the call."
            }
            Kind::Bidi => {
                "Starts the remote call with a stream of requests (sent while the call runs): \
                 resolves once the server accepted the call (its early error is this call's \
                 error), then yields the responses; dropping the stream cancels the call."
            }
        };
        client_fns.push(match kind {
            Kind::Unary => {
                let with_fds = format_ident!("{}_with_fds", mname);
                quote! {
                    #(#attrs)*
                    ///
                    #[doc = #doc_call]
                    pub async fn #mname(&self, #(#arg_names: #arg_tys),*) -> ::std::result::Result<#ok, #krate::Status>
                    where
                        #(#bounds)*
                    {
                        // One call site (one set of trait bounds, so one error for a type
                        // that does not fit); descriptors nobody asked for are closed.
                        #[cfg(unix)]
                        {
                            self.#with_fds(#(#arg_names),*).await.map(|(ok, _fds)| ok)
                        }
                        #[cfg(not(unix))]
                        {
                            self.client.call_with(#wire, #req_expr, self.options.clone()).await
                        }
                    }

                    #[doc = "Like the method without `_with_fds`, also returning the file descriptors the handler sent with its response (`Context::reply_fds`; empty if none). Request descriptors go in the options (`with_options(CallOptions::default().fds(..))`)."]
                    #[cfg(unix)]
                    pub async fn #with_fds(&self, #(#arg_names: #arg_tys),*)
                        -> ::std::result::Result<(#ok, ::std::vec::Vec<::std::os::fd::OwnedFd>), #krate::Status>
                    where
                        #(#bounds)*
                    {
                        self.client.call_with_fds(#wire, #req_expr, self.options.clone()).await
                    }
                }
            }
            Kind::ServerStreaming => quote! {
                #(#attrs)*
                ///
                #[doc = #doc_call]
                pub async fn #mname(&self, #(#arg_names: #arg_tys),*)
                    -> ::std::result::Result<#krate::ResponseStream<#ok>, #krate::Status>
                where
                    #(#bounds)*
                {
                    self.client.call_stream(#wire, #req_expr, self.options.clone()).await
                }
            },
            Kind::ClientStreaming => {
                let (requests, _) = &args[0];
                quote! {
                    #(#attrs)*
                    ///
                    #[doc = #doc_call]
                    pub async fn #mname(
                        &self,
                        #requests: impl #krate::__private::Stream<Item = #req_item>
                            + ::std::marker::Send + 'static,
                    ) -> ::std::result::Result<#ok, #krate::Status>
                    where
                        #(#bounds)*
                    {
                        self.client
                            .call_client_stream(#wire, #requests, self.options.clone())
                            .await
                    }
                }
            }
            Kind::Bidi => {
                let (requests, _) = &args[0];
                quote! {
                    #(#attrs)*
                    ///
                    #[doc = #doc_call]
                    pub async fn #mname(
                        &self,
                        #requests: impl #krate::__private::Stream<Item = #req_item>
                            + ::std::marker::Send + 'static,
                    ) -> ::std::result::Result<#krate::ResponseStream<#ok>, #krate::Status>
                    where
                        #(#bounds)*
                    {
                        self.client
                            .call_bidi(#wire, #requests, self.options.clone())
                            .await
                    }
                }
            }
        });
    }

    let client_doc = format!("Typed client for [`{name}`]: one method per service method.");
    Ok(quote! {
        #(#attrs)*
        #vis trait #name: ::std::marker::Send + ::std::marker::Sync + 'static {
            #(#trait_fns)*

            /// Bundles this implementation as a service for
            /// `Server::add` (methods served as `"Trait.method"`).
            // The error conversions are closures spanned at the user's
            // error types (see `to_status`), which clippy would flag there.
            #[allow(clippy::redundant_closure)]
            fn into_service(self) -> #krate::ServiceDef
            where
                Self: ::std::marker::Sized,
                #(#service_bounds)*
            {
                let this = ::std::sync::Arc::new(self);
                let mut def = #krate::ServiceDef::new(#service_name);
                #(#registrations)*
                def
            }
        }

        #[doc = #client_doc]
        #[derive(Clone, Debug)]
        #vis struct #client {
            client: #krate::Client,
            options: #krate::CallOptions,
        }

        impl #client {
            /// Wraps `client` (for example a `Peer`'s client, or
            /// `ctx.callback()?` inside a handler); calls use default options.
            pub fn new(client: #krate::Client) -> Self {
                Self { client, options: #krate::CallOptions::default() }
            }

            /// A copy whose calls use `options` (deadline, metadata); a
            /// timeout counts from the start of each call.
            pub fn with_options(&self, options: #krate::CallOptions) -> Self {
                Self { client: self.client.clone(), options }
            }

            /// The underlying untyped client.
            pub fn client(&self) -> &#krate::Client {
                &self.client
            }

            #(#client_fns)*
        }
    })
}

/// Where the calling crate finds netchan-rpc, from its `Cargo.toml`: its own
/// name for a direct (possibly renamed) dependency, else `netchan::rpc`
/// through the facade (possibly renamed), else `::netchan_rpc`.
/// `tokens` with every span set to `span`, so that an error in code built
/// from them points at `span` as a whole.
fn respanned(tokens: &TokenStream, span: proc_macro2::Span) -> TokenStream {
    tokens
        .clone()
        .into_iter()
        .map(|mut tt| {
            if let proc_macro2::TokenTree::Group(g) = &tt {
                let mut group =
                    proc_macro2::Group::new(g.delimiter(), respanned(&g.stream(), span));
                group.set_span(span);
                tt = proc_macro2::TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}

fn default_crate_path() -> TokenStream {
    use proc_macro_crate::{crate_name, FoundCrate};
    match crate_name("netchan-rpc") {
        Ok(FoundCrate::Name(name)) => {
            let name = format_ident!("{name}");
            return quote!(::#name);
        }
        // netchan-rpc's own doctests and examples: the library itself never
        // uses the attribute, so `crate` would be wrong.
        Ok(FoundCrate::Itself) => return quote!(::netchan_rpc),
        Err(_) => {}
    }
    match crate_name("netchan") {
        Ok(FoundCrate::Name(name)) => {
            let name = format_ident!("{name}");
            quote!(::#name::rpc)
        }
        Ok(FoundCrate::Itself) => quote!(::netchan::rpc),
        Err(_) => quote!(::netchan_rpc),
    }
}

/// `crate = "path"` (default: [`default_crate_path`]).
fn parse_crate_path(attr: TokenStream) -> syn::Result<TokenStream> {
    if attr.is_empty() {
        return Ok(default_crate_path());
    }
    let metas = Punctuated::<syn::MetaNameValue, Token![,]>::parse_terminated.parse2(attr)?;
    let mut krate = default_crate_path();
    for meta in metas {
        if !meta.path.is_ident("crate") {
            return Err(syn::Error::new(
                meta.path.span(),
                "unknown argument: the only one is `crate = \"path::to::netchan_rpc\"`",
            ));
        }
        let syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) = &meta.value
        else {
            return Err(syn::Error::new(
                meta.value.span(),
                "expected a string: `crate = \"netchan::rpc\"`",
            ));
        };
        let path: syn::Path = s.parse()?;
        krate = if path.leading_colon.is_some() {
            quote!(#path)
        } else {
            quote!(::#path)
        };
    }
    Ok(krate)
}

fn parse_method(f: &TraitItemFn) -> syn::Result<Method> {
    let sig = &f.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            "rpc methods are `async fn`: write `async fn name(&self, ctx: Context, ...) -> Result<T, Status>`",
        ));
    }
    if f.default.is_some() {
        return Err(syn::Error::new(
            f.default.span(),
            "an rpc method has no default body here: implement it in the impl block",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "an rpc method cannot be generic",
        ));
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => {}
        other => {
            let span = other.map_or(sig.ident.span(), |a| a.span());
            return Err(syn::Error::new(
                span,
                "an rpc method takes `&self` first, then `ctx: Context`, then its arguments",
            ));
        }
    }
    let ctx = match inputs.next() {
        Some(FnArg::Typed(pt)) if last_ident_is(&pt.ty, "Context") => {
            ((*pt.pat).clone(), (*pt.ty).clone())
        }
        Some(FnArg::Typed(pt)) => {
            return Err(syn::Error::new(
                pt.span(),
                "an rpc method takes `ctx: Context` right after `&self`, before its \
                 arguments: write `ctx: Context` here (use `_ctx: Context` if unused)",
            ))
        }
        _ => {
            return Err(syn::Error::new(
                sig.paren_token.span.join(),
                "an rpc method takes `ctx: Context` after `&self`",
            ))
        }
    };
    let mut args = Vec::new();
    for arg in inputs {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new(arg.span(), "`self` may only come first"));
        };
        let Pat::Ident(id) = &*pt.pat else {
            return Err(syn::Error::new(
                pt.pat.span(),
                "rpc method arguments are plain names (`n: u64`), not patterns",
            ));
        };
        if let Type::Reference(r) = &*pt.ty {
            return Err(syn::Error::new(
                r.span(),
                "rpc request arguments must be owned: they are decoded from the wire \
                 (use `String` for `&str`, `Vec<T>` for `&[T]`)",
            ));
        }
        args.push((id.ident.clone(), (*pt.ty).clone()));
    }
    let (ok, err) =
        match &sig.output {
            ReturnType::Type(_, ty) => result_parts(ty)?,
            ReturnType::Default => return Err(syn::Error::new(
                sig.span(),
                "an rpc method returns `Result<T, E>` where `E` is `Status` or converts into it",
            )),
        };
    if let Type::Reference(r) = &ok {
        return Err(syn::Error::new(
            r.span(),
            "rpc responses must be owned: they are encoded and sent (use `String` for `&str`)",
        ));
    }
    let req_stream = args
        .iter()
        .find_map(|(_, t)| generic_of(t, "RequestStream"));
    let item = stream_item(&ok);
    if item.is_none() && last_ident_ends_with(&ok, "Stream") {
        return Err(syn::Error::new(
            ok.span(),
            "a server-streaming rpc method returns `Result<ItemStream<T>, Status>` \
             (or the same type spelled `BoxStream<'static, Result<T, Status>>`); \
             return your stream with `Box::pin(stream)` or `stream.boxed()`",
        ));
    }
    if req_stream.is_some() && args.len() != 1 {
        return Err(syn::Error::new(
            sig.inputs.span(),
            "a method that takes a `RequestStream<T>` takes no other argument",
        ));
    }
    let kind = match (&req_stream, &item) {
        (None, None) => Kind::Unary,
        (None, Some(_)) => Kind::ServerStreaming,
        (Some(_), None) => Kind::ClientStreaming,
        (Some(_), Some(_)) => Kind::Bidi,
    };
    Ok(Method {
        attrs: f.attrs.clone(),
        name: sig.ident.clone(),
        ctx,
        args,
        ok: item.unwrap_or_else(|| ok.clone()),
        ret: ok,
        req_item: req_stream,
        err,
        kind,
    })
}

/// `(T, E)` of `Result<T, E>`.
fn result_parts(ty: &Type) -> syn::Result<(Type, Type)> {
    let wrong = || {
        syn::Error::new(
            ty.span(),
            "an rpc method returns `Result<T, E>` where `E` is `Status` or converts into it",
        )
    };
    let Type::Path(p) = ty else {
        return Err(wrong());
    };
    let last = p.path.segments.last().ok_or_else(wrong)?;
    if last.ident != "Result" {
        return Err(wrong());
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return Err(wrong());
    };
    let tys: Vec<&Type> = args
        .args
        .iter()
        .filter_map(|a| match a {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        })
        .collect();
    match tys.as_slice() {
        [ok, err] => Ok(((*ok).clone(), (*err).clone())),
        _ => Err(wrong()),
    }
}

/// The item type `T` of a server stream: `ItemStream<T>`, or the same type
/// spelled `BoxStream<'static, Result<T, E>>` (futures' alias).
fn stream_item(ty: &Type) -> Option<Type> {
    if let Some(item) = generic_of(ty, "ItemStream") {
        return Some(item);
    }
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "BoxStream" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let item = args.args.iter().find_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    })?;
    result_parts(item).ok().map(|(ok, _)| ok)
}

/// Whether `ty` is a path whose last segment is `name` (`Context`,
/// `netchan::rpc::Context`).
fn last_ident_is(ty: &Type, name: &str) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == name))
}

/// Whether `ty` is a path whose last segment's name ends with `suffix`.
fn last_ident_ends_with(ty: &Type, suffix: &str) -> bool {
    matches!(ty, Type::Path(p)
        if p.path.segments.last().is_some_and(|s| s.ident.to_string().ends_with(suffix)))
}

/// `T` when `ty` is `Name<T>` (by its last path segment).
fn generic_of(ty: &Type, name: &str) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    }
}
