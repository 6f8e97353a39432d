//! A SoftHSM2 token of the test's own, in a temporary directory (SOFTHSM2_CONF): initialised
//! by softhsm2-util, keys generated inside it by OpenSC's pkcs11-tool (never imported from a
//! file), certificates written into it. The PIN is random, so a test can look for it in
//! any output.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::require_system_peers;

/// Debian's SoftHSM2 module (package softhsm2).
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub struct SoftHsm {
    /// The token's label.
    pub label: String,
    /// The SOFTHSM2_CONF every process using the token needs.
    pub conf: PathBuf,
    /// The user PIN's file (0600).
    pub pin_file: PathBuf,
    pin: String,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// Which key `keypair` generates.
#[derive(Clone, Copy)]
pub enum KeyType {
    EcP256,
    Rsa2048,
}

/// A public key from the token, as rcgen takes it for a certificate.
pub struct PublicKey {
    /// The SubjectPublicKeyInfo's BIT STRING contents.
    key: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl SoftHsm {
    /// A fresh token labelled `label`, with a random user PIN.
    pub fn new(label: &str) -> SoftHsm {
        require_system_peers();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        std::fs::create_dir(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        );
        std::fs::write(&conf, text).unwrap();
        let pin = format!("{:08}", fastrand::u32(10_000_000..100_000_000));
        let pin_file = dir.join("token.pin");
        std::fs::write(&pin_file, format!("{pin}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let hsm = SoftHsm {
            label: label.to_owned(),
            conf,
            pin_file,
            pin,
            dir,
            _tmp: tmp,
        };
        let so_pin = format!("{:08}", fastrand::u32(10_000_000..100_000_000));
        let args = [
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            &hsm.pin,
            "--so-pin",
            &so_pin,
        ];
        hsm.run("softhsm2-util", &args);
        hsm
    }

    /// A file beside the token (0600): another PIN, say.
    pub fn dir_file(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// The PIN, to look for in outputs (it must never be there).
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// Generates a key pair inside the token, labelled `label` with CKA_ID `id` (hex).
    pub fn keypair(&self, kind: KeyType, label: &str, id: &str) -> PublicKey {
        let key_type = match kind {
            KeyType::EcP256 => "EC:prime256v1",
            KeyType::Rsa2048 => "rsa:2048",
        };
        self.tool(&[
            "--login",
            "--keypairgen",
            "--key-type",
            key_type,
            "--label",
            label,
            "--id",
            id,
        ]);
        let out = self.dir.join(format!("{id}.pub.der"));
        let path = out.to_str().unwrap();
        self.tool(&[
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            id,
            "--output-file",
            path,
        ]);
        let spki = std::fs::read(&out).unwrap();
        let alg = match kind {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        };
        PublicKey {
            key: subject_public_key(&spki),
            alg,
        }
    }

    /// Stores the PEM certificate at `cert` in the token, with the key's label and id.
    pub fn store_cert(&self, cert: &Path, label: &str, id: &str) {
        let pem = std::fs::read_to_string(cert).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let file = self.dir.join(format!("{id}.crt.der"));
        std::fs::write(&file, der.as_ref()).unwrap();
        let path = file.to_str().unwrap();
        self.tool(&[
            "--login",
            "--write-object",
            path,
            "--type",
            "cert",
            "--label",
            label,
            "--id",
            id,
        ]);
    }

    /// pkcs11-tool on this token.
    fn tool(&self, args: &[&str]) {
        let mut all = vec![
            "--module",
            MODULE,
            "--token-label",
            &self.label,
            "--pin",
            &self.pin,
        ];
        all.extend_from_slice(args);
        self.run("pkcs11-tool", &all);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = Command::new(program)
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

use rustls::pki_types::pem::PemObject;

/// The BIT STRING contents of a DER SubjectPublicKeyInfo: SEQUENCE { algorithm, BIT STRING }.
fn subject_public_key(spki: &[u8]) -> Vec<u8> {
    let (_, body) = der_element(spki);
    let (alg_len, _) = der_element(body);
    let (_, bits) = der_element(&body[alg_len..]);
    // The first byte counts unused bits: 0 for keys.
    bits[1..].to_vec()
}

/// One DER element: (its whole length, its contents).
fn der_element(der: &[u8]) -> (usize, &[u8]) {
    let (len, header) = match der[1] {
        n if n < 0x80 => (n as usize, 2),
        n => {
            let k = (n & 0x7f) as usize;
            let len = der[2..2 + k]
                .iter()
                .fold(0usize, |a, &b| a << 8 | b as usize);
            (len, 2 + k)
        }
    };
    (header + len, &der[header..header + len])
}
