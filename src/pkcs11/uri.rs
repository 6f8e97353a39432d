//! RFC 7512 PKCS#11 URIs: `pkcs11:token=gw;object=device;type=private?pin-source=file:/etc/pin`.
//! The path's attributes pick the token and the key; the query says where the PIN and the
//! module are. Pure: no token is opened here.

use std::path::PathBuf;

/// The attributes of a `pkcs11:` URI the agent uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// The token's label (`token=`).
    pub token: Option<String>,
    /// The token's manufacturer, when the label is not enough.
    pub manufacturer: Option<String>,
    /// The token's model.
    pub model: Option<String>,
    /// The token's serial number.
    pub serial: Option<String>,
    /// The slot's number (`slot-id=`).
    pub slot_id: Option<u64>,
    /// The key's label (`object=`): the certificate with the same label goes with it.
    pub object: Option<String>,
    /// The key's `CKA_ID` (`id=%01`): the certificate with the same id goes with it.
    pub id: Option<Vec<u8>>,
    /// `pin-source=file:/path`: the file holding the user PIN.
    pub pin_source: Option<PathBuf>,
    /// `module-path=`: the module's shared object.
    pub module_path: Option<PathBuf>,
}

/// Why a URI is not usable: the attribute and what to do. Never holds a PIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UriError {
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

fn refuse(problem: impl Into<String>, fix: impl Into<String>) -> UriError {
    UriError {
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Rule: a `mqtt.key` value is a PKCS#11 URI when it starts with the scheme (any case).
pub fn is_pkcs11_uri(value: &str) -> bool {
    value
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("pkcs11:"))
}

/// Rule: parses `text` (RFC 7512 section 2.3). Every attribute at most once; a private key
/// named by `object` and/or `id`; `type` if given is `private`; no PIN inside the URI.
pub fn parse(text: &str) -> Result<Pkcs11Uri, UriError> {
    if !is_pkcs11_uri(text) {
        return Err(refuse("is not a pkcs11: URI", "start it with pkcs11:"));
    }
    let (path, query) = match text[7..].split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (&text[7..], None),
    };
    let mut uri = Pkcs11Uri::default();
    let mut seen = Vec::new();
    let path_attrs = path.split(';').filter(|a| !a.is_empty());
    let query_attrs = query.into_iter().flat_map(|q| q.split('&'));
    for (attr, in_query) in path_attrs
        .map(|a| (a, false))
        .chain(query_attrs.filter(|a| !a.is_empty()).map(|a| (a, true)))
    {
        // Not quoted: it may be a PIN written in the wrong place.
        let (name, raw) = attr.split_once('=').ok_or_else(|| {
            refuse(
                "has an attribute without a value",
                "write each attribute as name=value",
            )
        })?;
        if seen.contains(&name) {
            return Err(refuse(
                format!("attribute {name} appears twice"),
                "give each attribute once",
            ));
        }
        seen.push(name);
        set(&mut uri, name, raw, in_query)?;
    }
    if uri.object.is_none() && uri.id.is_none() {
        return Err(refuse(
            "names no key",
            "add object=<the key's label> and/or id=<its CKA_ID, percent-encoded>",
        ));
    }
    Ok(uri)
}

/// One attribute into `uri`.
fn set(uri: &mut Pkcs11Uri, name: &str, raw: &str, in_query: bool) -> Result<(), UriError> {
    // The PIN's value is never decoded, so never quoted.
    if name == "pin-value" {
        return Err(refuse(
            "pin-value would put the PIN in the configuration file",
            "put the PIN in a file readable only by the agent and use pin-source=file:<path> or mqtt.pkcs11_pin_file",
        ));
    }
    let bytes = decode(raw).map_err(|why| {
        refuse(
            format!("attribute {name}: {why}"),
            "percent-encode reserved characters as %XX",
        )
    })?;
    let text = || {
        String::from_utf8(bytes.clone()).map_err(|_| {
            refuse(
                format!("attribute {name} is not UTF-8"),
                "give the label as text",
            )
        })
    };
    match (name, in_query) {
        ("token", false) => uri.token = Some(text()?),
        ("manufacturer", false) => uri.manufacturer = Some(text()?),
        ("model", false) => uri.model = Some(text()?),
        ("serial", false) => uri.serial = Some(text()?),
        ("slot-id", false) => {
            uri.slot_id =
                Some(text()?.parse().map_err(|_| {
                    refuse("slot-id is not a number", "give the slot's decimal number")
                })?)
        }
        ("object", false) => uri.object = Some(text()?),
        ("id", false) => uri.id = Some(bytes),
        ("type", false) if bytes == b"private" => {}
        ("type", false) => {
            return Err(refuse(
                format!("type={} does not name a private key", text()?),
                "use type=private (the certificate is found by the same id or label)",
            ));
        }
        ("pin-source", true) => uri.pin_source = Some(pin_file(&text()?)?),
        ("module-path", true) => uri.module_path = Some(absolute("module-path", &text()?)?),
        _ => {
            return Err(refuse(
                format!("attribute {name} is not supported here"),
                "use token, manufacturer, model, serial, slot-id, object, id and type in the path; pin-source and module-path in the query",
            ));
        }
    }
    Ok(())
}

/// Rule: `pin-source` is a `file:` URI (`file:/etc/pin` or `file:///etc/pin`) of an
/// absolute path; commands (`|prog`) are refused.
pub fn pin_file(source: &str) -> Result<PathBuf, UriError> {
    let path = source
        .strip_prefix("file://")
        .or_else(|| source.strip_prefix("file:"))
        .ok_or_else(|| {
            refuse(
                "pin-source is not a file: URI",
                "use pin-source=file:/etc/securetunnel-agent/token.pin",
            )
        })?;
    absolute("pin-source", path)
}

fn absolute(name: &str, path: &str) -> Result<PathBuf, UriError> {
    let p = PathBuf::from(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        // Not quoted: a pin-source may hold a PIN written in the wrong place.
        Err(refuse(
            format!("{name} is not an absolute path"),
            "give the whole path, starting with /",
        ))
    }
}

/// Rule: RFC 3986 percent-decoding; a `%` must be followed by two hex digits.
pub fn decode(raw: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = [bytes.next(), bytes.next()];
        let digit = |c: Option<u8>| c.and_then(|c| (c as char).to_digit(16));
        match (digit(hex[0]), digit(hex[1])) {
            (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
            _ => return Err("a % is not followed by two hex digits".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_uri_names_the_token_the_key_and_the_pin_file() {
        let u =
            parse("pkcs11:token=gw;object=device;type=private?pin-source=file:/etc/pin").unwrap();
        assert_eq!(u.token.as_deref(), Some("gw"));
        assert_eq!(u.object.as_deref(), Some("device"));
        assert_eq!(u.pin_source, Some(PathBuf::from("/etc/pin")));
        assert_eq!(u.module_path, None);
    }

    #[test]
    fn values_are_percent_decoded_and_the_id_is_bytes() {
        let u = parse("PKCS11:token=my%20gw;id=%01%a2?module-path=/usr/lib/x.so").unwrap();
        assert_eq!(u.token.as_deref(), Some("my gw"));
        assert_eq!(u.id, Some(vec![0x01, 0xa2]));
        assert_eq!(u.module_path, Some(PathBuf::from("/usr/lib/x.so")));
        assert_eq!(
            decode("a%2"),
            Err("a % is not followed by two hex digits".into())
        );
    }

    #[test]
    fn a_uri_must_name_a_key() {
        let e = parse("pkcs11:token=gw").unwrap_err();
        assert!(e.problem.contains("names no key"), "{e:?}");
    }

    #[test]
    fn pin_value_is_refused_without_quoting_it() {
        let e = parse("pkcs11:object=k?pin-value=27182818").unwrap_err();
        assert!(!format!("{e:?}").contains("27182818"), "{e:?}");
        assert!(e.fix.contains("pin-source"), "{e:?}");
        // A PIN where a path or an attribute goes is not echoed either.
        for uri in [
            "pkcs11:object=k?27182818",
            "pkcs11:object=k?pin-source=file:27182818",
        ] {
            let e = parse(uri).unwrap_err();
            assert!(!format!("{e:?}").contains("27182818"), "{e:?}");
        }
    }

    #[test]
    fn only_private_keys_are_named() {
        let e = parse("pkcs11:object=k;type=cert").unwrap_err();
        assert!(e.problem.contains("type=cert"), "{e:?}");
        assert!(parse("pkcs11:object=k;type=private").is_ok());
    }

    #[test]
    fn an_attribute_may_appear_once() {
        let e = parse("pkcs11:object=a;object=b").unwrap_err();
        assert!(e.problem.contains("twice"), "{e:?}");
    }

    #[test]
    fn pin_source_is_an_absolute_file_uri() {
        assert_eq!(pin_file("file:///run/pin"), Ok(PathBuf::from("/run/pin")));
        assert!(pin_file("|/usr/bin/askpin").is_err());
        assert!(
            pin_file("file:pin")
                .unwrap_err()
                .problem
                .contains("absolute")
        );
    }

    #[test]
    fn unknown_or_misplaced_attributes_are_refused() {
        for uri in [
            "pkcs11:object=k;library-version=1",
            "pkcs11:object=k?token=gw",
        ] {
            let e = parse(uri).unwrap_err();
            assert!(e.problem.contains("not supported"), "{uri}: {e:?}");
        }
    }

    #[test]
    fn only_the_pkcs11_scheme_is_a_uri() {
        assert!(is_pkcs11_uri("pkcs11:object=k"));
        assert!(!is_pkcs11_uri("/etc/key.pem"));
        assert!(!is_pkcs11_uri("pkcs1"));
    }
}
