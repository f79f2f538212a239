//! Provenance signing keys that live in a PKCS#11 token (an HSM, a cloud
//! KMS's PKCS#11 module, SoftHSM): the private key is made inside the token
//! sensitive and unextractable, and custody only ever asks it to sign.
//!
//! # Layout
//! - [`uri`]: RFC 7512 URIs naming module, token, key and PIN source; the
//!   PIN never prints.
//! - [`Pkcs11Signer`]: a [`custody_attest::keys::Signer`] over one logged-in
//!   session, shared by concurrent builds behind a mutex.
//! - [`generate`] and [`public_key`]: `custody keys generate --pkcs11` and
//!   `custody keys export --pkcs11`.
//!
//! ECDSA P-256 is signed as raw `CKM_ECDSA` over a SHA-256 digest made
//! here (SoftHSM 2.6 has no `CKM_ECDSA_SHA256`), and its `r‖s` is turned
//! into the ASN.1 DER signature the file key makes, so verifiers cannot
//! tell the two apart. Ed25519 is `CKM_EDDSA` where the token has it.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use custody_attest::keys::{Algorithm, Signer, VerifyingKey};
use sha2::{Digest as _, Sha256};

pub mod uri;

pub use uri::Pkcs11Uri;

/// What can go wrong with a token; each names the module, token or key and
/// [`Error::hint`] says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URI cannot be read (its text is not repeated: it may hold a PIN).
    #[error("invalid PKCS#11 URI: {reason}")]
    Uri { reason: String },
    /// The module could not be loaded or initialised.
    #[error("cannot load the PKCS#11 module `{}`: {reason}", module.display())]
    Module { module: PathBuf, reason: String },
    /// No slot holds a token with this label.
    #[error("no PKCS#11 token `{token}` in `{}` (tokens: {})", module.display(), if found.is_empty() { "none".to_owned() } else { found.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ") })]
    NoToken {
        token: String,
        module: PathBuf,
        found: Vec<String>,
    },
    /// The URI names no PIN and the key needs a login.
    #[error("`{uri}` names no PIN")]
    NoPin { uri: String },
    /// The PIN file cannot be read.
    #[error("cannot read the PIN of `{uri}`: {reason}")]
    Pin { uri: String, reason: String },
    /// The token refused the PIN.
    #[error("the PIN of token `{token}` is wrong (`{uri}`)")]
    WrongPin { token: String, uri: String },
    /// The token holds no such key.
    #[error("token `{token}` has no {what} `{object}`")]
    NoObject {
        token: String,
        object: String,
        what: &'static str,
    },
    /// `generate` would overwrite a key.
    #[error("token `{token}` already has a key `{object}`; an existing key is never replaced")]
    Exists { token: String, object: String },
    /// A key custody cannot sign with.
    #[error("key `{object}` in token `{token}`: {reason}")]
    Unsupported {
        token: String,
        object: String,
        reason: String,
    },
    /// The token answered a call with an error.
    #[error("token `{token}`: {call} failed: {reason}")]
    Token {
        token: String,
        call: &'static str,
        reason: String,
    },
    /// The start-up probe's signature did not verify with the public key.
    #[error("key `{object}` in token `{token}` signed a probe that its public key does not verify")]
    Probe { token: String, object: String },
}

impl Error {
    /// What to do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Error::Uri { .. } => "write it as `pkcs11:token=LABEL;object=KEY?module-path=/path/to/module.so&pin-source=file:/path/to/pin` (RFC 7512)".into(),
            Error::Module { .. } => "check `module-path`; for SoftHSM install `softhsm2` (the module is /usr/lib/softhsm/libsofthsm2.so)".into(),
            Error::NoToken { .. } => "check `token=` against `softhsm2-util --show-slots` (or `pkcs11-tool --list-slots`); SoftHSM finds tokens where SOFTHSM2_CONF's `directories.tokendir` says".into(),
            Error::NoPin { .. } => "add `&pin-source=file:/path/to/pin` to the URI (a file only the daemon's user can read)".into(),
            Error::Pin { .. } => "the PIN file must be readable by the daemon's user; its first line is the PIN".into(),
            Error::WrongPin { .. } => "put the token's user PIN in the `pin-source` file; too many wrong PINs may lock the token".into(),
            Error::NoObject { .. } => "create the key with `custody keys generate --pkcs11 URI`, or fix `object=` (`pkcs11-tool --list-objects` lists the token's keys)".into(),
            Error::Exists { .. } => "name the new key with another `object=` label".into(),
            Error::Unsupported { .. } => "custody signs with ECDSA P-256 or Ed25519 keys; generate one with `custody keys generate --pkcs11 URI --algorithm ecdsa-p256`".into(),
            Error::Token { .. } | Error::Probe { .. } => return None,
        })
    }
}

/// The DER of the P-256 curve's OID (`CKA_EC_PARAMS`).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// The DER of id-Ed25519 (RFC 8410), which SoftHSM takes as `CKA_EC_PARAMS`.
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// `edwards25519` as a PrintableString, the other form PKCS#11 3.0 allows.
const ED25519_PARAMS_NAMED: &[u8] = b"\x13\x0cedwards25519";
/// SPKI up to the key bytes, for each algorithm.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// One loaded, initialised context per module for the whole process:
/// `C_Initialize` may run once, and every signer and command shares it.
fn context(module: &Path) -> Result<Pkcs11, Error> {
    static MODULES: OnceLock<Mutex<Vec<(PathBuf, Pkcs11)>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .expect("the module list is never left poisoned");
    if let Some((_, context)) = modules.iter().find(|(path, _)| path == module) {
        return Ok(context.clone());
    }
    let failed = |reason: String| Error::Module {
        module: module.to_owned(),
        reason,
    };
    if !module.is_file() {
        return Err(failed("no such file".into()));
    }
    let context = Pkcs11::new(module).map_err(|e| failed(e.to_string()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(failed(reason(&e))),
    }
    modules.push((module.to_owned(), context.clone()));
    Ok(context)
}

/// A short reason for a cryptoki error: the `CKR_` name, not the
/// specification's paragraph.
fn reason(err: &CkError) -> String {
    match err {
        CkError::Pkcs11(rv, _) => format!("{rv:?}"),
        other => other.to_string(),
    }
}

/// The slot holding the token the URI names.
fn slot(context: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, Error> {
    let token_error = |call, e: CkError| Error::Token {
        token: uri.token.clone(),
        call,
        reason: reason(&e),
    };
    let mut found = Vec::new();
    for slot in context
        .get_slots_with_initialized_token()
        .map_err(|e| token_error("C_GetSlotList", e))?
    {
        let info = context
            .get_token_info(slot)
            .map_err(|e| token_error("C_GetTokenInfo", e))?;
        let label = info.label().trim_end().to_owned();
        if label == uri.token {
            return Ok(slot);
        }
        found.push(label);
    }
    Err(Error::NoToken {
        token: uri.token.clone(),
        module: uri.module_path.clone(),
        found,
    })
}

/// A session on the URI's token, logged in as the user when it names a PIN
/// (`required`: a PIN must be named).
fn open_session(
    context: &Pkcs11,
    uri: &Pkcs11Uri,
    read_write: bool,
    required: bool,
) -> Result<(Session, Option<AuthPin>), Error> {
    let slot = slot(context, uri)?;
    let session = if read_write {
        context.open_rw_session(slot)
    } else {
        context.open_ro_session(slot)
    }
    .map_err(|e| Error::Token {
        token: uri.token.clone(),
        call: "C_OpenSession",
        reason: reason(&e),
    })?;
    let pin = match uri.pin()? {
        Some(pin) => Some(AuthPin::from(pin)),
        None if required => {
            return Err(Error::NoPin {
                uri: uri.to_string(),
            });
        }
        None => None,
    };
    if let Some(pin) = &pin {
        login(&session, uri, pin)?;
    }
    Ok((session, pin))
}

fn login(session: &Session, uri: &Pkcs11Uri, pin: &AuthPin) -> Result<(), Error> {
    match session.login(UserType::User, Some(pin)) {
        // Login is per token for the whole application: another session
        // of this process may have logged in already.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
            Err(Error::WrongPin {
                token: uri.token.clone(),
                uri: uri.to_string(),
            })
        }
        Err(e) => Err(Error::Token {
            token: uri.token.clone(),
            call: "C_Login",
            reason: reason(&e),
        }),
    }
}

/// The template that finds the URI's key of `class`.
fn template(uri: &Pkcs11Uri, class: ObjectClass) -> Vec<Attribute> {
    let mut template = vec![Attribute::Class(class)];
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    template
}

fn find(session: &Session, uri: &Pkcs11Uri, class: ObjectClass) -> Result<ObjectHandle, Error> {
    let what = if class == ObjectClass::PRIVATE_KEY {
        "private key"
    } else {
        "public key"
    };
    let found = session
        .find_objects(&template(uri, class))
        .map_err(|e| Error::Token {
            token: uri.token.clone(),
            call: "C_FindObjects",
            reason: reason(&e),
        })?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::NoObject {
            token: uri.token.clone(),
            object: uri.object_name(),
            what,
        }),
        _ => Err(Error::Unsupported {
            token: uri.token.clone(),
            object: uri.object_name(),
            reason: format!("{} {what}s answer to it; add `id=` to the URI", found.len()),
        }),
    }
}

/// The public key of the URI's key pair, read from its public key object.
fn read_public(session: &Session, uri: &Pkcs11Uri) -> Result<VerifyingKey, Error> {
    let handle = find(session, uri, ObjectClass::PUBLIC_KEY)?;
    let unsupported = |reason: String| Error::Unsupported {
        token: uri.token.clone(),
        object: uri.object_name(),
        reason,
    };
    let attributes = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::EcPoint,
            ],
        )
        .map_err(|e| Error::Token {
            token: uri.token.clone(),
            call: "C_GetAttributeValue",
            reason: reason(&e),
        })?;
    let (mut key_type, mut params, mut point) = (None, None, None);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::EcPoint(p) => point = Some(p),
            _ => {}
        }
    }
    let (Some(key_type), Some(params), Some(point)) = (key_type, params, point) else {
        return Err(unsupported(
            "it is not an elliptic-curve key (no `CKA_EC_PARAMS`/`CKA_EC_POINT`)".into(),
        ));
    };
    // CKA_EC_POINT is the DER OCTET STRING around the point (some modules
    // give the bare point).
    let point = match point.as_slice() {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && rest.len() < 0x80 => {
            rest.to_vec()
        }
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => rest.to_vec(),
        _ => point,
    };
    let spki = if key_type == KeyType::EC && params == P256_PARAMS && point.len() == 65 {
        [P256_SPKI_PREFIX, &point].concat()
    } else if key_type == KeyType::EC_EDWARDS
        && (params == ED25519_PARAMS || params == ED25519_PARAMS_NAMED)
        && point.len() == 32
    {
        [ED25519_SPKI_PREFIX, &point].concat()
    } else {
        return Err(unsupported(format!(
            "a {key_type} key on a curve custody does not sign with"
        )));
    };
    VerifyingKey::from_spki_der(&spki).map_err(|e| unsupported(e.to_string()))
}

/// The public key of the key pair `uri` names (`custody keys export`).
pub fn public_key(uri: &Pkcs11Uri) -> Result<VerifyingKey, Error> {
    let context = context(&uri.module_path)?;
    let (session, _) = open_session(&context, uri, false, false)?;
    read_public(&session, uri)
}

/// Makes a key pair inside the token (`custody keys generate --pkcs11`):
/// the private key sensitive, never extractable, a token object labelled
/// with the URI's `object`, with the URI's `id` or a fresh random one.
pub fn generate(uri: &Pkcs11Uri, algorithm: Algorithm) -> Result<VerifyingKey, Error> {
    let Some(label) = uri.object.clone() else {
        return Err(Error::Uri {
            reason: "a key to generate needs a label: add `object=LABEL`".into(),
        });
    };
    let context = context(&uri.module_path)?;
    let (session, _) = open_session(&context, uri, true, true)?;
    let token_error = |call, e: CkError| Error::Token {
        token: uri.token.clone(),
        call,
        reason: reason(&e),
    };
    let existing = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .map_err(|e| token_error("C_FindObjects", e))?;
    if !existing.is_empty() {
        return Err(Error::Exists {
            token: uri.token.clone(),
            object: label,
        });
    }
    let id = match &uri.id {
        Some(id) => id.clone(),
        None => session
            .generate_random_vec(16)
            .map_err(|e| token_error("C_GenerateRandom", e))?,
    };
    let (mechanism, params) = match algorithm {
        Algorithm::EcdsaP256 => (Mechanism::EccKeyPairGen, P256_PARAMS),
        Algorithm::Ed25519 => (Mechanism::EccEdwardsKeyPairGen, ED25519_PARAMS),
    };
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(params.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
    ];
    session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(|e| match e {
            CkError::Pkcs11(RvError::MechanismInvalid, _) => Error::Unsupported {
                token: uri.token.clone(),
                object: label.clone(),
                reason: format!("the token cannot make {algorithm} keys"),
            },
            e => token_error("C_GenerateKeyPair", e),
        })?;
    read_public(&session, uri)
}

/// A key in a token that signs provenance. One session serves every build,
/// one signature at a time (a PKCS#11 session runs one operation at a
/// time); a session that lost its login logs in again.
pub struct Pkcs11Signer {
    uri: Pkcs11Uri,
    /// Read once at start: a PIN file changed later does not stop signing.
    pin: AuthPin,
    context: Pkcs11,
    state: Mutex<State>,
    public: VerifyingKey,
}

struct State {
    session: Session,
    key: ObjectHandle,
}

impl std::fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("uri", &self.uri)
            .field("key_id", &self.public.key_id())
            .finish_non_exhaustive()
    }
}

impl Pkcs11Signer {
    /// Loads the module, finds the token, logs in, finds the key pair and
    /// signs a probe that its public key must verify: a signer that opens
    /// is one that signs.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, Error> {
        let context = context(&uri.module_path)?;
        let (session, pin) = open_session(&context, uri, false, true)?;
        let pin = pin.expect("a PIN was required");
        let key = find(&session, uri, ObjectClass::PRIVATE_KEY)?;
        let public = read_public(&session, uri)?;
        let signer = Self {
            uri: uri.clone(),
            pin,
            context,
            state: Mutex::new(State { session, key }),
            public,
        };
        let probe = b"custody signer probe";
        let signature = signer.sign_message(probe)?;
        if !signer.public.verify(probe, &signature) {
            return Err(Error::Probe {
                token: uri.token.clone(),
                object: uri.object_name(),
            });
        }
        Ok(signer)
    }

    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let (mechanism, data) = match self.public.algorithm() {
            Algorithm::EcdsaP256 => (Mechanism::Ecdsa, Sha256::digest(message).to_vec()),
            Algorithm::Ed25519 => (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                message.to_vec(),
            ),
        };
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut attempt = state.session.sign(&mechanism, state.key, &data);
        match &attempt {
            // The token forgot the login (a token reinserted, a module
            // that logs out idle sessions, another session of this process
            // logged out): log in again, once. Private objects are hidden
            // while logged out, so SoftHSM says the handle is invalid;
            // the key is found again.
            Err(CkError::Pkcs11(
                RvError::UserNotLoggedIn | RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                _,
            )) => {
                tracing::info!(token = %self.uri.token, "the PKCS#11 session lost its login; logging in again");
                login(&state.session, &self.uri, &self.pin)?;
                state.key = find(&state.session, &self.uri, ObjectClass::PRIVATE_KEY)?;
                attempt = state.session.sign(&mechanism, state.key, &data);
            }
            // The session itself is gone: open another.
            Err(CkError::Pkcs11(
                RvError::SessionHandleInvalid | RvError::SessionClosed | RvError::DeviceRemoved,
                _,
            )) => {
                tracing::info!(token = %self.uri.token, "the PKCS#11 session closed; opening another");
                let (session, _) = open_session(&self.context, &self.uri, false, true)?;
                let key = find(&session, &self.uri, ObjectClass::PRIVATE_KEY)?;
                *state = State { session, key };
                attempt = state.session.sign(&mechanism, state.key, &data);
            }
            _ => {}
        }
        drop(state);
        let signature = attempt.map_err(|e| match e {
            CkError::Pkcs11(RvError::MechanismInvalid, _) => Error::Unsupported {
                token: self.uri.token.clone(),
                object: self.uri.object_name(),
                reason: format!(
                    "the token cannot sign with {} keys",
                    self.public.algorithm()
                ),
            },
            e => Error::Token {
                token: self.uri.token.clone(),
                call: "C_Sign",
                reason: reason(&e),
            },
        })?;
        Ok(match self.public.algorithm() {
            Algorithm::EcdsaP256 => ecdsa_der(&signature).ok_or_else(|| Error::Token {
                token: self.uri.token.clone(),
                call: "C_Sign",
                reason: format!(
                    "an ECDSA signature of {} bytes, expected 64",
                    signature.len()
                ),
            })?,
            Algorithm::Ed25519 => signature,
        })
    }
}

impl Signer for Pkcs11Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, custody_attest::Error> {
        self.sign_message(message)
            .map_err(|e| custody_attest::Error::Sign {
                signer: self.uri.to_string(),
                reason: e.to_string(),
            })
    }

    fn verifying_key(&self) -> &VerifyingKey {
        &self.public
    }
}

/// Opens the signer behind an `Arc`, as the daemon shares it.
pub fn open_shared(uri: &Pkcs11Uri) -> Result<Arc<dyn Signer>, Error> {
    Ok(Arc::new(Pkcs11Signer::open(uri)?))
}

/// PKCS#11's ECDSA signature, `r‖s` (32 bytes each for P-256), as the
/// ASN.1 DER `SEQUENCE { INTEGER r, INTEGER s }` (RFC 3279 section 2.2.3)
/// that the file key makes and verifiers expect.
fn ecdsa_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != 64 {
        return None;
    }
    let integer = |bytes: &[u8]| {
        let start = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len() - 1);
        let bytes = &bytes[start..];
        let mut out = vec![0x02];
        // A leading 1 bit would make it negative: pad with a zero byte.
        if bytes[0] & 0x80 != 0 {
            out.push(u8::try_from(bytes.len() + 1).expect("at most 33 bytes"));
            out.push(0);
        } else {
            out.push(u8::try_from(bytes.len()).expect("at most 32 bytes"));
        }
        out.extend_from_slice(bytes);
        out
    };
    let (r, s) = (integer(&raw[..32]), integer(&raw[32..]));
    let mut der = vec![
        0x30,
        u8::try_from(r.len() + s.len()).expect("at most 70 bytes"),
    ];
    der.extend(r);
    der.extend(s);
    Some(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ecdsa_signatures_become_der() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // r needs a zero byte in front
        raw[31] = 1;
        raw[34] = 0x7f; // s starts two zero bytes in: they go
        raw[63] = 2;
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(&der[..4], &[0x30, 2 + 33 + 2 + 30, 0x02, 33]);
        assert_eq!(der[4], 0);
        assert_eq!(der[5], 0x80);
        assert_eq!(&der[37..40], &[0x02, 30, 0x7f]);
        assert!(ecdsa_der(&[0; 63]).is_none());
        // All zeros is one zero byte, not an empty integer.
        assert_eq!(
            ecdsa_der(&[0; 64]).unwrap(),
            vec![0x30, 6, 2, 1, 0, 2, 1, 0]
        );
    }
}
