//! TLS configuration (rustls with the ring provider) from PEM files.
//!
//! The hub serves TLS with `--tls-cert/--tls-key` and, with `--tls-client-ca`, requires a client
//! certificate signed by that CA (mutual TLS). Clients verify the hub against `--tls-ca` and may
//! present `--tls-cert/--tls-key`.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Longest a TLS handshake may take before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be configured.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
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
    /// The server name to verify is not a valid DNS name or IP address.
    #[error("invalid TLS server name {name:?}")]
    ServerName {
        /// The name.
        name: String,
    },
    /// rustls refused the configuration (bad key, unusable CA...).
    #[error("invalid TLS configuration: {context}")]
    Config {
        /// Which part.
        context: &'static str,
        /// The rustls error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate of a PEM file (at least one).
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(&pem[..]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads the first private key of a PEM file.
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    rustls_pemfile::private_key(&mut BufReader::new(&pem[..]))
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store.add(cert).map_err(|e| TlsError::Config {
            context: "CA certificate",
            source: Box::new(e),
        })?;
    }
    Ok(Arc::new(store))
}

fn config_err(context: &'static str) -> impl FnOnce(rustls::Error) -> TlsError {
    move |e| TlsError::Config {
        context,
        source: Box::new(e),
    }
}

/// The hub's TLS configuration; `client_ca` requires client certificates signed by it.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
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
                .map_err(|e| TlsError::Config {
                    context: "client certificate verifier",
                    source: Box::new(e),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(config_err("hub certificate and key"))?;
    Ok(Arc::new(config))
}

/// A client's TLS configuration: trusts `ca`, optionally presents a client certificate.
pub(crate) fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err("protocol versions"))?
        .with_root_certificates(roots(ca)?);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(config_err("client certificate and key"))?,
    };
    Ok(Arc::new(config))
}

/// The name to verify in the hub's certificate: `override_name`, else the host part of `addr`.
pub(crate) fn server_name(
    addr: &str,
    override_name: Option<&str>,
) -> Result<ServerName<'static>, TlsError> {
    let host = match override_name {
        Some(n) => n,
        None => host_of(addr),
    };
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName {
        name: host.to_owned(),
    })
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_taken_from_the_address() {
        assert_eq!(host_of("127.0.0.1:8765"), "127.0.0.1");
        assert_eq!(host_of("hub.example:1"), "hub.example");
        assert_eq!(host_of("[::1]:8765"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
        assert!(matches!(
            server_name("127.0.0.1:1", None).unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("x:1", Some("hub.example")).unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("x:1", Some("bad name!")).is_err());
    }

    #[test]
    fn generated_certificates_load_into_both_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.pem"), ca.pem()).unwrap();
        std::fs::write(p("cert.pem"), cert.pem()).unwrap();
        std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
        server_config(&p("cert.pem"), &p("key.pem"), None).unwrap();
        server_config(&p("cert.pem"), &p("key.pem"), Some(&p("ca.pem"))).unwrap();
        client_config(&p("ca.pem"), None).unwrap();
        client_config(&p("ca.pem"), Some((&p("cert.pem"), &p("key.pem")))).unwrap();
    }

    #[test]
    fn missing_or_empty_pem_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = load_certs(&empty).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        let err = load_key(&empty).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");
        let err = load_certs(&dir.path().join("missing.pem")).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
