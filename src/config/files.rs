//! The files a configuration names: certificates, key and CAs read, the TLS configurations
//! built (`check-config` and the agent's start).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Config, ConfigError, ConfigErrors, DeviceKey, err};
use crate::tls::{TlsError, TlsOptions, client_config, provider, root_store};

/// What the files named by a config turned into.
#[derive(Clone)]
pub struct Checked {
    pub mqtt_tls: Arc<rustls::ClientConfig>,
    pub tunnel_tls: Arc<rustls::ClientConfig>,
    pub identity: Identity,
    pub warnings: Vec<String>,
}

/// What the device presents to the broker.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The device certificate (from `mqtt.cert` or the token).
    pub cert: CertificateDer<'static>,
    /// Where the certificate is, for messages: the file, or "the token".
    pub cert_source: String,
    /// The key, for `check-config` and `doctor`: "matches the certificate", or its type in
    /// its token.
    pub key: String,
    /// The key is in a token: the handshake's signature blocks on it.
    pub in_token: bool,
}

/// How the MQTT client authenticates: a key from a file, or a token's resolver.
enum ClientAuth {
    Pem(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    #[cfg_attr(not(feature = "pkcs11"), allow(dead_code))]
    Token(Arc<dyn rustls::client::ResolvesClientCert>),
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            err(
                key,
                format!("{}: {}", path.display(), pem_problem(&e)),
                "give a PEM certificate file",
            )
        })?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("{} holds no PEM certificate", path.display()),
            "give a PEM certificate file",
        ));
    }
    Ok(certs)
}

fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Opens every file the config names: certificates parse, the key loads (PKCS#8, SEC1 or
/// PKCS#1, or from its token) and belongs to the certificate, and the TLS configurations
/// build. A token key opens the token: call it off the async runtime.
pub fn check_files(cfg: &Config) -> Result<Checked, ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    // An unreadable mqtt.cert is its own error: a key file is still read (every missing file
    // is named at once), a token is not opened to be checked against nothing.
    let cert = match &cfg.mqtt.cert {
        Some(path) => read_certs("mqtt.cert", path)
            .map(Some)
            .map_err(|e| errors.push(e)),
        None => Ok(None),
    };
    let auth = match (&cfg.mqtt.key, cert) {
        (DeviceKey::File(path), cert) => {
            pem_identity(cfg, path, cert.ok().flatten(), &mut warnings)
        }
        (DeviceKey::Token(key), Ok(cert)) => {
            token_identity(cfg, key, cert, &mut warnings).map(Some)
        }
        (DeviceKey::Token(_), Err(())) => Ok(None),
    }
    .map_err(|e| errors.push(e))
    .ok()
    .flatten();
    let (mqtt_trust, tunnel_trust) = trust(cfg, &mut errors);
    let mut mqtt_tls = None;
    let mut identity = None;
    if let Some((auth, about)) = auth {
        match mqtt_client_config(cfg, &mqtt_trust, auth) {
            Ok(c) => (mqtt_tls, identity) = (Some(c), Some(about)),
            Err(e) => errors.push(e),
        }
    }
    let tunnel_tls = client_config(&tunnel_trust)
        .map_err(|e| errors.push(err("tunnel.ca", e.to_string(), "")))
        .ok();
    match (errors.is_empty(), mqtt_tls, tunnel_tls, identity) {
        (true, Some(mqtt_tls), Some(tunnel_tls), Some(identity)) => Ok(Checked {
            mqtt_tls,
            tunnel_tls,
            identity,
            warnings,
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Whom MQTT and the data plane trust: `mqtt.ca` pins the broker (only those roots);
/// `tunnel.ca` adds to the platform's roots, or replaces them with `tunnel.ca_only`.
fn trust(cfg: &Config, errors: &mut Vec<ConfigError>) -> (TlsOptions, TlsOptions) {
    let mut mqtt_trust = if cfg.mqtt.ca.is_some() {
        TlsOptions::default()
    } else {
        TlsOptions::platform()
    };
    if let Some(ca) = &cfg.mqtt.ca {
        if let Err(e) = read_certs("mqtt.ca", ca).map(|c| mqtt_trust.extra_roots.extend(c)) {
            errors.push(e);
        }
    }
    let mut tunnel_trust = TlsOptions {
        platform_roots: !cfg.tunnel.ca_only,
        ..TlsOptions::default()
    };
    if cfg.tunnel.ca_only && cfg.tunnel.ca.is_none() {
        errors.push(err(
            "tunnel.ca_only",
            "is true but tunnel.ca is not set: nothing would be trusted",
            "set tunnel.ca to the CA file or directory to pin, or ca_only = false",
        ));
    }
    if let Some(ca) = &cfg.tunnel.ca {
        if let Err(e) = tunnel_trust.add_ca_path(ca) {
            errors.push(err(
                "tunnel.ca",
                e.to_string(),
                "give a PEM file or a directory of PEM files",
            ));
        }
    }
    (mqtt_trust, tunnel_trust)
}

fn mqtt_client_config(
    cfg: &Config,
    trust: &TlsOptions,
    auth: ClientAuth,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let roots = root_store(trust).map_err(|e| match e {
        TlsError::NoRoots => err(
            "mqtt.ca",
            "no trusted CA certificate",
            "set mqtt.ca to AmazonRootCA1.pem",
        ),
        other => err("mqtt.ca", other.to_string(), "give a valid CA certificate"),
    })?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("mqtt", e.to_string(), ""))?
        .with_root_certificates(roots);
    let mut config = match auth {
        ClientAuth::Token(resolver) => builder.with_client_cert_resolver(resolver),
        ClientAuth::Pem(cert, key) => builder
            .with_client_auth_cert(cert, key)
            .map_err(|e| key_refused(cfg, e))?,
    };
    if let Some(p) = &cfg.mqtt.alpn {
        config.alpn_protocols = vec![p.as_bytes().to_vec()];
    }
    Ok(Arc::new(config))
}

fn key_refused(cfg: &Config, e: rustls::Error) -> ConfigError {
    match e {
        rustls::Error::InconsistentKeys(_) => err(
            "mqtt.key",
            format!(
                "{} does not belong to the certificate {}",
                cfg.mqtt.key,
                cfg.mqtt.cert.as_deref().unwrap_or(Path::new("")).display()
            ),
            "use the private key that was created with this certificate",
        ),
        other => err(
            "mqtt.key",
            other.to_string(),
            "give the device's private key in PEM",
        ),
    }
}

/// Where the certificate comes from, for messages.
fn cert_source(cfg: &Config) -> String {
    match &cfg.mqtt.cert {
        Some(path) => path.display().to_string(),
        None => "the token's certificate object".to_owned(),
    }
}

/// Rule: a key or PIN file readable by group or others is worth a warning.
fn exposed(what: &str, path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then(|| {
        format!(
            "{what}: {} is readable by group or others (mode {mode:04o}); run chmod 600 on it",
            path.display()
        )
    })
}

/// A PEM key file and the certificate it goes with (`None`: the certificate could not be read).
fn pem_identity(
    cfg: &Config,
    path: &Path,
    cert: Option<Vec<CertificateDer<'static>>>,
    warnings: &mut Vec<String>,
) -> Result<Option<(ClientAuth, Identity)>, ConfigError> {
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| {
        err(
            "mqtt.key",
            format!("{}: {}", path.display(), pem_problem(&e)),
            "give the device's private key in PEM (PKCS#8, SEC1 or PKCS#1)",
        )
    })?;
    warnings.extend(exposed("mqtt.key", path));
    // Validation requires mqtt.cert with a key file.
    let chain =
        cert.ok_or_else(|| err("mqtt.cert", "is not set", "give the device certificate"))?;
    let identity = Identity {
        cert: chain[0].clone(),
        cert_source: cert_source(cfg),
        key: format!("{path} (matches the certificate)", path = path.display()),
        in_token: false,
    };
    Ok(Some((ClientAuth::Pem(chain, key), identity)))
}

/// A key in a token: opened, found, and checked against the certificate by a signature.
#[cfg(feature = "pkcs11")]
fn token_identity(
    cfg: &Config,
    key: &crate::pkcs11::KeyRef,
    cert: Option<Vec<CertificateDer<'static>>>,
    warnings: &mut Vec<String>,
) -> Result<(ClientAuth, Identity), ConfigError> {
    warnings.extend(exposed("mqtt.pkcs11_pin_file", &key.pin_file));
    let token = crate::pkcs11::identity(key, cert).map_err(|e| err(e.setting, e.problem, e.fix))?;
    let identity = Identity {
        cert_source: cert_source(cfg),
        cert: token.cert,
        key: format!(
            "{} ({}, matches the certificate)",
            key.text, token.description
        ),
        in_token: true,
    };
    Ok((ClientAuth::Token(token.resolver), identity))
}

#[cfg(not(feature = "pkcs11"))]
fn token_identity(
    _cfg: &Config,
    _key: &crate::pkcs11::KeyRef,
    _cert: Option<Vec<CertificateDer<'static>>>,
    _warnings: &mut Vec<String>,
) -> Result<(ClientAuth, Identity), ConfigError> {
    let e = crate::pkcs11::not_built();
    Err(err(e.setting, e.problem, e.fix))
}
