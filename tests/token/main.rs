//! The token tier: a SoftHSM2 token used in this test process through the agent's own
//! `pkcs11` module. Its own binary, because SoftHSM2 reads SOFTHSM2_CONF once per process
//! (the peers tier gives each agent process its own token instead).
#![cfg(feature = "pkcs11")]

#[path = "../common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use common::softhsm::{KeyType, MODULE, SoftHsm};
use rustls::SignatureScheme;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use securetunnel_agent::pkcs11::{self, KeyRef};

/// A signature of `message` by the identity's key, as a TLS handshake asks for it.
fn sign(id: &pkcs11::Identity, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
    let scheme = SignatureScheme::ECDSA_NISTP256_SHA256;
    let certified = id.resolver.resolve(&[], &[scheme]).expect("a certificate");
    let signer = certified
        .key
        .choose_scheme(&[scheme])
        .expect("an ECDSA signer");
    signer.sign(message)
}

/// Another session of this process logs the token out: every session loses its login, as
/// after a token reset.
fn log_out() {
    let module = pkcs11::module(Path::new(MODULE)).unwrap();
    let slot = module.get_slots_with_token().unwrap()[0];
    module.open_ro_session(slot).unwrap().logout().unwrap();
}

// One test: SoftHSM2 reads SOFTHSM2_CONF once per process.
#[test]
fn a_lost_login_is_opened_again_and_a_refused_pin_is_not_retried_until_its_file_changes() {
    let hsm = SoftHsm::new("gw");
    // SAFETY: the only test of this binary, before anything reads the environment.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &hsm.conf) };
    let public = hsm.keypair(KeyType::EcP256, "device", "01");
    let pki = securetunnel_emulator::pki::TestPki::new("token CA").unwrap();
    let pem = pki.client_for_key("gw-token", &public).unwrap();
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let text = "pkcs11:token=gw;object=device";
    let key = KeyRef {
        text: text.to_owned(),
        uri: pkcs11::uri::parse(text).unwrap(),
        module: PathBuf::from(MODULE),
        pin_file: hsm.pin_file.clone(),
    };
    let id = pkcs11::identity(&key, Some(vec![cert.clone()])).unwrap();
    assert!(sign(&id, b"before").is_ok());

    log_out();
    let sig = sign(&id, b"after").expect("a new session signs");
    let ee = webpki::EndEntityCert::try_from(&cert).unwrap();
    let alg = webpki::ring::ECDSA_P256_SHA256;
    assert!(ee.verify_signature(alg, b"after", &sig).is_ok());

    // The PIN file now holds a wrong PIN: the token refuses it once, and it is not offered
    // again (each try counts towards the token's lock) until the file changes.
    std::fs::write(&hsm.pin_file, "00000000\n").unwrap();
    log_out();
    let first = sign(&id, b"x").unwrap_err().to_string();
    assert!(first.contains("refused the PIN"), "{first}");
    let again = sign(&id, b"x").unwrap_err().to_string();
    assert!(
        again.contains("not tried again until the file changes"),
        "{again}"
    );
    assert!(!again.contains(hsm.pin()) && !first.contains(hsm.pin()));
    std::fs::write(&hsm.pin_file, format!("{}\n", hsm.pin())).unwrap();
    assert!(sign(&id, b"fixed").is_ok());
}
