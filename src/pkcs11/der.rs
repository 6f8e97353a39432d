//! The little DER a token's signatures need: a PKCS#11 ECDSA signature is `r || s`, TLS wants
//! `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` (RFC 3279 section 2.2.3); an
//! RSA PKCS#1 v1.5 signature over a digest needs the digest's `DigestInfo` (RFC 8017 section 9.2).

/// `DigestInfo` for SHA-256 up to the digest itself (RFC 8017 section 9.2, note 1).
pub const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// Rule: a PKCS#11 ECDSA signature (`r || s`, two halves of equal length) as DER.
pub fn ecdsa_signature(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Some(sequence_of_integers(&[r, s]))
}

/// `SEQUENCE { INTEGER, ... }` of unsigned big-endian integers (also an `RSAPublicKey`).
pub fn sequence_of_integers(values: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = values.iter().flat_map(|v| integer(v)).collect();
    tagged(0x30, &body)
}

/// Rule: an unsigned integer in DER: leading zeros dropped, a zero added when the top bit
/// is set (so it stays positive), zero itself as one byte.
fn integer(value: &[u8]) -> Vec<u8> {
    let start = value.iter().position(|&b| b != 0).unwrap_or(value.len());
    let trimmed = &value[start..];
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    tagged(0x02, &content)
}

/// Rule: tag, definite length (short form below 128, else long form), content.
fn tagged(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ecdsa_signature_becomes_a_der_sequence_of_two_positive_integers() {
        // r has its top bit set (a zero goes before it), s has leading zeros (dropped).
        let mut raw = vec![0x80; 32];
        raw.extend([0u8; 31]);
        raw.push(0x05);
        let der = ecdsa_signature(&raw).unwrap();
        assert_eq!(&der[..4], &[0x30, 38, 0x02, 33]);
        assert_eq!(der[4], 0);
        assert_eq!(&der[37..], &[0x02, 1, 0x05]);
        assert_eq!(ecdsa_signature(&[1, 2, 3]), None);
        assert_eq!(ecdsa_signature(&[]), None);
    }

    #[test]
    fn zero_is_one_zero_byte() {
        assert_eq!(integer(&[0, 0]), vec![0x02, 1, 0]);
        assert_eq!(integer(&[]), vec![0x02, 1, 0]);
    }

    #[test]
    fn long_contents_use_the_long_length_form() {
        let modulus = vec![0xc1; 256];
        let der = sequence_of_integers(&[&modulus, &[1, 0, 1]]);
        // 257-byte integer: 02 82 01 01; the sequence: 30 82 01 0a.
        assert_eq!(&der[..8], &[0x30, 0x82, 0x01, 0x0a, 0x02, 0x82, 0x01, 0x01]);
        assert_eq!(der.len(), 4 + 0x010a);
        assert_eq!(tagged(4, &[0; 0x80])[..3], [4, 0x81, 0x80]);
    }

    #[test]
    fn the_sha256_digest_info_announces_32_bytes() {
        assert_eq!(
            SHA256_DIGEST_INFO[1] as usize,
            SHA256_DIGEST_INFO.len() - 2 + 32
        );
        assert_eq!(SHA256_DIGEST_INFO[18], 32);
    }
}
