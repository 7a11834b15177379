//! Certificates for the QUIC tests, made on the fly.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use syncbus::QuicConfig;

/// A certificate authority, and node certificates it signs, as PEM files in a
/// directory of the test's own.
pub struct Authority {
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

impl Authority {
    pub fn new(name: &str) -> Authority {
        let dir = std::env::temp_dir().join(format!(
            "syncbus-quic-{name}-{}-{:x}",
            std::process::id(),
            getrandom::u64().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Authority {
            dir,
            issuer: Issuer::new(params, key),
            ca_file,
        }
    }

    /// A node certificate for the name `syncbus`, trusting this authority.
    pub fn node(&self, name: &str) -> QuicConfig {
        self.node_named(name, "syncbus")
    }

    /// A node certificate for `dns_name`, trusting this authority.
    pub fn node_named(&self, name: &str, dns_name: &str) -> QuicConfig {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![dns_name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_file = self.dir.join(format!("{name}.pem"));
        let key_file = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        QuicConfig::new(cert_file, key_file, &self.ca_file)
    }
}
