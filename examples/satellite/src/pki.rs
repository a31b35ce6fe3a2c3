//! Throwaway certificates for the demo and the tests: a CA, a server certificate for
//! `localhost` and 127.0.0.1, and a client certificate, written as PEM files. Nothing here is
//! ever committed; for a manual run, make the same files with openssl (see the README).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// The PEM files [`generate`] writes.
#[derive(Debug, Clone)]
pub struct PemFiles {
    /// The CA certificate both sides trust.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// The client's certificate and key.
    pub client: (PathBuf, PathBuf),
}

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused.
    #[error("cannot generate a certificate")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Generates a CA (named `name`), a server and a client certificate into `dir`.
pub fn generate(dir: &Path, name: &str) -> Result<PemFiles, PkiError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let write = |file: &str, pem: String| -> Result<PathBuf, PkiError> {
        let path = dir.join(file);
        match std::fs::write(&path, pem) {
            Ok(()) => Ok(path),
            Err(source) => Err(PkiError::Write { path, source }),
        }
    };
    let leaf = |file: &str, sans: &[&str]| -> Result<(PathBuf, PathBuf), PkiError> {
        let key = KeyPair::generate()?;
        let sans = sans.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cert = CertificateParams::new(sans)?.signed_by(&key, &issuer)?;
        Ok((
            write(&format!("{file}.pem"), cert.pem())?,
            write(&format!("{file}.key"), key.serialize_pem())?,
        ))
    };
    Ok(PemFiles {
        ca: write(&format!("{name}-ca.pem"), ca_cert.pem())?,
        server: leaf(&format!("{name}-server"), &["localhost", "127.0.0.1"])?,
        client: leaf(&format!("{name}-client"), &["client.satellite"])?,
    })
}
