//! Where the registry client sends credentials, driven through the library
//! against a real registry and servers that record what reached them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use custody_oci::copy::{self, CopyOptions, Destination, Source};
use custody_oci::registry::{CredentialSource, RegistryOptions, auth};
use custody_oci::{Error, Location};
use custody_testkit::Registry;
use custody_testkit::http::{Response, Server};
use custody_testkit::image::{Image, LayoutWriter};

/// Plain HTTP to `host`, as `user:password` there and nowhere else.
fn options(host: &str, creds: &str) -> RegistryOptions {
    let credentials = [(host.parse().unwrap(), auth::parse_creds(creds).unwrap())]
        .into_iter()
        .collect();
    RegistryOptions {
        insecure_hosts: vec![host.to_owned()],
        credentials: CredentialSource::PerHost(credentials),
        ..RegistryOptions::default()
    }
}

/// A layout holding `image` tagged `v1`.
fn layout_with(dir: &Path, image: &Image) -> PathBuf {
    let root = dir.join("layout");
    LayoutWriter::new(&root)
        .image(image)
        .tag("v1", &image.manifest);
    root
}

async fn copy(from: &str, to: &str, options: &RegistryOptions) -> Result<(), Error> {
    let source = Source::open(&from.parse::<Location>()?, options).await?;
    let destination = Destination::open(&to.parse::<Location>()?, options).await?;
    copy::copy(&source, &destination, &CopyOptions::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redirected_blob_downloads_do_not_carry_credentials_to_another_host() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let registry = Registry::builder()
        .basic_auth("alice", "s3cret")
        .redirect_blobs()
        .start();
    let options = options(registry.host(), "alice:s3cret");
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(14, &[40_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/redirect:v1", registry.host());
    copy(
        &format!("oci:{}:v1", layout.display()),
        &destination,
        &options,
    )
    .await
    .unwrap();

    let pulled = dir.path().join("pulled");
    copy(
        &destination,
        &format!("oci:{}:v1", pulled.display()),
        &options,
    )
    .await
    .unwrap();
    let redirected = registry.redirect_requests();
    assert!(
        !redirected.is_empty(),
        "the registry did not redirect blob downloads"
    );
    assert!(
        redirected.iter().all(|r| !r.had_authorization),
        "credentials followed a redirect: {redirected:?}"
    );
    let layer = &image.layers[0];
    assert_eq!(
        fs_err::read(pulled.join("blobs/sha256").join(layer.hex())).unwrap(),
        layer.bytes
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_are_not_sent_to_an_upload_location_on_another_host() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // A registry whose upload `Location` points at another origin, and that
    // other origin, recording whether credentials came along.
    let elsewhere_saw: Arc<Mutex<Vec<bool>>> = Arc::default();
    let elsewhere = {
        let saw = elsewhere_saw.clone();
        Server::start(move |request| {
            saw.lock()
                .unwrap()
                .push(request.headers.contains_key("authorization"));
            Response::new(201, "text/plain", "")
        })
    };
    let elsewhere_port = elsewhere.port;
    let registry_saw: Arc<Mutex<Vec<bool>>> = Arc::default();
    let registry = {
        let saw = registry_saw.clone();
        Server::start(move |request| {
            let authorized = request
                .headers
                .get("authorization")
                .is_some_and(|a| a.starts_with("Basic "));
            saw.lock().unwrap().push(authorized);
            if !authorized {
                return Response::new(401, "application/json", "{}")
                    .header("WWW-Authenticate", "Basic realm=\"hostile\"");
            }
            match (request.method.as_str(), request.path.as_str()) {
                ("POST", _) => Response::new(202, "text/plain", "").header(
                    "Location",
                    &format!("http://127.0.0.1:{elsewhere_port}/upload/1?state=x"),
                ),
                ("PUT", p) if p.contains("/manifests/") => Response::new(201, "text/plain", ""),
                _ => Response::new(404, "application/json", "{}"),
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(22, &[1_000]);
    let layout = layout_with(dir.path(), &image);
    let host = format!("127.0.0.1:{}", registry.port);
    copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("{host}/team/app:v1"),
        &options(&host, "alice:s3cret"),
    )
    .await
    .unwrap();
    let elsewhere_saw = elsewhere_saw.lock().unwrap();
    assert_eq!(
        elsewhere_saw.len(),
        2,
        "both blobs were uploaded to the other origin"
    );
    assert!(
        elsewhere_saw.iter().all(|had| !had),
        "credentials went to another origin"
    );
    assert!(
        registry_saw.lock().unwrap().iter().any(|had| *had),
        "the registry itself got the credentials"
    );
}

/// One request an origin got: method, path, and its `Authorization`.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn record(log: &Log, request: &custody_testkit::http::Request) {
    log.lock().unwrap().push(Seen {
        method: request.method.clone(),
        path: request.path.clone(),
        authorization: request.headers.get("authorization").cloned(),
    });
}

fn seen(log: &Log) -> Vec<Seen> {
    log.lock().unwrap().clone()
}

const BASIC_ALICE: &str = "Basic YWxpY2U6czNjcmV0"; // alice:s3cret

/// A token realm that gives `tok-1` to `alice:s3cret` (Basic).
fn token_realm(log: Log) -> Server {
    Server::start(move |request| {
        record(&log, &request);
        if request.headers.get("authorization").map(String::as_str) != Some(BASIC_ALICE) {
            return Response::new(401, "application/json", "{}");
        }
        Response::new(200, "application/json", r#"{"token":"tok-1"}"#)
    })
}

/// A registry that wants `alice:s3cret` (Basic, or a token from `realm`)
/// and sends every manifest, tag and referrers request on to another
/// origin with a 307.
fn redirecting_registry(realm: Option<u16>, elsewhere: u16, log: Log) -> Server {
    Server::start(move |request| {
        record(&log, &request);
        let (wanted, challenge) = match realm {
            None => (BASIC_ALICE.to_owned(), "Basic realm=\"r\"".to_owned()),
            Some(port) => (
                "Bearer tok-1".to_owned(),
                format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"r\""),
            ),
        };
        if request.headers.get("authorization") != Some(&wanted) {
            return Response::new(401, "application/json", "{}")
                .header("WWW-Authenticate", &challenge);
        }
        if request.path == "/v2/" {
            return Response::new(200, "application/json", "{}");
        }
        Response::new(307, "text/plain", "").header(
            "Location",
            &format!("http://127.0.0.1:{elsewhere}{}", request.path),
        )
    })
}

/// Another origin that serves `image`'s manifest and an empty referrers
/// index, and takes manifest pushes.
fn manifest_store(image: &Image, log: Log) -> Server {
    let manifest = image.manifest.bytes.clone();
    Server::start(move |request| {
        record(&log, &request);
        match (request.method.as_str(), request.path.as_str()) {
            ("GET" | "HEAD", p) if p.contains("/manifests/") => Response::new(
                200,
                "application/vnd.oci.image.manifest.v1+json",
                manifest.clone(),
            ),
            ("GET", p) if p.contains("/referrers/") => Response::new(
                200,
                "application/vnd.oci.image.index.v1+json",
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
            ),
            ("PUT", p) if p.contains("/manifests/") => Response::new(201, "text/plain", ""),
            _ => Response::new(404, "application/json", "{}"),
        }
    })
}

/// Regression (issue #12): tag resolution, manifest fetches, referrers and
/// manifest pushes that the registry redirects to another origin reach it
/// without the registry's credential or token.
#[tokio::test(flavor = "multi_thread")]
async fn manifest_tag_and_referrers_requests_redirected_elsewhere_carry_no_credential() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let image = Image::random(31, &[1_000]);
    for bearer in [false, true] {
        let elsewhere_log = Log::default();
        let elsewhere = manifest_store(&image, elsewhere_log.clone());
        let realm_log = Log::default();
        let realm = token_realm(realm_log.clone());
        let registry_log = Log::default();
        let registry = redirecting_registry(
            bearer.then_some(realm.port),
            elsewhere.port,
            registry_log.clone(),
        );
        let host = format!("127.0.0.1:{}", registry.port);
        let client = custody_oci::registry::Client::new(&host, &options(&host, "alice:s3cret"))
            .await
            .unwrap();

        assert!(client.has_manifest("team/app", "v1").await.unwrap());
        let (descriptor, bytes) = client.manifest("team/app", "v1").await.unwrap();
        assert_eq!(descriptor.digest().to_string(), image.manifest.digest);
        client
            .referrers("team/app", descriptor.digest(), None)
            .await
            .unwrap();
        client
            .put_manifest("team/app", "v2", &descriptor, &bytes)
            .await
            .unwrap();

        let reached = seen(&elsewhere_log);
        let methods: Vec<&str> = reached.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(methods, ["HEAD", "GET", "GET", "PUT"], "{reached:?}");
        assert!(
            reached.iter().all(|s| s.authorization.is_none()),
            "a credential followed a redirect to another origin (bearer: {bearer}): {reached:?}"
        );
        assert!(
            seen(&registry_log)
                .iter()
                .any(|s| s.path.contains("/manifests/") && s.authorization.is_some()),
            "the registry itself got the credential"
        );
        if bearer {
            assert!(
                !seen(&realm_log).is_empty(),
                "the token came from the realm"
            );
        }
    }
}

/// Regression (issue #12): a redirect target — or a host the registry
/// sends an upload to — that answers 401 with its own Bearer challenge
/// must not get the registry's credential sent to the token realm it names.
#[tokio::test(flavor = "multi_thread")]
async fn a_401_from_another_origin_cannot_name_where_the_credential_goes() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let attacker_realm_log = Log::default();
    let attacker_realm = token_realm(attacker_realm_log.clone());
    let attacker_log = Log::default();
    let attacker = {
        let log = attacker_log.clone();
        let realm = attacker_realm.port;
        Server::start(move |request| {
            record(&log, &request);
            Response::new(401, "application/json", "{}").header(
                "WWW-Authenticate",
                &format!("Bearer realm=\"http://127.0.0.1:{realm}/token\",service=\"x\""),
            )
        })
    };
    let registry_log = Log::default();
    let registry = redirecting_registry(None, attacker.port, registry_log.clone());
    let host = format!("127.0.0.1:{}", registry.port);
    let client = custody_oci::registry::Client::new(&host, &options(&host, "alice:s3cret"))
        .await
        .unwrap();
    let err = client.manifest("team/app", "v1").await.unwrap_err();
    let asked = seen(&attacker_realm_log);
    assert!(
        asked.is_empty(),
        "the credential went to a token realm another origin named: {asked:?}"
    );
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("another origin"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    assert!(
        seen(&attacker_log)
            .iter()
            .all(|s| s.authorization.is_none())
    );
    // The registry still gets its own credential, and only that.
    let sent: Vec<Option<String>> = seen(&registry_log)
        .into_iter()
        .filter_map(|s| s.authorization)
        .map(Some)
        .collect();
    assert!(!sent.is_empty());
    assert!(
        sent.iter().all(|a| a.as_deref() == Some(BASIC_ALICE)),
        "{sent:?}"
    );
}

/// Token requests carry the credential: a refresh token in a POST body
/// would be sent on unchanged by a 307, so a token request follows no
/// redirect off its origin (and a Basic one never carries its header off).
#[tokio::test(flavor = "multi_thread")]
async fn token_requests_do_not_follow_a_redirect_to_another_origin() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    for identity_token in [true, false] {
        let elsewhere_log = Log::default();
        let elsewhere = {
            let log = elsewhere_log.clone();
            Server::start(move |request| {
                record(&log, &request);
                Response::new(200, "application/json", r#"{"token":"stolen"}"#)
            })
        };
        let realm_log = Log::default();
        let realm = {
            let log = realm_log.clone();
            let to = elsewhere.port;
            Server::start(move |request| {
                record(&log, &request);
                Response::new(307, "text/plain", "")
                    .header("Location", &format!("http://127.0.0.1:{to}/token"))
            })
        };
        let registry = redirecting_registry(Some(realm.port), elsewhere.port, Log::default());
        let host = format!("127.0.0.1:{}", registry.port);
        let mut options = options(&host, "alice:s3cret");
        if identity_token {
            let path = dir.path().join("auth.json");
            fs_err::write(
                &path,
                format!(r#"{{"auths":{{"{host}":{{"identitytoken":"refresh-s3cret"}}}}}}"#),
            )
            .unwrap();
            options.credentials = CredentialSource::File(path);
        }
        let client = custody_oci::registry::Client::new(&host, &options)
            .await
            .unwrap();
        let err = client.manifest("team/app", "v1").await.unwrap_err();
        let reached = seen(&elsewhere_log);
        assert!(
            reached.is_empty(),
            "a token request followed a redirect to another origin (identity token: {identity_token}): {reached:?}"
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert_eq!(seen(&realm_log).len(), 1, "the realm was asked once");
    }
}
