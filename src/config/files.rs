//! The files a configuration names: certificates, key and CAs read, the TLS configurations
//! built (`check-config` and the agent's start).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Config, ConfigError, ConfigErrors, err};
use crate::tls::{TlsError, TlsOptions, client_config, provider, root_store};

/// What the files named by a config turned into.
#[derive(Clone)]
pub struct Checked {
    pub mqtt_tls: Arc<rustls::ClientConfig>,
    pub tunnel_tls: Arc<rustls::ClientConfig>,
    pub warnings: Vec<String>,
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
/// PKCS#1) and belongs to the certificate, and the TLS configurations build.
pub fn check_files(cfg: &Config) -> Result<Checked, ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let cert = read_certs("mqtt.cert", &cfg.mqtt.cert)
        .map_err(|e| errors.push(e))
        .ok();
    let key = PrivateKeyDer::from_pem_file(&cfg.mqtt.key)
        .map_err(|e| {
            errors.push(err(
                "mqtt.key",
                format!("{}: {}", cfg.mqtt.key.display(), pem_problem(&e)),
                "give the device's private key in PEM (PKCS#8, SEC1 or PKCS#1)",
            ))
        })
        .ok();
    if let Ok(meta) = std::fs::metadata(&cfg.mqtt.key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            warnings.push(format!(
                "mqtt.key: {} is readable by group or others (mode {mode:04o}); run chmod 600 on it",
                cfg.mqtt.key.display()
            ));
        }
    }
    // mqtt.ca pins the broker: only those roots.
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
    let mut mqtt_tls = None;
    if let (Some(cert), Some(key)) = (cert, key) {
        match mqtt_client_config(cfg, &mqtt_trust, cert, key) {
            Ok(c) => mqtt_tls = Some(c),
            Err(e) => errors.push(e),
        }
    }
    let tunnel_tls = client_config(&tunnel_trust)
        .map_err(|e| errors.push(err("tunnel.ca", e.to_string(), "")))
        .ok();
    match (errors.is_empty(), mqtt_tls, tunnel_tls) {
        (true, Some(mqtt_tls), Some(tunnel_tls)) => Ok(Checked {
            mqtt_tls,
            tunnel_tls,
            warnings,
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

fn mqtt_client_config(
    cfg: &Config,
    trust: &TlsOptions,
    cert: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let roots = root_store(trust).map_err(|e| match e {
        TlsError::NoRoots => err(
            "mqtt.ca",
            "no trusted CA certificate",
            "set mqtt.ca to AmazonRootCA1.pem",
        ),
        other => err("mqtt.ca", other.to_string(), "give a valid CA certificate"),
    })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("mqtt", e.to_string(), ""))?
        .with_root_certificates(roots)
        .with_client_auth_cert(cert, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => err(
                "mqtt.key",
                format!(
                    "{} does not belong to the certificate {}",
                    cfg.mqtt.key.display(),
                    cfg.mqtt.cert.display()
                ),
                "use the private key that was created with this certificate",
            ),
            other => err(
                "mqtt.key",
                other.to_string(),
                "give the device's private key in PEM",
            ),
        })?;
    if let Some(p) = &cfg.mqtt.alpn {
        config.alpn_protocols = vec![p.as_bytes().to_vec()];
    }
    Ok(Arc::new(config))
}
