//! TLS configuration from PEM files, through the netchan library's TLS layer
//! ([`netchan::net::tls`]).
//!
//! The hub serves TLS with `--tls-cert/--tls-key` and, with `--tls-client-ca`, requires a client
//! certificate signed by that CA (mutual TLS). Clients verify the hub against `--tls-ca` and may
//! present `--tls-cert/--tls-key`.

use std::{path::Path, sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

pub(crate) use netchan::net::tls::TlsError;
#[cfg(test)]
use netchan::net::tls::{load_certs, load_key};

/// Longest a TLS handshake may take before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The hub's TLS configuration; `client_ca` requires client certificates signed by it.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    netchan::net::tls::server_config(cert, key, client_ca)
}

/// A client's TLS configuration: trusts `ca`, optionally presents a client certificate.
pub(crate) fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    netchan::net::tls::client_config(ca, client_cert)
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
pub(crate) fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => addr,
    }
}

/// The rustls error inside an i/o error from a TLS stream, if that is what it is.
pub(crate) fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A failed client handshake with the hub at `addr`, in plain words: who did not trust whom
/// and what to pass, or that the hub hung up (a plaintext hub does that to a TLS client).
pub(crate) fn explain_handshake(addr: &str, e: &std::io::Error) -> String {
    use rustls::AlertDescription as A;
    use std::io::ErrorKind::{ConnectionReset, UnexpectedEof};
    match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(why)) => format!(
            "this client does not trust the hub's certificate ({why:?}): --tls-ca must be the \
             CA that signed the hub's certificate, and the certificate must name {}",
            host_of(addr)
        ),
        Some(rustls::Error::AlertReceived(A::CertificateRequired)) => {
            "the hub requires a client certificate: pass --tls-cert and --tls-key (signed by \
             the CA the hub was given with --tls-client-ca)"
                .to_owned()
        }
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied
            | A::DecryptError,
        )) => "the hub does not trust this client's certificate: it must be signed by the CA \
               the hub was given with --tls-client-ca"
            .to_owned(),
        _ if matches!(e.kind(), UnexpectedEof | ConnectionReset) => format!(
            "the hub at {addr} hung up during the TLS handshake; it may be a plaintext hub \
             (connect without --tls-ca)"
        ),
        _ => format!("the TLS handshake with the hub at {addr} failed"),
    }
}

/// Whether `e` is a certificate refusal from either side (not a broken link).
pub(crate) fn is_tls_refusal(e: &std::io::Error) -> bool {
    !is_transient(e)
}

/// Whether a failed handshake may succeed later unchanged: anything but a certificate that
/// one side does not trust (or does not have).
pub(crate) fn is_transient(e: &std::io::Error) -> bool {
    !matches!(
        rustls_error(e),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::AlertReceived(_))
    )
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
        let err = load_certs(dir.path().join("missing.pem")).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
