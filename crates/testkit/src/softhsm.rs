//! Throwaway SoftHSM tokens: a directory of their own and a
//! `SOFTHSM2_CONF` naming it, so tests running at once never share a
//! token. The variable is handed to each process that needs it
//! ([`SoftHsm::env`]); a test that loads the module itself runs again in a
//! child process that has it ([`SoftHsm::in_child`]), since SoftHSM reads
//! it once and the test process's environment is not the test's to change.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `softhsm2` puts the module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM token in a temporary directory.
pub struct SoftHsm {
    /// `None` in the child of [`SoftHsm::in_child`]: the parent owns it.
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
    pub label: String,
    pub pin: String,
}

impl SoftHsm {
    /// Initialises a token labelled `label` with user PIN `pin`.
    pub fn token(label: &str, pin: &str) -> Self {
        Self::token_in(&std::env::temp_dir(), label, pin)
    }

    /// [`SoftHsm::token`] in a new directory under `parent`.
    pub fn token_in(parent: &Path, label: &str, pin: &str) -> Self {
        assert!(
            Path::new(MODULE).is_file(),
            "SoftHSM is not installed at {MODULE} (run scripts/setup)"
        );
        let dir = tempfile::tempdir_in(parent).unwrap();
        let tokens = dir.path().join("tokens");
        fs_err::create_dir(&tokens).unwrap();
        fs_err::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let hsm = Self {
            root: dir.path().to_owned(),
            _dir: Some(dir),
            label: label.to_owned(),
            pin: pin.to_owned(),
        };
        let output = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", pin, "--so-pin", "so-secret"])
            .env("SOFTHSM2_CONF", hsm.conf())
            .output()
            .expect("softhsm2-util runs (run scripts/setup)");
        assert!(
            output.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        hsm
    }

    /// The directory the token's files are in.
    pub fn tokens(&self) -> PathBuf {
        self.root.join("tokens")
    }

    /// The configuration file to pass as `SOFTHSM2_CONF`.
    pub fn conf(&self) -> PathBuf {
        self.root.join("softhsm2.conf")
    }

    /// `("SOFTHSM2_CONF", path)` for `Command::env`.
    pub fn env(&self) -> (&'static str, PathBuf) {
        ("SOFTHSM2_CONF", self.conf())
    }

    /// For a test that loads the SoftHSM module in its own process: in the
    /// test, makes a token and runs the test `name` (its full libtest
    /// name) again in a child process with `SOFTHSM2_CONF` set, checks it
    /// passed and returns `None`; in that child, returns the token.
    ///
    /// ```ignore
    /// let Some(hsm) = SoftHsm::in_child("signs_concurrently", "custody", "1234") else { return };
    /// ```
    pub fn in_child(name: &str, label: &str, pin: &str) -> Option<Self> {
        const CHILD: &str = "CUSTODY_TESTKIT_SOFTHSM_ROOT";
        if let Some(root) = std::env::var_os(CHILD) {
            return Some(Self {
                _dir: None,
                root: PathBuf::from(root),
                label: label.to_owned(),
                pin: pin.to_owned(),
            });
        }
        let hsm = Self::token(label, pin);
        let output = Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env("SOFTHSM2_CONF", hsm.conf())
            .env(CHILD, &hsm.root)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "`{name}` failed in its child process:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        print!("{stdout}");
        None
    }

    /// A file holding the PIN, for `pin-source=file:…`.
    pub fn pin_file(&self) -> PathBuf {
        let path = self.root.join("pin");
        fs_err::write(&path, format!("{}\n", self.pin)).unwrap();
        path
    }

    /// The URI of key `object` on this token, its PIN in a file.
    pub fn uri(&self, object: &str) -> String {
        format!(
            "pkcs11:token={};object={object}?module-path={MODULE}&pin-source=file:{}",
            self.label,
            self.pin_file().display()
        )
    }

    /// A scratch directory beside the token.
    pub fn dir(&self) -> &Path {
        &self.root
    }
}
