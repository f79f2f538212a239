//! PKCS#11 URIs (RFC 7512): which module, token and object, and where the
//! PIN comes from. The PIN never prints: `Debug` and `Display` show
//! `pin-value=***`, and a `pin-source` file is read only when logging in.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::Error;

/// `pkcs11:token=T;object=O[;id=%01…]?module-path=/…so&pin-source=file:/…`
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// The token's label (`CKA_LABEL` of the token, RFC 7512 `token`).
    pub token: String,
    /// The key's label (`object`): the private and the public key share it.
    pub object: Option<String>,
    /// The key's `CKA_ID` (`id`), percent-decoded.
    pub id: Option<Vec<u8>>,
    /// The module (shared library) to load (`module-path`).
    pub module_path: PathBuf,
    pin: Option<Pin>,
}

/// Where the user PIN comes from.
#[derive(Clone, PartialEq, Eq)]
enum Pin {
    /// `pin-source=file:PATH` (or a bare absolute path): the file's first
    /// line.
    Source(PathBuf),
    /// `pin-value=…`: in the URI itself (keep such a URI out of shared
    /// configuration).
    Value(String),
}

impl Pkcs11Uri {
    /// The PIN, read now from its source; `None` when the URI names none.
    pub(crate) fn pin(&self) -> Result<Option<String>, Error> {
        match &self.pin {
            None => Ok(None),
            Some(Pin::Value(value)) => Ok(Some(value.clone())),
            Some(Pin::Source(path)) => {
                let text = fs_err::read_to_string(path).map_err(|e| Error::Pin {
                    uri: self.to_string(),
                    reason: e.to_string(),
                })?;
                Ok(Some(text.lines().next().unwrap_or_default().to_owned()))
            }
        }
    }

    /// Whether the PIN is in the URI itself (`pin-value=`): wherever the
    /// URI goes, the PIN goes (a command's arguments, a shared file).
    pub fn pin_in_uri(&self) -> bool {
        matches!(self.pin, Some(Pin::Value(_)))
    }

    /// The file the PIN is read from, if any (to hide it from steps).
    pub fn pin_file(&self) -> Option<&Path> {
        match &self.pin {
            Some(Pin::Source(path)) => Some(path),
            _ => None,
        }
    }

    /// Where the module keeps its tokens on disk, for a module custody
    /// knows (to hide it from steps too: a token's files hold the key,
    /// wrapped by the PIN, and a step could try PINs offline). SoftHSM 2:
    /// `directories.tokendir` of the file `SOFTHSM2_CONF` names, or of
    /// `/etc/softhsm/softhsm2.conf`. Empty for any other module.
    pub fn token_storage(&self) -> Vec<PathBuf> {
        let is_softhsm = self
            .module_path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.contains("softhsm"));
        if !is_softhsm {
            return Vec::new();
        }
        let conf = std::env::var_os("SOFTHSM2_CONF").map_or_else(
            || PathBuf::from("/etc/softhsm/softhsm2.conf"),
            PathBuf::from,
        );
        let Ok(text) = fs_err::read_to_string(&conf) else {
            return Vec::new();
        };
        softhsm_token_dirs(&text)
    }

    /// How the key is named in messages: its label, else its id.
    pub fn object_name(&self) -> String {
        match (&self.object, &self.id) {
            (Some(label), _) => label.clone(),
            (None, Some(id)) => format!("id={}", encode(id, true)),
            (None, None) => String::new(),
        }
    }
}

/// The `directories.tokendir` values of a SoftHSM 2 configuration
/// (`key = value` lines, `#` comments).
fn softhsm_token_dirs(conf: &str) -> Vec<PathBuf> {
    conf.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "directories.tokendir").then(|| PathBuf::from(value.trim()))
        })
        .filter(|path| path.is_absolute())
        .collect()
}

impl FromStr for Pkcs11Uri {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::Uri {
            // Never echo the text: it may hold a PIN.
            reason,
        };
        let rest = text
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("it does not start with `pkcs11:`".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut token, mut object, mut id) = (None, None, None);
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| bad(format!("`{attribute}` is not `NAME=VALUE`")))?;
            let value = decode(value).map_err(|e| bad(format!("`{name}`: {e}")))?;
            let utf8 = |value: Vec<u8>| {
                String::from_utf8(value).map_err(|_| bad(format!("`{name}` is not UTF-8")))
            };
            match name {
                "token" => token = Some(utf8(value)?),
                "object" => object = Some(utf8(value)?),
                "id" => id = Some(value),
                // Narrowing attributes custody does not need: a key is
                // found by token and label or id.
                "type"
                | "manufacturer"
                | "model"
                | "serial"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-manufacturer"
                | "slot-description"
                | "slot-id" => {}
                other => return Err(bad(format!("unknown attribute `{other}`"))),
            }
        }
        let (mut module_path, mut pin) = (None, None);
        for attribute in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| bad(format!("`{attribute}` is not `NAME=VALUE`")))?;
            let value =
                String::from_utf8(decode(value).map_err(|e| bad(format!("`{name}`: {e}")))?)
                    .map_err(|_| bad(format!("`{name}` is not UTF-8")))?;
            match name {
                "module-path" => module_path = Some(PathBuf::from(value)),
                "pin-source" => {
                    let path = value.strip_prefix("file:").unwrap_or(&value);
                    if !path.starts_with('/') {
                        return Err(bad("`pin-source` must be `file:/ABSOLUTE/PATH`".into()));
                    }
                    pin = Some(Pin::Source(PathBuf::from(path)));
                }
                "pin-value" => pin = Some(Pin::Value(value)),
                "module-name" => {
                    return Err(bad(
                        "`module-name` is not supported: name the module by `module-path`".into(),
                    ));
                }
                other => return Err(bad(format!("unknown query attribute `{other}`"))),
            }
        }
        let token = token.ok_or_else(|| bad("it names no `token`".into()))?;
        if object.is_none() && id.is_none() {
            return Err(bad("it names no key: add `object=LABEL` (or `id=…`)".into()));
        }
        let module_path = module_path.ok_or_else(|| {
            bad("it names no module: add `?module-path=/path/to/module.so`".into())
        })?;
        Ok(Self {
            token,
            object,
            id,
            module_path,
            pin,
        })
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pkcs11:token={}", encode(self.token.as_bytes(), false))?;
        if let Some(object) = &self.object {
            write!(f, ";object={}", encode(object.as_bytes(), false))?;
        }
        if let Some(id) = &self.id {
            write!(f, ";id={}", encode(id, true))?;
        }
        write!(
            f,
            "?module-path={}",
            encode(self.module_path.to_string_lossy().as_bytes(), false)
        )?;
        match &self.pin {
            Some(Pin::Source(path)) => write!(
                f,
                "&pin-source=file:{}",
                encode(path.to_string_lossy().as_bytes(), false)
            ),
            Some(Pin::Value(_)) => f.write_str("&pin-value=***"),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Uri({self})")
    }
}

/// Percent-decoding (RFC 3986 section 2.1).
fn decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a `%` not followed by two hex digits".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Percent-encoding of what RFC 7512 does not allow as is (`all`: every byte).
fn encode(bytes: &[u8], all: bool) -> String {
    bytes
        .iter()
        .map(|&b| {
            let plain = b.is_ascii_alphanumeric() || b"-._~/:".contains(&b);
            if plain && !all {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softhsm_token_directories_are_read_from_its_configuration() {
        let conf = "# SoftHSM v2\ndirectories.tokendir = /var/lib/softhsm/tokens/\nobjectstore.backend=file\n#directories.tokendir = /commented\ndirectories.tokendir=relative\n";
        assert_eq!(
            softhsm_token_dirs(conf),
            vec![PathBuf::from("/var/lib/softhsm/tokens/")]
        );
    }

    #[test]
    fn uris_parse_and_print_without_their_pin() {
        let uri: Pkcs11Uri = "pkcs11:token=custody;object=provenance;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=s3cr%65t"
            .parse()
            .unwrap();
        assert_eq!(uri.token, "custody");
        assert_eq!(uri.object.as_deref(), Some("provenance"));
        assert_eq!(uri.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(uri.pin().unwrap().as_deref(), Some("s3cret"));
        for shown in [uri.to_string(), format!("{uri:?}")] {
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(shown.contains("pin-value=***"), "{shown}");
        }
        assert_eq!(
            uri.to_string(),
            "pkcs11:token=custody;object=provenance;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=***"
        );

        let uri: Pkcs11Uri =
            "pkcs11:token=a%20b;object=k?module-path=/m.so&pin-source=file:/etc/custody/pin"
                .parse()
                .unwrap();
        assert_eq!(uri.token, "a b");
        assert_eq!(uri.pin_file(), Some(Path::new("/etc/custody/pin")));
        assert_eq!(uri.to_string().parse::<Pkcs11Uri>().unwrap(), uri);
    }

    #[test]
    fn bad_uris_are_refused_without_echoing_them() {
        for (text, expected) in [
            ("pkcs12:token=a;object=b?module-path=/m", "pkcs11:"),
            ("pkcs11:object=b?module-path=/m", "no `token`"),
            ("pkcs11:token=a?module-path=/m", "no key"),
            ("pkcs11:token=a;object=b", "no module"),
            (
                "pkcs11:token=a;object=b;colour=red?module-path=/m",
                "colour",
            ),
            (
                "pkcs11:token=a;object=b?module-path=/m&pin-source=pin",
                "ABSOLUTE",
            ),
            (
                "pkcs11:token=%zz;object=b?module-path=/m&pin-value=hunter2",
                "hex",
            ),
        ] {
            let err = text.parse::<Pkcs11Uri>().unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
