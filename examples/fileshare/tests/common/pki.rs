//! Test certificates: a CA and the certificates it signs, as PEM files. Shared by the
//! integration tests and the hub's unit tests (which include this file by path).

use std::path::Path;

/// A CA and certificates it signs for 127.0.0.1, as PEM files: `CA.pem`, and `NAME.pem` and
/// `NAME.key` for each of `names`.
pub(crate) fn write_pki(dir: &Path, ca: &str, names: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join(format!("{ca}.pem")), ca_cert.pem()).unwrap();
    for name in names {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}
