//! PKCS#11 signing against a real SoftHSM token. Each test makes its own
//! token and runs again in a child process that points SoftHSM at it.

use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use custody_attest::dsse;
use custody_attest::keys::{Algorithm, Keyring, Signer};
use custody_pkcs11::{Error, Pkcs11Signer, Pkcs11Uri, generate, public_key};
use custody_testkit::SoftHsm;
use custody_testkit::softhsm::MODULE;

const KIND: &str = "application/vnd.in-toto+json";

fn uri(text: &str) -> Pkcs11Uri {
    text.parse().unwrap()
}

#[test]
fn a_generated_key_signs_inside_the_token_and_never_leaves_it() {
    let Some(hsm) = SoftHsm::in_child(
        "a_generated_key_signs_inside_the_token_and_never_leaves_it",
        "custody",
        "1234",
    ) else {
        return;
    };
    let uri = uri(&hsm.uri("provenance"));
    let generated = generate(&uri, Algorithm::EcdsaP256).unwrap();
    assert_eq!(generated.algorithm(), Algorithm::EcdsaP256);
    assert_eq!(
        public_key(&uri).unwrap().key_id(),
        generated.key_id(),
        "export gives another key"
    );
    let signer = Pkcs11Signer::open(&uri).unwrap();
    assert_eq!(signer.key_id(), generated.key_id());
    let envelope = dsse::sign(KIND, b"{\"a\":1}", &signer).unwrap();
    assert_eq!(envelope.signatures[0].keyid, generated.key_id());
    let verified = dsse::verify(&envelope, &generated, KIND).unwrap();
    assert_eq!(verified.bytes, b"{\"a\":1}");
    assert!(!format!("{signer:?}").contains(&hsm.pin));

    // A second key under the same label is refused, not added.
    let err = generate(&uri, Algorithm::EcdsaP256).unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");

    // The private key, asked for its value as its owner, logged in.
    let context = Pkcs11::new(MODULE).unwrap();
    let _ = context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = context.get_slots_with_initialized_token().unwrap()[0];
    let session = context.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from(hsm.pin.clone())));
    let private = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"provenance".to_vec()),
        ])
        .unwrap();
    assert_eq!(private.len(), 1);
    let read = session.get_attributes(
        private[0],
        &[
            AttributeType::Value,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Token,
            AttributeType::Id,
        ],
    );
    let attributes = read.unwrap();
    assert!(
        !attributes
            .iter()
            .any(|a| matches!(a, Attribute::Value(v) if !v.is_empty())),
        "the token gave out the private key's value"
    );
    assert!(attributes.contains(&Attribute::Sensitive(true)));
    assert!(attributes.contains(&Attribute::Extractable(false)));
    assert!(attributes.contains(&Attribute::Token(true)));
    assert!(
        attributes
            .iter()
            .any(|a| matches!(a, Attribute::Id(id) if !id.is_empty()))
    );
    // And the raw call says why: CKR_ATTRIBUTE_SENSITIVE.
    let err = session
        .get_attributes(private[0], &[AttributeType::Value])
        .map(|a| a.is_empty());
    assert!(
        matches!(err, Ok(true) | Err(_)),
        "the value was read: {err:?}"
    );
}

#[test]
fn ed25519_signs_where_the_token_offers_it_and_fails_clearly_where_not() {
    let Some(hsm) = SoftHsm::in_child(
        "ed25519_signs_where_the_token_offers_it_and_fails_clearly_where_not",
        "custody",
        "1234",
    ) else {
        return;
    };
    let uri = uri(&hsm.uri("edwards"));
    match generate(&uri, Algorithm::Ed25519) {
        Ok(public) => {
            assert_eq!(public.algorithm(), Algorithm::Ed25519);
            let signer = Pkcs11Signer::open(&uri).unwrap();
            let envelope = dsse::sign(KIND, b"{}", &signer).unwrap();
            dsse::verify(&envelope, &public, KIND).unwrap();
            println!("this token signs with Ed25519");
        }
        Err(err) => {
            println!("this token has no Ed25519: {err}");
            let text = err.to_string();
            assert!(matches!(err, Error::Unsupported { .. }), "{text}");
            assert!(text.contains("ed25519"), "{text}");
        }
    }
}

#[test]
fn one_signer_signs_from_many_threads_at_once() {
    let Some(hsm) = SoftHsm::in_child(
        "one_signer_signs_from_many_threads_at_once",
        "custody",
        "1234",
    ) else {
        return;
    };
    let uri = uri(&hsm.uri("provenance"));
    let public = generate(&uri, Algorithm::EcdsaP256).unwrap();
    let signer: Arc<dyn Signer> = custody_pkcs11::open_shared(&uri).unwrap();
    let keyring = Keyring::from(public);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let signer = signer.clone();
            let keyring = keyring.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let payload = format!("{{\"thread\":{t},\"i\":{i}}}");
                    let envelope = dsse::sign(KIND, payload.as_bytes(), signer.as_ref()).unwrap();
                    let verified = dsse::verify_keyring(&envelope, &keyring, KIND).unwrap();
                    assert_eq!(verified.bytes, payload.as_bytes());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a signing thread failed");
    }
}

#[test]
fn a_session_that_lost_its_login_logs_in_again() {
    let Some(hsm) = SoftHsm::in_child(
        "a_session_that_lost_its_login_logs_in_again",
        "custody",
        "1234",
    ) else {
        return;
    };
    let uri = uri(&hsm.uri("provenance"));
    let public = generate(&uri, Algorithm::EcdsaP256).unwrap();
    let signer = Pkcs11Signer::open(&uri).unwrap();
    // Login state belongs to the application: logging out any session
    // logs out the signer's too.
    let context = Pkcs11::new(MODULE).unwrap();
    let _ = context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = context.get_slots_with_initialized_token().unwrap()[0];
    let other = context.open_ro_session(slot).unwrap();
    other.logout().unwrap();
    let envelope = dsse::sign(KIND, b"{}", &signer).unwrap();
    dsse::verify(&envelope, &public, KIND).unwrap();
}

#[test]
fn a_wrong_pin_a_missing_token_object_or_module_is_named() {
    let Some(hsm) = SoftHsm::in_child(
        "a_wrong_pin_a_missing_token_object_or_module_is_named",
        "custody",
        "1234",
    ) else {
        return;
    };
    generate(&uri(&hsm.uri("provenance")), Algorithm::EcdsaP256).unwrap();
    let cases = [
        (
            format!("pkcs11:token=custody;object=provenance?module-path={MODULE}&pin-value=9999"),
            "PIN of token `custody` is wrong",
        ),
        (
            format!("pkcs11:token=elsewhere;object=provenance?module-path={MODULE}&pin-value=1234"),
            "no PKCS#11 token `elsewhere`",
        ),
        (
            format!("pkcs11:token=custody;object=missing?module-path={MODULE}&pin-value=1234"),
            "no private key `missing`",
        ),
        (
            "pkcs11:token=custody;object=provenance?module-path=/nowhere/libnothing.so&pin-value=1234".to_owned(),
            "cannot load the PKCS#11 module `/nowhere/libnothing.so`",
        ),
        (
            format!("pkcs11:token=custody;object=provenance?module-path={MODULE}"),
            "names no PIN",
        ),
    ];
    for (text, expected) in cases {
        let err = Pkcs11Signer::open(&uri(&text)).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(expected), "{text}: {shown}");
        assert!(
            !shown.contains("9999") && !shown.contains("1234"),
            "{shown}"
        );
        assert!(err.hint().is_some(), "no hint for {shown}");
    }
}
