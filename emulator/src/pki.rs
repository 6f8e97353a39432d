//! A throwaway PKI minted in-process with rcgen: a CA, server certificates for loopback
//! names, client certificates whose CN is a thing name. Certificates are X.509 v3 with SANs:
//! rustls (webpki) refuses other versions (`UnsupportedCertVersion`) and matches names
//! against subjectAltName only, never the CN.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct TestPki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its PKCS#8 key, in PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    pub fn cert_der(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .filter_map(Result::ok)
            .collect()
    }

    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, rustls::pki_types::pem::Error> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
    }
}

impl TestPki {
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(TestPki { ca })
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Server certificate for `localhost`, 127.0.0.1 and ::1 plus `extra` names.
    pub fn server(&self, extra: &[&str]) -> Result<Issued, rcgen::Error> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
        names.extend(extra.iter().map(|s| s.to_string()));
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// Client certificate whose CN (and so its MQTT identity) is `cn`.
    pub fn client(&self, cn: &str) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// A client certificate for `cn` that expired at the end of 2021.
    pub fn expired_client(&self, cn: &str) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2021, 1, 1);
        params.not_after = rcgen::date_time_ymd(2022, 1, 1);
        self.issue(params)
    }

    /// A client certificate for `cn` over a public key held elsewhere (a token's), in PEM.
    pub fn client_for_key(
        &self,
        cn: &str,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params.signed_by(key, &self.ca)?.pem())
    }

    fn issue(&self, params: CertificateParams) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A rustls client config trusting `ca_pem` and presenting `identity` (mutual TLS).
pub fn mutual_tls_client(
    ca_pem: &str,
    identity: &Issued,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    let mut trust = securetunnel_agent::tls::TlsOptions::default();
    trust
        .add_ca_pem(ca_pem.as_bytes())
        .map_err(|e| e.to_string())?;
    let roots = securetunnel_agent::tls::root_store(&trust).map_err(|e| e.to_string())?;
    let key = identity.key_der().map_err(|e| format!("{e:?}"))?;
    let config = rustls::ClientConfig::builder_with_provider(securetunnel_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.cert_der(), key)
        .map_err(|e| e.to_string())?;
    Ok(std::sync::Arc::new(config))
}
