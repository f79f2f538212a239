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

/// Plain HTTP to `host`, as `user:password`.
fn options(host: &str, creds: &str) -> RegistryOptions {
    RegistryOptions {
        insecure_hosts: vec![host.to_owned()],
        credentials: CredentialSource::Explicit(auth::parse_creds(creds).unwrap()),
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
