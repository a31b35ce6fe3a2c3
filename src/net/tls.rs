//! TLS for [`connect`](crate::connect) and [`bind`](crate::bind) (`tls://host:port`), on rustls
//! with the ring provider; feature `tls`, on by default.
//!
//! A client needs a [`TlsClient`]: the CA it trusts for the server and, for mutual TLS, its own
//! certificate and key. A server needs a [`TlsServer`]: its certificate and key and, for mutual
//! TLS, the CA that client certificates must chain to. Both load from PEM files (parsed with
//! `rustls-pki-types`) or wrap a rustls config built by hand.
//!
//! A failed handshake is a [`TlsError`] that says which side did not trust whom. One case
//! cannot show at connect time: under TLS 1.3 the client finishes its handshake before the
//! server has checked the client's certificate, so a client the server refuses learns it on the
//! link's first read. The session then ends with [`mux::CloseReason::Io`](crate::mux::CloseReason)
//! carrying the same [`TlsError`] ([`TlsError::ServerRequiresClientCertificate`] or
//! [`TlsError::ServerDoesNotTrustClient`]), and every dial on it fails with that reason.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    AlertDescription, ClientConfig, RootCertStore, ServerConfig,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why TLS could not be configured, or why a handshake failed.
///
/// The handshake variants are worded from this side: "this client", "the server".
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (shown in the message, so not also a `source`).
        error: io::Error,
    },
    /// A PEM file could not be parsed.
    #[error("cannot parse PEM in {path}: {error}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said (shown in the message, so not also a `source`).
        error: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("no PEM certificate found in {path}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error("no PEM private key found in {path}")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The name to verify in the server's certificate is not a DNS name or an IP address.
    #[error("invalid TLS server name {name:?}")]
    ServerName {
        /// The name.
        name: String,
    },
    /// rustls refused the configuration (a bad key, an unusable CA...).
    #[error("invalid TLS configuration: {context}: {error}")]
    Config {
        /// Which part.
        context: &'static str,
        /// What rustls said (shown in the message, so not also a `source`).
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The handshake did not finish in time (a peer that does not speak, or not TLS).
    #[error("the TLS handshake did not finish within {after:?}")]
    HandshakeTimeout {
        /// The bound that expired.
        after: Duration,
    },
    /// Client side: the server's certificate does not verify against this client's roots (or
    /// is not valid for the name dialled).
    #[error("this client does not trust the server's certificate: {error}")]
    ClientDoesNotTrustServer {
        /// The verification failure (shown in the message, so not also a `source`).
        error: rustls::Error,
    },
    /// Client side: the server requires a client certificate and this client sent none.
    #[error("the server requires a client certificate and this client sent none")]
    ServerRequiresClientCertificate,
    /// Client side: the server refused the certificate this client presented.
    #[error("the server does not trust this client's certificate (alert {alert:?})")]
    ServerDoesNotTrustClient {
        /// The alert the server sent.
        alert: AlertDescription,
    },
    /// Server side: the client sent no certificate, and this server requires one.
    #[error("the client sent no certificate and this server requires one")]
    ClientSentNoCertificate,
    /// Server side: the client's certificate does not verify against this server's client CA.
    #[error("this server does not trust the client's certificate: {error}")]
    ServerDoesNotTrustClientCertificate {
        /// The verification failure (shown in the message, so not also a `source`).
        error: rustls::Error,
    },
    /// Server side: the client refused this server's certificate.
    #[error("the client does not trust this server's certificate (alert {alert:?})")]
    ClientDoesNotTrustThisServer {
        /// The alert the client sent.
        alert: AlertDescription,
    },
    /// Any other handshake failure (not TLS at all, no common cipher suite, a reset...).
    #[error("TLS handshake failed: {error}")]
    Handshake {
        /// The i/o or rustls error (shown in the message, so not also a `source`).
        error: io::Error,
    },
}

/// Which end of the handshake we are, to word its failures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

fn is_trust_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
    )
}

/// Names who did not trust whom in an i/o error from a TLS stream, when rustls says so.
pub(crate) fn classify(side: Side, err: io::Error) -> TlsError {
    let rustls_err = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned();
    match (side, rustls_err) {
        (Side::Client, Some(e @ rustls::Error::InvalidCertificate(_))) => {
            TlsError::ClientDoesNotTrustServer { error: e }
        }
        (
            Side::Client,
            Some(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)),
        ) => TlsError::ServerRequiresClientCertificate,
        (Side::Client, Some(rustls::Error::AlertReceived(alert))) if is_trust_alert(alert) => {
            TlsError::ServerDoesNotTrustClient { alert }
        }
        (Side::Server, Some(rustls::Error::NoCertificatesPresented)) => {
            TlsError::ClientSentNoCertificate
        }
        (Side::Server, Some(e @ rustls::Error::InvalidCertificate(_))) => {
            TlsError::ServerDoesNotTrustClientCertificate { error: e }
        }
        (Side::Server, Some(rustls::Error::AlertReceived(alert))) if is_trust_alert(alert) => {
            TlsError::ClientDoesNotTrustThisServer { alert }
        }
        _ => TlsError::Handshake { error: err },
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Loads every certificate of a PEM file (at least one).
pub fn load_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = path.as_ref();
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            path: path.to_owned(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = path.as_ref();
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        error => TlsError::Pem {
            path: path.to_owned(),
            error,
        },
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store.add(cert).map_err(config_err("CA certificate"))?;
    }
    Ok(Arc::new(store))
}

fn config_err<E: std::error::Error + Send + Sync + 'static>(
    context: &'static str,
) -> impl FnOnce(E) -> TlsError {
    move |e| TlsError::Config {
        context,
        error: Box::new(e),
    }
}

/// A server's rustls configuration from PEM files; `client_ca` requires client certificates
/// that chain to it (mutual TLS).
pub fn server_config(
    cert: impl AsRef<Path>,
    key: impl AsRef<Path>,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err("protocol versions"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(config_err("client certificate verifier"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(config_err("server certificate and key"))?;
    Ok(Arc::new(config))
}

/// A client's rustls configuration from PEM files: trusts `ca` for the server and, with
/// `client_cert` (certificate, key), presents that certificate (mutual TLS).
pub fn client_config(
    ca: impl AsRef<Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err("protocol versions"))?
        .with_root_certificates(roots(ca.as_ref())?);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(config_err("client certificate and key"))?,
    };
    Ok(Arc::new(config))
}

/// The client side of TLS for [`connect`](crate::connect): whom to trust, what to present.
#[derive(Clone, Debug)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl TlsClient {
    /// Uses a rustls configuration built by hand.
    pub fn from_config(config: Arc<ClientConfig>) -> TlsClient {
        TlsClient {
            config,
            server_name: None,
        }
    }

    /// Trusts the CA certificates in the PEM file `ca`; presents no client certificate.
    pub fn from_pem_files(ca: impl AsRef<Path>) -> Result<TlsClient, TlsError> {
        Ok(TlsClient::from_config(client_config(ca, None)?))
    }

    /// Trusts the CA in `ca` and presents the certificate `cert` with its key `key` (mutual
    /// TLS), all PEM files.
    pub fn mutual_from_pem_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsClient, TlsError> {
        let config = client_config(ca, Some((cert.as_ref(), key.as_ref())))?;
        Ok(TlsClient::from_config(config))
    }

    /// Verifies the server's certificate for `name` instead of the host of the address.
    /// Default: the host of the `tls://host:port` address.
    pub fn server_name(mut self, name: impl Into<String>) -> TlsClient {
        self.server_name = Some(name.into());
        self
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// Runs the client handshake over `io`, verifying the server for `host` (or the name set
    /// with [`server_name`](Self::server_name)), bounded by `timeout`.
    pub(crate) async fn handshake<S>(
        &self,
        io: S,
        host: &str,
        timeout: Duration,
    ) -> Result<ClientTlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName {
            name: name.to_owned(),
        })?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        match tokio::time::timeout(timeout, connector.connect(name, io)).await {
            Err(_) => Err(TlsError::HandshakeTimeout { after: timeout }),
            Ok(Err(e)) => Err(classify(Side::Client, e)),
            Ok(Ok(stream)) => Ok(ClientTlsStream(stream)),
        }
    }
}

/// The server side of TLS for [`bind`](crate::bind): its certificate and whom it requires.
#[derive(Clone, Debug)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl TlsServer {
    /// Uses a rustls configuration built by hand.
    pub fn from_config(config: Arc<ServerConfig>) -> TlsServer {
        TlsServer { config }
    }

    /// Presents the certificate chain in `cert` with the key in `key` (PEM files); asks no
    /// client certificate.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsServer, TlsError> {
        Ok(TlsServer::from_config(server_config(cert, key, None)?))
    }

    /// Like [`from_pem_files`](Self::from_pem_files), and requires every client to present a
    /// certificate that chains to the CA in `client_ca` (mutual TLS).
    pub fn mutual_from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        client_ca: impl AsRef<Path>,
    ) -> Result<TlsServer, TlsError> {
        let config = server_config(cert, key, Some(client_ca.as_ref()))?;
        Ok(TlsServer::from_config(config))
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Runs the server handshake over `io`, bounded by `timeout`.
    pub(crate) async fn handshake<S>(
        &self,
        io: S,
        timeout: Duration,
    ) -> Result<tokio_rustls::server::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        match tokio::time::timeout(timeout, acceptor.accept(io)).await {
            Err(_) => Err(TlsError::HandshakeTimeout { after: timeout }),
            Ok(Err(e)) => Err(classify(Side::Server, e)),
            Ok(Ok(stream)) => Ok(stream),
        }
    }
}

/// A client TLS stream whose read errors say who refused whom.
///
/// Under TLS 1.3 a server refuses a client certificate after the client's handshake is done:
/// the refusal arrives as an alert on the first read, and this turns it into the matching
/// [`TlsError`] (inside the `io::Error`) so the session's close reason names it.
pub(crate) struct ClientTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => {
                let kind = e.kind();
                Poll::Ready(Err(match classify(Side::Client, e) {
                    TlsError::Handshake { error } => error,
                    named => io::Error::new(kind, named),
                }))
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_failures_are_worded_from_each_side() {
        let io_err = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let bad = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let err = classify(Side::Client, io_err(bad()));
        assert!(
            matches!(err, TlsError::ClientDoesNotTrustServer { .. }),
            "{err:?}"
        );
        // The cause is in the message, once: not also a source.
        assert_eq!(
            err.to_string(),
            format!(
                "this client does not trust the server's certificate: {}",
                bad()
            )
        );
        assert!(std::error::Error::source(&err).is_none());
        assert!(matches!(
            classify(Side::Server, io_err(bad())),
            TlsError::ServerDoesNotTrustClientCertificate { .. }
        ));
        let alert = |a| io_err(rustls::Error::AlertReceived(a));
        assert!(matches!(
            classify(Side::Client, alert(AlertDescription::CertificateRequired)),
            TlsError::ServerRequiresClientCertificate
        ));
        assert!(matches!(
            classify(Side::Client, alert(AlertDescription::UnknownCA)),
            TlsError::ServerDoesNotTrustClient { .. }
        ));
        assert!(matches!(
            classify(Side::Server, alert(AlertDescription::UnknownCA)),
            TlsError::ClientDoesNotTrustThisServer { .. }
        ));
        assert!(matches!(
            classify(Side::Server, io_err(rustls::Error::NoCertificatesPresented)),
            TlsError::ClientSentNoCertificate
        ));
        assert!(matches!(
            classify(Side::Server, io::ErrorKind::ConnectionReset.into()),
            TlsError::Handshake { .. }
        ));
    }

    #[test]
    fn missing_or_empty_pem_files_give_clear_errors() {
        let dir = std::env::temp_dir().join(format!("netchan-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            load_certs(&empty).unwrap_err(),
            TlsError::NoCertificate { .. }
        ));
        assert!(matches!(
            load_key(&empty).unwrap_err(),
            TlsError::NoKey { .. }
        ));
        let err = load_certs(dir.join("missing.pem")).unwrap_err();
        assert!(
            err.to_string().contains("missing.pem: No such file"),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_none(), "{err:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
