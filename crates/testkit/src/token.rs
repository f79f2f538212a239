//! A token server for distribution's Bearer auth: checks Basic credentials
//! and issues ES256 JWTs, signed by a key whose self-signed certificate the
//! registry trusts (`rootcertbundle`) and which the token carries in `x5c`.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::http::{Response, Server};

pub const SERVICE: &str = "custody-testkit-registry";
pub const ISSUER: &str = "custody-testkit";

/// One request the token server answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub scopes: Vec<String>,
    /// The user whose Basic credentials came with it, if any.
    pub user: Option<String>,
    pub granted: bool,
    pub user_agent: Option<String>,
}

pub struct TokenServer {
    server: Server,
    pub cert_pem: String,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
}

impl TokenServer {
    pub fn start(user: &str, password: &str) -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("a token key");
        let pkcs8 = key.to_pkcs8v1().expect("the token key exports");
        let rcgen_key = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("rcgen reads the key");
        let mut params = rcgen::CertificateParams::new(vec!["token.test".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "custody test token issuer");
        let cert = params
            .self_signed(&rcgen_key)
            .expect("the token certificate");
        let x5c = STANDARD.encode(cert.der());
        let requests: Arc<Mutex<Vec<TokenRequest>>> = Arc::default();
        let expected = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        let user = user.to_owned();
        let server = {
            let requests = requests.clone();
            Server::start(move |request| {
                let scopes: Vec<String> = request
                    .query
                    .iter()
                    .filter(|(k, _)| k == "scope")
                    .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
                    .collect();
                let authorization = request.headers.get("authorization").cloned();
                let granted = authorization.as_deref() == Some(expected.as_str());
                requests.lock().unwrap().push(TokenRequest {
                    scopes: scopes.clone(),
                    user: authorization.as_ref().map(|_| user.clone()),
                    granted,
                    user_agent: request.headers.get("user-agent").cloned(),
                });
                if authorization.is_some() && !granted {
                    return Response::new(
                        401,
                        "application/json",
                        r#"{"details":"invalid credentials"}"#,
                    );
                }
                let access: Vec<serde_json::Value> = if granted {
                    scopes
                        .iter()
                        .filter_map(|s| {
                            let mut parts = s.splitn(3, ':');
                            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let token = sign(&key, &x5c, if granted { &user } else { "" }, access);
                let body =
                    serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
                Response::new(200, "application/json", body.to_string())
            })
        };
        Self {
            server,
            cert_pem: cert.pem(),
            requests,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.server.port)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }
}

fn sign(key: &EcdsaKeyPair, x5c: &str, subject: &str, access: Vec<serde_json::Value>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": subject, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", rand_suffix()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .expect("signing works");
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

fn rand_suffix() -> u64 {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}
