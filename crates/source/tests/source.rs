//! Sources from real git repositories and local directories.

use std::path::Path;

use custody_source::{self as source, LocalState, SourceError};

use custody_testkit::git;

/// A repository with two commits on `main`, the first tagged `v1` (annotated).
fn repository(dir: &Path) -> (String, String) {
    git(dir, &["init", "-q"]);
    fs_err::write(dir.join("file"), "one").unwrap();
    git(dir, &["add", "file"]);
    git(dir, &["commit", "-q", "-m", "one"]);
    let first = git(dir, &["rev-parse", "HEAD"]);
    git(dir, &["tag", "-a", "v1", "-m", "v1"]);
    fs_err::write(dir.join("file"), "two").unwrap();
    git(dir, &["commit", "-q", "-am", "two"]);
    (first, git(dir, &["rev-parse", "HEAD"]))
}

#[tokio::test]
async fn revisions_resolve_and_fetch_at_their_commit() {
    let repo = tempfile::tempdir().unwrap();
    let (first, second) = repository(repo.path());
    let text = format!("file://{}", repo.path().display());
    let url = source::GitUrl::parse(&text).unwrap();
    assert_eq!(source::resolve(&url, "main").await.unwrap(), second);
    assert_eq!(source::resolve(&url, "HEAD").await.unwrap(), second);
    assert_eq!(
        source::resolve(&url, "v1").await.unwrap(),
        first,
        "an annotated tag resolves to its commit"
    );
    assert_eq!(
        source::resolve(&url, &first.to_uppercase()).await.unwrap(),
        first
    );

    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("src");
    source::fetch(&url, &first, &dest).await.unwrap();
    assert_eq!(fs_err::read_to_string(dest.join("file")).unwrap(), "one");

    let err = source::resolve(&url, "nope").await.unwrap_err();
    assert!(matches!(err, SourceError::UnknownRevision { .. }), "{err}");
    assert!(
        err.to_string().contains("`nope`") && err.to_string().contains(&text),
        "{err}"
    );

    let err = source::fetch(&url, &"f".repeat(40), &work.path().join("other"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("checkout"), "{err}");
}

#[tokio::test]
async fn ext_transport_urls_run_nothing() {
    let marker = tempfile::tempdir().unwrap();
    let flag = marker.path().join("ran");
    let url = source::GitUrl::parse(&format!("ext::sh -c touch% {}", flag.display())).unwrap();
    let err = source::resolve(&url, "main").await.unwrap_err();
    assert!(matches!(err, SourceError::Git { .. }), "{err}");
    assert!(!flag.exists(), "git ran a command from the URL");
}

#[tokio::test]
async fn local_directories_are_copied_with_their_git_state() {
    let repo = tempfile::tempdir().unwrap();
    let (_, head) = repository(repo.path());
    assert_eq!(
        source::local_state(repo.path()).await,
        Some(LocalState {
            commit: head.clone(),
            dirty: false
        })
    );
    fs_err::write(repo.path().join("untracked"), "x").unwrap();
    assert_eq!(
        source::local_state(repo.path()).await,
        Some(LocalState {
            commit: head,
            dirty: true
        })
    );

    let plain = tempfile::tempdir().unwrap();
    fs_err::write(plain.path().join("a"), "a").unwrap();
    std::os::unix::fs::symlink("a", plain.path().join("link")).unwrap();
    assert_eq!(source::local_state(plain.path()).await, None);
    let dest = tempfile::tempdir().unwrap();
    source::copy_local(plain.path(), &dest.path().join("ws"))
        .await
        .unwrap();
    assert_eq!(
        fs_err::read_to_string(dest.path().join("ws/a")).unwrap(),
        "a"
    );
    assert!(dest.path().join("ws/link").is_symlink());
}
