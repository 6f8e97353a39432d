//! A token through its PKCS#11 module (cryptoki): the module loaded once per process, the
//! token found by the URI, a logged-in session, the private key and its certificate. The
//! session is opened once and opened again (a new login) after a token error.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{Error, KeyKind, KeyRef, refuse};

/// What the token holds for the agent, found once at start.
pub(super) struct Found {
    pub(super) kind: KeyKind,
    /// The certificate object with the key's id (or label), DER.
    pub(super) cert: Option<Vec<u8>>,
    pub(super) mechanisms: Vec<MechanismType>,
    /// The token's label, for messages.
    pub(super) label: String,
}

/// The open token: one session, behind a lock (PKCS#11 sessions are not for two threads).
pub(super) struct Token {
    module: Pkcs11,
    key: KeyRef,
    open: Mutex<Option<Open>>,
    /// The PIN file as it was when the token refused its PIN: not tried again until it
    /// changes, so reconnects do not spend the token's PIN tries.
    refused: Mutex<Option<super::FileStamp>>,
}

struct Open {
    session: Session,
    key: ObjectHandle,
}

/// The module at `path`, loaded and initialised once per process: a second `C_Initialize`
/// fails, and every configuration (a reload, `check-config` in-process) shares it.
pub fn module(path: &Path) -> Result<Pkcs11, Error> {
    static LOADED: Mutex<Vec<(std::path::PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, m)) = loaded.iter().find(|(p, _)| p == path) {
        return Ok(m.clone());
    }
    if !path.exists() {
        return Err(refuse(
            "mqtt.pkcs11_module",
            format!("{} does not exist", path.display()),
            "install the token's PKCS#11 module (softhsm2, tpm2-pkcs11, cryptoauthlib...) or correct the path",
        ));
    }
    let m = Pkcs11::new(path).map_err(|e| {
        refuse(
            "mqtt.pkcs11_module",
            format!(
                "{} cannot be loaded as a PKCS#11 module: {e}",
                path.display()
            ),
            "give the module's shared object (.so) built for this machine",
        )
    })?;
    match m.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(refuse(
                "mqtt.pkcs11_module",
                format!("{}: C_Initialize failed: {}", path.display(), short(&e)),
                "check the module's own configuration (e.g. SOFTHSM2_CONF, TPM2_PKCS11_STORE)",
            ));
        }
    }
    loaded.push((path.to_owned(), m.clone()));
    Ok(m)
}

impl Token {
    /// Opens the token `key` names, logs in and finds the key; `found` says what it holds.
    pub(super) fn open(key: &KeyRef) -> Result<(Arc<Token>, Found), Error> {
        let module = module(&key.module)?;
        let token = Token {
            module,
            key: key.clone(),
            open: Mutex::new(None),
            refused: Mutex::new(None),
        };
        let (open, found) = token.open_session()?;
        *token.open.lock().unwrap_or_else(PoisonError::into_inner) = Some(open);
        Ok((Arc::new(token), found))
    }

    /// Signs `data` with the key; after a token error, once more with a new session.
    pub(super) fn sign(&self, mechanism: &Mechanism<'_>, data: &[u8]) -> Result<Vec<u8>, Error> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        for attempt in 0..2 {
            if open.is_none() {
                *open = Some(self.open_session()?.0);
            }
            let Some(o) = open.as_ref() else { break };
            match o.session.sign(mechanism, o.key, data) {
                Ok(sig) => return Ok(sig),
                Err(e) if attempt == 0 && reopens(&e) => {
                    tracing::warn!(
                        "the token refused to sign ({}): opening a new session",
                        short(&e)
                    );
                    *open = None;
                }
                Err(e) => {
                    return Err(refuse(
                        "mqtt.key",
                        format!("the token could not sign: {}", short(&e)),
                        "check the token and its module's log",
                    ));
                }
            }
        }
        Err(refuse(
            "mqtt.key",
            "the token lost its session twice",
            "check the token",
        ))
    }

    /// A new session, logged in, with the key found.
    fn open_session(&self) -> Result<(Open, Found), Error> {
        let (slot, label) = find_slot(&self.module, &self.key)?;
        let session = self.module.open_ro_session(slot).map_err(|e| {
            refuse(
                "mqtt.key",
                format!("token {label:?}: cannot open a session: {}", short(&e)),
                "check the token",
            )
        })?;
        self.login(&session, &label)?;
        let key = find_key(&session, &self.key, &label)?;
        let mechanisms = self.module.get_mechanism_list(slot).map_err(|e| {
            let problem = format!("token {label:?}: cannot list its mechanisms: {}", short(&e));
            refuse("mqtt.key", problem, "check the token")
        })?;
        let found = Found {
            kind: key_kind(&session, key, &label)?,
            cert: find_cert(&session, key),
            mechanisms,
            label,
        };
        Ok((Open { session, key }, found))
    }

    /// Logs in with the PIN file as it is now, unless the token refused it as it is now.
    fn login(&self, session: &Session, label: &str) -> Result<(), Error> {
        let file = &self.key.pin_file;
        let now = super::FileStamp::of(file);
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        if !super::try_pin(refused.as_ref(), now.as_ref()) {
            return Err(refuse(
                "mqtt.pkcs11_pin_file",
                format!(
                    "token {label:?} refused the PIN in {}; not tried again until the file changes",
                    file.display()
                ),
                "put the token's user PIN in that file",
            ));
        }
        login(session, &self.key, label).map_err(|(e, wrong)| {
            if wrong {
                *refused = now;
            }
            e
        })
    }
}

/// Rule: the errors after which a new session (and login) may succeed: the session or the
/// login was lost, or the token went away and may be back.
pub(super) fn reopens(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError,
            _
        )
    )
}

/// A PKCS#11 error in a few words (`CKR_` names without their paragraphs).
fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function}: {rv:?}"),
        other => other.to_string(),
    }
}

/// The slot whose token the URI names, and the token's label.
fn find_slot(module: &Pkcs11, key: &KeyRef) -> Result<(Slot, String), Error> {
    let slots = module.get_slots_with_token().map_err(|e| {
        refuse(
            "mqtt.pkcs11_module",
            format!("cannot list slots: {}", short(&e)),
            "check the module's configuration",
        )
    })?;
    let mut labels = Vec::new();
    for slot in slots {
        let Ok(info) = module.get_token_info(slot) else {
            continue;
        };
        let label = info.label().trim_end().to_owned();
        let token = super::TokenFacts {
            label: &label,
            manufacturer: info.manufacturer_id().trim_end(),
            model: info.model().trim_end(),
            serial: info.serial_number().trim_end(),
            slot: slot.id(),
        };
        if super::token_matches(&key.uri, &token) {
            return Ok((slot, label));
        }
        labels.push(label);
    }
    Err(refuse(
        "mqtt.key",
        format!(
            "no token matches the URI; tokens present: {}",
            super::listing(&labels)
        ),
        "set token=<label> in mqtt.key to one of them (softhsm2-util --show-slots, p11tool --list-tokens)",
    ))
}

/// Rule: the login errors that say the PIN in the file is wrong.
pub(super) fn wrong_pin(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::PinIncorrect
                | RvError::PinLenRange
                | RvError::PinInvalid
                | RvError::PinExpired,
            _
        )
    )
}

/// Logs in with the PIN read from its file now; a refusal of the PIN is `Err((_, true))`.
fn login(session: &Session, key: &KeyRef, label: &str) -> Result<(), (Error, bool)> {
    let pin = super::read_pin(&key.pin_file).map_err(|e| (e, false))?;
    let auth = AuthPin::from(pin.expose());
    let e = match session.login(UserType::User, Some(&auth)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => return Ok(()),
        Err(e) => e,
    };
    let file = key.pin_file.display();
    let refused = match &e {
        e if wrong_pin(e) => refuse(
            "mqtt.pkcs11_pin_file",
            format!("token {label:?} refused the PIN in {file} ({})", short(e)),
            "put the token's user PIN in that file (after a few wrong PINs the token locks it)",
        ),
        CkError::Pkcs11(RvError::PinLocked, _) => refuse(
            "mqtt.pkcs11_pin_file",
            format!("token {label:?} has locked its user PIN"),
            "unlock it with the security officer PIN (e.g. pkcs11-tool --init-pin --login --login-type so)",
        ),
        e => refuse(
            "mqtt.key",
            format!("token {label:?}: login failed: {}", short(e)),
            "check the token",
        ),
    };
    Err((refused, wrong_pin(&e)))
}

/// The private key the URI names (by label and/or id); the keys present when none matches.
fn find_key(session: &Session, key: &KeyRef, label: &str) -> Result<ObjectHandle, Error> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(object) = &key.uri.object {
        template.push(Attribute::Label(object.as_bytes().to_vec()));
    }
    if let Some(id) = &key.uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = session.find_objects(&template).map_err(|e| {
        refuse(
            "mqtt.key",
            format!("token {label:?}: cannot search it: {}", short(&e)),
            "check the token",
        )
    })?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(refuse(
            "mqtt.key",
            format!(
                "token {label:?} has no private key {}; private keys present: {}",
                super::describe_key(&key.uri),
                super::listing(&private_keys(session))
            ),
            "set object=<label> (and/or id=) in mqtt.key to one of them",
        )),
        many => Err(refuse(
            "mqtt.key",
            format!(
                "token {label:?} has {} private keys {}",
                many.len(),
                super::describe_key(&key.uri)
            ),
            "name one key: add its id= (or a unique object=) to mqtt.key",
        )),
    }
}

/// The labels (and ids) of the token's private keys, for an error.
fn private_keys(session: &Session) -> Vec<String> {
    let handles = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap_or_default();
    handles
        .into_iter()
        .filter_map(|h| {
            session
                .get_attributes(h, &[AttributeType::Label, AttributeType::Id])
                .ok()
        })
        .map(|attrs| {
            let (mut label, mut id) = (String::new(), String::new());
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                    Attribute::Id(i) => id = i.iter().map(|b| format!("%{b:02x}")).collect(),
                    _ => {}
                }
            }
            format!("{label:?} (id={id})")
        })
        .collect()
}

/// The key's type and size from its attributes.
fn key_kind(session: &Session, key: ObjectHandle, label: &str) -> Result<KeyKind, Error> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::Modulus,
            ],
        )
        .map_err(|e| {
            refuse(
                "mqtt.key",
                format!("token {label:?}: cannot read the key: {}", short(&e)),
                "check the token",
            )
        })?;
    let (mut kind, mut params, mut modulus) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::KeyType(k) => kind = Some(k),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::Modulus(m) => modulus = Some(m),
            _ => {}
        }
    }
    let kind = match kind {
        Some(k) if k == KeyType::EC => params.as_deref().and_then(super::curve),
        Some(k) if k == KeyType::RSA => modulus.map(|m| KeyKind::Rsa {
            bits: super::bits(&m),
        }),
        _ => None,
    };
    kind.ok_or_else(|| {
        refuse(
            "mqtt.key",
            format!("token {label:?}: the key is neither EC P-256/P-384 nor RSA"),
            "use an EC P-256 or RSA 2048 key",
        )
    })
}

/// The certificate object with the key's `CKA_ID`, else its label; `None` if neither.
fn find_cert(session: &Session, key: ObjectHandle) -> Option<Vec<u8>> {
    let attrs = session
        .get_attributes(key, &[AttributeType::Id, AttributeType::Label])
        .unwrap_or_default();
    for a in attrs {
        let wanted = match a {
            Attribute::Id(id) if !id.is_empty() => Attribute::Id(id),
            Attribute::Label(l) if !l.is_empty() => Attribute::Label(l),
            _ => continue,
        };
        let template = [Attribute::Class(ObjectClass::CERTIFICATE), wanted];
        let Some(cert) = session
            .find_objects(&template)
            .ok()
            .and_then(|c| c.first().copied())
        else {
            continue;
        };
        let value = session
            .get_attributes(cert, &[AttributeType::Value])
            .unwrap_or_default();
        if let Some(Attribute::Value(der)) = value.into_iter().next() {
            return Some(der);
        }
    }
    None
}
