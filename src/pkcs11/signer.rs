//! The token's key as rustls sees it: a `SigningKey` whose `Signer` asks the token, and a
//! client-certificate resolver that presents it. Which TLS signature schemes a key offers,
//! what the token is asked to sign for each, and what comes back are rule fns.

use std::sync::Arc;

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use super::token::{Found, Token};
use super::{Error, KeyKind, KeyRef, der, refuse};

/// A token key ready for TLS.
pub struct Identity {
    /// The certificate presented (the leaf).
    pub cert: CertificateDer<'static>,
    /// Presents the certificate and signs with the token (`with_client_cert_resolver`).
    pub resolver: Arc<dyn ResolvesClientCert>,
    /// "EC P-256 key in token \"gw\"", for `check-config` and `doctor`.
    pub description: String,
}

/// Opens the token, finds the key and its certificate (`cert`, else the token's), checks
/// that the token can sign a TLS handshake and that the key belongs to the certificate.
/// Blocks on the token: call it off the async runtime.
pub fn identity(
    key: &KeyRef,
    cert: Option<Vec<CertificateDer<'static>>>,
) -> Result<Identity, Error> {
    let (token, found) = Token::open(key)?;
    let schemes = schemes(found.kind, &found.mechanisms);
    if schemes.is_empty() {
        return Err(refuse(
            "mqtt.key",
            format!(
                "token {:?} cannot sign a TLS handshake with its {} key: {}",
                found.label,
                found.kind,
                no_scheme(found.kind)
            ),
            "use an EC P-256 key, or an RSA key of 2048 bits or more on a token with RSA-PSS",
        ));
    }
    let chain = certificate(cert, &found)?;
    check_pair(&token, &schemes, &chain[0], key)?;
    let signing = Arc::new(TokenKey {
        token,
        kind: found.kind,
        schemes,
    });
    Ok(Identity {
        cert: chain[0].clone(),
        resolver: Arc::new(Resolver(Arc::new(CertifiedKey::new(chain, signing)))),
        description: format!("{} key in token {:?}", found.kind, found.label),
    })
}

/// The chain to present: `mqtt.cert`'s, else the token's certificate object.
fn certificate(
    cert: Option<Vec<CertificateDer<'static>>>,
    found: &Found,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    match (cert, &found.cert) {
        (Some(chain), _) if !chain.is_empty() => Ok(chain),
        (_, Some(der)) => Ok(vec![CertificateDer::from(der.clone())]),
        _ => Err(refuse(
            "mqtt.cert",
            format!(
                "is not set and token {:?} has no certificate with the key's id or label",
                found.label
            ),
            "set mqtt.cert to the device certificate, or store it in the token with the key's id (pkcs11-tool --write-object cert.der --type cert --id <id>)",
        )),
    }
}

/// Signs a fresh challenge with the token and verifies it with the certificate's key.
fn check_pair(
    token: &Token,
    schemes: &[SignatureScheme],
    cert: &CertificateDer<'_>,
    key: &KeyRef,
) -> Result<(), Error> {
    let scheme = schemes[0];
    let mut challenge = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut challenge)
        .map_err(|_| refuse("mqtt.key", "no random bytes for the key check", "retry"))?;
    let sig = sign(token, scheme, &challenge)?;
    if verifies(cert, scheme, &challenge, &sig) {
        return Ok(());
    }
    Err(refuse(
        "mqtt.key",
        format!(
            "the token's key {} does not belong to the certificate",
            key.text
        ),
        "give the certificate issued for this key (mqtt.cert), or the key it was issued for",
    ))
}

/// Rule: whether `sig` is `cert`'s key's signature of `message` under `scheme`.
pub(super) fn verifies(
    cert: &CertificateDer<'_>,
    scheme: SignatureScheme,
    message: &[u8],
    sig: &[u8],
) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let provider = crate::tls::provider();
    let algs = provider.signature_verification_algorithms;
    algs.mapping
        .iter()
        .filter(|(s, _)| *s == scheme)
        .flat_map(|(_, algs)| algs.iter())
        .any(|alg| ee.verify_signature(*alg, message, sig).is_ok())
}

/// Rule: the TLS schemes a key offers, best first, given the token's mechanisms: ECDSA over
/// our SHA digest (`CKM_ECDSA`); for RSA, PSS (without it a TLS 1.3 handshake has no scheme
/// to sign with, so the key is refused), then PKCS#1 v1.5, with SHA-256.
pub(super) fn schemes(kind: KeyKind, mechanisms: &[MechanismType]) -> Vec<SignatureScheme> {
    let has = |m: MechanismType| mechanisms.contains(&m);
    let mut out = Vec::new();
    match kind {
        KeyKind::EcP256 if has(MechanismType::ECDSA) => {
            out.push(SignatureScheme::ECDSA_NISTP256_SHA256)
        }
        KeyKind::EcP384 if has(MechanismType::ECDSA) => {
            out.push(SignatureScheme::ECDSA_NISTP384_SHA384)
        }
        KeyKind::Rsa { bits } if bits >= 2048 && has(MechanismType::RSA_PKCS_PSS) => {
            out.push(SignatureScheme::RSA_PSS_SHA256);
            if has(MechanismType::RSA_PKCS) {
                out.push(SignatureScheme::RSA_PKCS1_SHA256);
            }
        }
        _ => {}
    }
    out
}

/// Why a key has no scheme, for the error.
fn no_scheme(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::EcP256 | KeyKind::EcP384 => "the token does not offer CKM_ECDSA",
        KeyKind::Rsa { bits } if bits < 2048 => "RSA keys need at least 2048 bits",
        KeyKind::Rsa { .. } => {
            "the token does not offer CKM_RSA_PKCS_PSS, which TLS 1.3 needs for an RSA key"
        }
    }
}

/// Rule: the mechanism and input the token gets for `scheme`: the digest of `message`
/// (with its `DigestInfo` for PKCS#1 v1.5).
pub(super) fn request(
    scheme: SignatureScheme,
    message: &[u8],
) -> Option<(Mechanism<'static>, Vec<u8>)> {
    use ring::digest::{SHA256, SHA384, digest};
    let sha256 = || digest(&SHA256, message).as_ref().to_vec();
    match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 => Some((Mechanism::Ecdsa, sha256())),
        SignatureScheme::ECDSA_NISTP384_SHA384 => {
            Some((Mechanism::Ecdsa, digest(&SHA384, message).as_ref().to_vec()))
        }
        SignatureScheme::RSA_PSS_SHA256 => {
            let params = PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32.into(),
            };
            Some((Mechanism::RsaPkcsPss(params), sha256()))
        }
        SignatureScheme::RSA_PKCS1_SHA256 => {
            let mut input = der::SHA256_DIGEST_INFO.to_vec();
            input.extend(sha256());
            Some((Mechanism::RsaPkcs, input))
        }
        _ => None,
    }
}

/// Rule: the token's output as TLS wants it: ECDSA's `r || s` as DER, RSA as is.
pub(super) fn finish(scheme: SignatureScheme, raw: Vec<u8>) -> Option<Vec<u8>> {
    match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 | SignatureScheme::ECDSA_NISTP384_SHA384 => {
            der::ecdsa_signature(&raw)
        }
        _ => Some(raw),
    }
}

/// One signature by the token, in TLS's form.
fn sign(token: &Token, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, Error> {
    let (mechanism, input) = request(scheme, message)
        .ok_or_else(|| refuse("mqtt.key", format!("{scheme:?} is not supported"), ""))?;
    let raw = token.sign(&mechanism, &input)?;
    finish(scheme, raw).ok_or_else(|| {
        refuse(
            "mqtt.key",
            "the token returned a malformed ECDSA signature",
            "check the token's module",
        )
    })
}

struct TokenKey {
    token: Arc<Token>,
    kind: KeyKind,
    schemes: Vec<SignatureScheme>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey({})", self.kind)
    }
}

impl SigningKey for TokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = *self.schemes.iter().find(|s| offered.contains(s))?;
        Some(Box::new(TokenSigner {
            token: self.token.clone(),
            scheme,
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.kind {
            KeyKind::EcP256 | KeyKind::EcP384 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa { .. } => SignatureAlgorithm::RSA,
        }
    }
}

struct TokenSigner {
    token: Arc<Token>,
    scheme: SignatureScheme,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSigner({:?})", self.scheme)
    }
}

impl Signer for TokenSigner {
    /// Runs during the handshake, on the thread driving it (`Agent::start_mqtt` runs
    /// the MQTT client on its own thread when its key is in a token).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        sign(&self.token, self.scheme, message).map_err(|e| {
            tracing::warn!("{e}");
            rustls::Error::General(e.to_string())
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertifiedKey>);

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
