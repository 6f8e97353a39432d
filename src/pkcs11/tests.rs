use super::*;

#[test]
fn a_build_without_pkcs11_refuses_a_token_key_and_names_the_builds_with_it() {
    let e = unsupported_build(false).unwrap();
    assert_eq!(e.setting, "mqtt.key");
    assert!(e.problem.contains("static musl"), "{e:?}");
    assert!(e.fix.contains(".deb"), "{e:?}");
    assert_eq!(unsupported_build(true), None);
}

#[test]
fn the_curve_comes_from_the_named_curve_oid() {
    assert_eq!(curve(&P256_OID), Some(KeyKind::EcP256));
    assert_eq!(curve(&P384_OID), Some(KeyKind::EcP384));
    // secp256k1 (1.3.132.0.10) is not for TLS.
    assert_eq!(curve(&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a]), None);
}

#[test]
fn a_modulus_size_ignores_leading_zero_bytes() {
    let mut m = vec![0u8];
    m.extend([0xc0; 256]);
    assert_eq!(bits(&m), 2048);
    assert_eq!(bits(&[0x01, 0x00]), 9);
    assert_eq!(bits(&[]), 0);
    assert_eq!(KeyKind::Rsa { bits: 2048 }.to_string(), "RSA 2048");
}

fn facts<'a>(label: &'a str, serial: &'a str, slot: u64) -> TokenFacts<'a> {
    TokenFacts {
        label,
        manufacturer: "SoftHSM project",
        model: "SoftHSM v2",
        serial,
        slot,
    }
}

#[test]
fn a_token_matches_when_every_attribute_given_is_equal() {
    let uri = uri::parse("pkcs11:token=gw;serial=42;object=k").unwrap();
    assert!(token_matches(&uri, &facts("gw", "42", 7)));
    assert!(!token_matches(&uri, &facts("gw", "43", 7)));
    assert!(!token_matches(&uri, &facts("other", "42", 7)));
    let by_slot = uri::parse("pkcs11:slot-id=7;object=k").unwrap();
    assert!(token_matches(&by_slot, &facts("any", "1", 7)));
    assert!(!token_matches(&by_slot, &facts("any", "1", 8)));
    let any = uri::parse("pkcs11:object=k").unwrap();
    assert!(token_matches(&any, &facts("first", "1", 0)));
}

#[cfg(feature = "pkcs11")]
#[test]
fn an_error_lists_what_exists_or_says_none() {
    assert_eq!(listing(&[]), "none");
    assert_eq!(
        listing(&["a".into(), "\"b\" (id=%01)".into()]),
        "\"a\", \"b\" (id=%01)"
    );
    let uri = uri::parse("pkcs11:object=dev;id=%01%ff").unwrap();
    assert_eq!(describe_key(&uri), "labelled \"dev\" with id=%01%ff");
}

#[test]
fn the_pin_file_loses_one_trailing_newline_and_an_empty_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pin");
    std::fs::write(&path, "12 34\n").unwrap();
    assert_eq!(read_pin(&path).unwrap().expose(), "12 34");
    std::fs::write(&path, "5678\r\n").unwrap();
    assert_eq!(read_pin(&path).unwrap().expose(), "5678");
    std::fs::write(&path, "\n").unwrap();
    let e = read_pin(&path).unwrap_err();
    assert!(e.problem.contains("is empty"), "{e:?}");
    let e = read_pin(&dir.path().join("missing")).unwrap_err();
    assert!(e.problem.contains("missing"), "{e:?}");
    assert_eq!(e.setting, "mqtt.pkcs11_pin_file");
}

#[test]
fn a_refused_pin_is_tried_again_only_once_its_file_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pin");
    std::fs::write(&path, "1111\n").unwrap();
    let refused = FileStamp::of(&path);
    assert!(try_pin(None, refused.as_ref()));
    assert!(!try_pin(refused.as_ref(), FileStamp::of(&path).as_ref()));
    std::fs::write(&path, "22222\n").unwrap();
    assert!(try_pin(refused.as_ref(), FileStamp::of(&path).as_ref()));
    assert!(!try_pin(refused.as_ref(), None));
}

#[test]
fn a_pin_file_that_is_not_a_small_regular_file_is_not_read() {
    let e = read_pin(Path::new("/dev/zero")).unwrap_err();
    assert!(e.problem.contains("not a regular file"), "{e:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pin");
    std::fs::write(&path, vec![b'1'; 257]).unwrap();
    assert!(read_pin(&path).is_err());
}

#[cfg(feature = "pkcs11")]
mod signing {
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use rustls::SignatureScheme as S;

    use cryptoki::context::Function;
    use cryptoki::error::{Error, RvError};

    use super::super::signer::{finish, request, schemes, verifies};
    use super::super::token::{reopens, wrong_pin};
    use super::KeyKind;

    #[test]
    fn a_lost_session_or_login_opens_a_new_session_and_a_wrong_pin_does_not() {
        for rv in [
            RvError::SessionHandleInvalid,
            RvError::UserNotLoggedIn,
            RvError::DeviceRemoved,
        ] {
            assert!(reopens(&Error::Pkcs11(rv, Function::Sign)), "{rv:?}");
        }
        for rv in [
            RvError::PinIncorrect,
            RvError::MechanismInvalid,
            RvError::GeneralError,
        ] {
            assert!(!reopens(&Error::Pkcs11(rv, Function::Sign)), "{rv:?}");
        }
    }

    #[test]
    fn a_wrong_pin_is_told_from_a_locked_pin_and_other_login_errors() {
        let login = |rv| Error::Pkcs11(rv, Function::Login);
        assert!(wrong_pin(&login(RvError::PinIncorrect)));
        assert!(wrong_pin(&login(RvError::PinLenRange)));
        assert!(!wrong_pin(&login(RvError::PinLocked)));
        assert!(!wrong_pin(&login(RvError::DeviceError)));
    }

    #[test]
    fn a_key_offers_the_schemes_its_token_can_sign() {
        let all = [
            MechanismType::ECDSA,
            MechanismType::RSA_PKCS,
            MechanismType::RSA_PKCS_PSS,
        ];
        assert_eq!(schemes(KeyKind::EcP256, &all), [S::ECDSA_NISTP256_SHA256]);
        assert_eq!(schemes(KeyKind::EcP384, &all), [S::ECDSA_NISTP384_SHA384]);
        let rsa = KeyKind::Rsa { bits: 2048 };
        assert_eq!(schemes(rsa, &all), [S::RSA_PSS_SHA256, S::RSA_PKCS1_SHA256]);
        assert_eq!(
            schemes(rsa, &[MechanismType::RSA_PKCS_PSS]),
            [S::RSA_PSS_SHA256]
        );
        // Without PSS a TLS 1.3 handshake would find no scheme: the key is refused.
        assert!(schemes(rsa, &[MechanismType::RSA_PKCS]).is_empty());
        assert!(schemes(KeyKind::EcP256, &[MechanismType::RSA_PKCS]).is_empty());
        assert!(schemes(KeyKind::Rsa { bits: 1024 }, &all).is_empty());
    }

    #[test]
    fn the_token_signs_a_digest_with_the_schemes_mechanism() {
        let digest = ring::digest::digest(&ring::digest::SHA256, b"hello");
        let (m, input) = request(S::ECDSA_NISTP256_SHA256, b"hello").unwrap();
        assert!(matches!(m, Mechanism::Ecdsa));
        assert_eq!(input, digest.as_ref());
        let (m, input) = request(S::RSA_PSS_SHA256, b"hello").unwrap();
        assert!(matches!(m, Mechanism::RsaPkcsPss(_)));
        assert_eq!(input, digest.as_ref());
        let (m, input) = request(S::RSA_PKCS1_SHA256, b"hello").unwrap();
        assert!(matches!(m, Mechanism::RsaPkcs));
        assert_eq!(&input[19..], digest.as_ref());
        assert_eq!(input.len(), 51);
        assert_eq!(request(S::ECDSA_NISTP384_SHA384, b"x").unwrap().1.len(), 48);
        assert!(request(S::ED25519, b"x").is_none());
    }

    #[test]
    fn ecdsa_output_becomes_der_and_rsa_output_stays() {
        let der = finish(S::ECDSA_NISTP256_SHA256, vec![1; 64]).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(finish(S::RSA_PSS_SHA256, vec![7; 256]), Some(vec![7; 256]));
        assert_eq!(finish(S::ECDSA_NISTP256_SHA256, vec![1; 63]), None);
    }

    #[test]
    fn a_signature_verifies_only_against_its_own_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["d".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let other_cert = params.self_signed(&other).unwrap();
        let pkcs8 = key.serialize_der();
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(alg, &pkcs8, &rng).unwrap();
        let sig = signer.sign(&rng, b"challenge").unwrap();
        let s = S::ECDSA_NISTP256_SHA256;
        assert!(verifies(cert.der(), s, b"challenge", sig.as_ref()));
        assert!(!verifies(cert.der(), s, b"other", sig.as_ref()));
        assert!(!verifies(other_cert.der(), s, b"challenge", sig.as_ref()));
        assert!(!verifies(
            cert.der(),
            S::RSA_PSS_SHA256,
            b"challenge",
            sig.as_ref()
        ));
    }
}
