//! TLS client configuration for the data plane: rustls with the ring provider, the platform
//! roots plus optional extra CA certificates, or (loudly) no verification at all.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A CA file or directory that cannot be used.
    #[error("CA path {path}: {problem}")]
    CaPath {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// No trusted root at all.
    #[error(
        "no trusted CA certificate found: install the system CA bundle (ca-certificates) or give one with -c/--capath"
    )]
    NoRoots,
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where trust comes from.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Load the operating system's CA store.
    pub platform_roots: bool,
    /// Extra trusted certificates (from `-c/--capath` or a test CA).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Accept any server certificate. Only for testing against an emulator.
    pub insecure_skip_verify: bool,
}

impl TlsOptions {
    /// Trust the operating system's CA store.
    pub fn platform() -> Self {
        TlsOptions {
            platform_roots: true,
            ..Default::default()
        }
    }

    /// Adds every certificate in a PEM file, or in each file of a directory of PEM files.
    pub fn add_ca_path(&mut self, path: &Path) -> Result<(), TlsError> {
        let err = |problem: String| TlsError::CaPath {
            path: path.to_owned(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        let files: Vec<PathBuf> = if meta.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| err(e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_owned()]
        };
        let before = self.extra_roots.len();
        for file in &files {
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>());
            match certs {
                Ok(c) => self.extra_roots.extend(c),
                // In a directory, skip what is not PEM; a named file must be PEM.
                Err(e) if meta.is_dir() => {
                    tracing::warn!(file = %file.display(), "skipping CA file: {e}")
                }
                Err(e) => return Err(err(format!("not a PEM certificate file: {e}"))),
            }
        }
        if self.extra_roots.len() == before {
            return Err(err("contains no PEM certificate".into()));
        }
        Ok(())
    }

    /// Adds every certificate of a PEM text.
    pub fn add_ca_pem(&mut self, pem: &[u8]) -> Result<(), TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::CaPath {
                path: PathBuf::from("<memory>"),
                problem: e.to_string(),
            })?;
        self.extra_roots.extend(certs);
        Ok(())
    }
}

/// The ring crypto provider every TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client config once; every (re)connect of every bridge shares it.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if opts.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(root_store(opts)?)
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The trusted roots `opts` asks for: the platform store and/or the extra certificates.
pub fn root_store(opts: &TlsOptions) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if opts.platform_roots {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!("platform CA store: {e}");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "platform CA certificates loaded");
    }
    for cert in &opts.extra_roots {
        roots.add(cert.clone())?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}

/// `-k`: accepts any certificate but still checks the handshake signatures.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_path_that_is_not_pem_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let err = TlsOptions::default().add_ca_path(&f).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        let err = TlsOptions::default().add_ca_path(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn no_roots_at_all_is_an_error_that_says_what_to_install() {
        let err = client_config(&TlsOptions::default()).unwrap_err();
        assert!(matches!(err, TlsError::NoRoots));
        assert!(
            client_config(&TlsOptions {
                insecure_skip_verify: true,
                ..Default::default()
            })
            .is_ok()
        );
    }
}
