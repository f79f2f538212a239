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
    let url = source::Remote::new(&url);
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
    let err = source::resolve(&source::Remote::new(&url), "main")
        .await
        .unwrap_err();
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

/// Regression (custody serve): a spec read from the source is read from
/// git's objects at the commit; a link is refused, never followed.
#[tokio::test]
async fn files_are_read_at_a_commit_without_following_links() {
    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path();
    git(dir, &["init", "-q"]);
    fs_err::write(dir.join("custody.yaml"), "steps: []\n").unwrap();
    fs_err::create_dir(dir.join("ci")).unwrap();
    fs_err::write(dir.join("ci/big.yaml"), "x".repeat(5000)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.join("link.yaml")).unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "one"]);
    let first = git(dir, &["rev-parse", "HEAD"]);
    fs_err::write(dir.join("custody.yaml"), "steps: [changed]\n").unwrap();
    git(dir, &["commit", "-q", "-am", "two"]);
    let url = source::GitUrl::parse(&format!("file://{}", dir.display())).unwrap();
    let remote = source::Remote::new(&url);

    let read = source::read_file(&remote, &first, "custody.yaml", 1024).await;
    assert_eq!(
        read.unwrap(),
        b"steps: []\n",
        "the file as it was at that commit"
    );
    for (path, says) in [
        ("link.yaml", "symbolic link"),
        ("ci/big.yaml", "larger than 1024 bytes"),
        ("ci", "not a regular file"),
        ("missing.yaml", "no such file"),
        ("*.yaml", "no such file"),
    ] {
        let err = source::read_file(&remote, &first, path, 1024)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(says), "{path}: {err}");
        assert!(!err.to_string().contains("root:"), "{err}");
    }
}

/// A server that accepts and never answers costs at most the deadline, and
/// leaves no git behind.
#[tokio::test]
async fn a_tarpit_costs_the_deadline_and_no_more() {
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tarpit.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in tarpit.incoming().take(2) {
            held.push(stream);
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    });
    let url = source::GitUrl::parse(&format!("https://127.0.0.1:{port}/tarpit.git")).unwrap();
    let remote = source::Remote::new(&url).timeout(std::time::Duration::from_secs(1));
    let begun = std::time::Instant::now();
    let err = source::resolve(&remote, "main").await.unwrap_err();
    assert!(matches!(err, SourceError::TimedOut { .. }), "{err}");
    assert!(
        begun.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        begun.elapsed()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains(&format!("127.0.0.1:{port}/tarpit"))),
        "git outlived its deadline:\n{ps}"
    );
    drop(held);
}

/// A pinned remote connects to the address it was pinned to, whatever
/// its name resolves to.
#[tokio::test]
async fn a_pinned_remote_connects_where_it_was_pinned() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let url =
        source::GitUrl::parse(&format!("https://pinned.invalid:{}/app.git", addr.port())).unwrap();
    let unpinned = source::resolve(&source::Remote::new(&url), "main")
        .await
        .unwrap_err();
    assert!(unpinned.to_string().contains("resolve"), "{unpinned}");
    listener.set_nonblocking(true).unwrap();
    let remote = source::Remote::new(&url)
        .pinned(Some(addr))
        .timeout(std::time::Duration::from_secs(1));
    let _ = source::resolve(&remote, "main").await;
    assert!(
        listener.accept().is_ok(),
        "git did not connect to the pinned address"
    );
}
