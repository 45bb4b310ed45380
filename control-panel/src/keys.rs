//! Client platforms' keys: the 256-bit secrets every frame of a client
//! platform is sealed with (`dmfabric_wire::auth`), as the control panel
//! keeps them ([`ClientKeys`], stored next to the records but never part
//! of [`crate::model::Db`]) and as a file for hosts without a store
//! ([`KeyFile`], config mode).
//!
//! A client platform has 1 to [`KeyRing::MAX`] keys, each with an id (1 to
//! 255, carried in every frame's header) and one of them the key new frames
//! are sealed with (`send`). A rekey ([`ClientKeys::with_new_key`], then
//! [`ClientKeys::sending_with`]) first adds a key that every receiver
//! accepts, and only then moves senders to it, so no frame in flight is
//! refused; [`ClientKeys::retired`] drops the keys no longer sent with.
//!
//! What this module does not do: seal or check frames (wire), decide who
//! may read keys (the stores: see `etcd`'s grants), or print secrets (a
//! [`Secret`]'s `Debug` never shows it).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dmfabric_wire::auth::{KeyRing, Secret, SECRET_LEN};
use serde::{Deserialize, Serialize};

/// Largest key file or stored key set read, in bytes (four keys take a
/// few hundred).
pub const MAX_KEYS_BYTES: u64 = 16 * 1024;

/// Why keys cannot be used, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key set itself makes no sense (what is wrong with it).
    #[error("The keys of client platform {client} are not usable: {what}")]
    Invalid { client: u16, what: String },
    /// Stored or filed keys that do not parse.
    #[error("{what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
    #[error("key file {} is {why} (mode {mode:04o}): chmod 600 {}", path.display(), path.display())]
    Exposed { path: PathBuf, mode: u32, why: &'static str },
    #[error("key file {}: {what}", path.display())]
    File { path: PathBuf, what: String },
    #[error("key file {} exists: keep it, or pass --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("No randomness from the operating system for a new key: {0}")]
    Random(String),
}

/// One key of a client platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The id frames carry (1 to 255).
    pub id: u8,
    pub secret: Secret,
    /// When it was made (seconds since the Unix epoch; 0: not known, e.g.
    /// read from a key file).
    pub added_unix: u64,
}

/// The keys of one client platform: what the control panel stores under
/// the client's id, and what a data plane builds its [`KeyRing`] from.
///
/// Stored as JSON with each secret as 64 hex digits; a stored set is
/// checked as it is read ([`ClientKeys::check`]), so one that is corrupt
/// or makes no sense is an error, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawKeys", into = "RawKeys")]
pub struct ClientKeys {
    pub client: u16,
    /// Oldest first.
    pub keys: Vec<StoredKey>,
    /// The id of the key new frames are sealed with.
    pub send: u8,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: u8,
    secret: String,
    #[serde(default)]
    added_unix: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    client: u16,
    keys: Vec<RawKey>,
    send: u8,
}

impl TryFrom<RawKeys> for ClientKeys {
    type Error = String;

    fn try_from(raw: RawKeys) -> Result<ClientKeys, String> {
        let mut keys = Vec::with_capacity(raw.keys.len().min(KeyRing::MAX));
        for k in raw.keys.into_iter().take(KeyRing::MAX + 1) {
            let secret = Secret::from_hex(&k.secret).map_err(|e| format!("key {}: {e}", k.id))?;
            keys.push(StoredKey { id: k.id, secret, added_unix: k.added_unix });
        }
        let keys = ClientKeys { client: raw.client, keys, send: raw.send };
        keys.check().map_err(|e| e.to_string())?;
        Ok(keys)
    }
}

impl From<ClientKeys> for RawKeys {
    fn from(k: ClientKeys) -> RawKeys {
        RawKeys {
            client: k.client,
            keys: k
                .keys
                .iter()
                .map(|s| RawKey { id: s.id, secret: s.secret.to_hex(), added_unix: s.added_unix })
                .collect(),
            send: k.send,
        }
    }
}

/// A fresh random secret.
pub fn random_secret() -> Result<Secret, KeyError> {
    let mut bytes = [0u8; SECRET_LEN];
    getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(Secret::from_bytes(bytes))
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl ClientKeys {
    /// Key 1 of `client`, a fresh random secret, sent with.
    pub fn generate(client: u16) -> Result<ClientKeys, KeyError> {
        Ok(ClientKeys {
            client,
            keys: vec![StoredKey { id: 1, secret: random_secret()?, added_unix: now_unix() }],
            send: 1,
        })
    }

    /// Whether the set makes sense: 1 to [`KeyRing::MAX`] keys, ids 1 to
    /// 255 and unique, `send` among them.
    pub fn check(&self) -> Result<(), KeyError> {
        let bad = |what: String| Err(KeyError::Invalid { client: self.client, what });
        if self.keys.is_empty() || self.keys.len() > KeyRing::MAX {
            return bad(format!("a client platform has 1 to {} keys, not {}", KeyRing::MAX, self.keys.len()));
        }
        if self.keys.iter().any(|k| k.id == 0) {
            return bad("key ids are 1 to 255 (0 is not one)".into());
        }
        for (i, k) in self.keys.iter().enumerate() {
            if self.keys[..i].iter().any(|o| o.id == k.id) {
                return bad(format!("key id {} appears twice", k.id));
            }
        }
        if !self.keys.iter().any(|k| k.id == self.send) {
            return bad(format!("it sends with key {}, which it does not have", self.send));
        }
        Ok(())
    }

    /// The ring a data plane seals and checks this client's frames with.
    pub fn ring(&self) -> Result<KeyRing, KeyError> {
        self.check()?;
        let keys: Vec<(u8, Secret)> = self.keys.iter().map(|k| (k.id, k.secret.clone())).collect();
        KeyRing::new(&keys, self.send)
            .ok_or_else(|| KeyError::Invalid { client: self.client, what: "the wire refuses this key set".into() })
    }

    /// The ids held, oldest first.
    pub fn ids(&self) -> Vec<u8> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// The first step of a rekey: a new random key with the next id (after
    /// the highest, wrapping from 255 to 1 and skipping ids held), keeping
    /// at most two — the oldest keys not sent with are dropped to make
    /// room. `send` does not change. Returns the new set and the new id.
    pub fn with_new_key(&self, added_unix: u64) -> Result<(ClientKeys, u8), KeyError> {
        self.check()?;
        let mut keys = self.keys.clone();
        while keys.len() >= 2 {
            match keys.iter().position(|k| k.id != self.send) {
                Some(oldest) => {
                    keys.remove(oldest);
                }
                None => break,
            }
        }
        let top = self.keys.iter().map(|k| k.id).max().unwrap_or(0);
        let mut id = top;
        loop {
            id = if id == u8::MAX { 1 } else { id + 1 };
            if !keys.iter().any(|k| k.id == id) {
                break;
            }
        }
        keys.push(StoredKey { id, secret: random_secret()?, added_unix });
        let next = ClientKeys { client: self.client, keys, send: self.send };
        next.check()?;
        Ok((next, id))
    }

    /// The same keys, sending with `id`.
    pub fn sending_with(&self, id: u8) -> Result<ClientKeys, KeyError> {
        let next = ClientKeys { send: id, ..self.clone() };
        next.check()?;
        Ok(next)
    }

    /// Only the key sent with (the end of a rekey, once every host sends
    /// with it).
    pub fn retired(&self) -> Result<ClientKeys, KeyError> {
        self.check()?;
        let keys = self.keys.iter().filter(|k| k.id == self.send).cloned().collect();
        Ok(ClientKeys { keys, ..self.clone() })
    }

    /// Parse a stored set (JSON), named `what` in errors.
    pub fn from_json(what: &str, bytes: &[u8]) -> Result<ClientKeys, KeyError> {
        let corrupt = |why: String| KeyError::Corrupt { what: what.to_string(), why };
        if bytes.len() as u64 > MAX_KEYS_BYTES {
            return Err(corrupt(format!("{} bytes, more than keys take ({MAX_KEYS_BYTES})", bytes.len())));
        }
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))
    }

    /// Parse the set stored for `client` (JSON), which must be that
    /// client platform's: what both stores read.
    pub fn from_stored(client: u16, bytes: &[u8]) -> Result<ClientKeys, KeyError> {
        let keys = ClientKeys::from_json(&format!("the keys of client platform {client}"), bytes)?;
        if keys.client != client {
            return Err(KeyError::Corrupt {
                what: format!("the keys stored for client platform {client}"),
                why: format!("they are client platform {}'s", keys.client),
            });
        }
        Ok(keys)
    }

    /// The stored form (JSON).
    pub fn to_json(&self) -> Vec<u8> {
        // Plain integers and strings: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A client platform's keys as a file, for hosts that run from a config
/// instead of a store (`key_file = ...` in the client's and servers'
/// TOML, `dmfabric io --key-file`):
///
/// ```toml
/// client = 3
/// send = 2          # optional: the highest id by default
/// [[key]]
/// id = 1
/// secret = "<64 hex digits>"
/// [[key]]
/// id = 2
/// secret = "<64 hex digits>"
/// ```
///
/// [`KeyFile::load`] refuses a file that group or others may read or
/// write; [`KeyFile::save`] writes it 0600, atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub client: u16,
    pub send: u8,
    /// (id, secret), oldest first.
    pub keys: Vec<(u8, Secret)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    client: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    send: Option<u8>,
    key: Vec<RawFileKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileKey {
    id: u8,
    secret: String,
}

impl From<&ClientKeys> for KeyFile {
    fn from(k: &ClientKeys) -> KeyFile {
        KeyFile { client: k.client, send: k.send, keys: k.keys.iter().map(|s| (s.id, s.secret.clone())).collect() }
    }
}

impl From<KeyFile> for ClientKeys {
    fn from(f: KeyFile) -> ClientKeys {
        ClientKeys {
            client: f.client,
            keys: f.keys.into_iter().map(|(id, secret)| StoredKey { id, secret, added_unix: 0 }).collect(),
            send: f.send,
        }
    }
}

impl KeyFile {
    /// A file holding one fresh key (id 1) of `client`.
    pub fn generate(client: u16) -> Result<KeyFile, KeyError> {
        Ok(KeyFile::from(&ClientKeys::generate(client)?))
    }

    /// Parse the text of a key file (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<KeyFile, KeyError> {
        let err = |what: String| KeyError::File { path: path.to_path_buf(), what };
        let raw: RawFile = toml::from_str(text).map_err(|e| err(one_line(&e.to_string())))?;
        if raw.key.len() > KeyRing::MAX {
            return Err(err(format!("at most {} keys, not {}", KeyRing::MAX, raw.key.len())));
        }
        let mut keys = Vec::with_capacity(raw.key.len());
        for k in raw.key {
            let secret = Secret::from_hex(&k.secret).map_err(|e| err(format!("key {}: {e}", k.id)))?;
            keys.push((k.id, secret));
        }
        let send = match raw.send {
            Some(s) => s,
            None => keys.iter().map(|(id, _)| *id).max().ok_or_else(|| err("it has no [[key]]".into()))?,
        };
        let file = KeyFile { client: raw.client, send, keys };
        ClientKeys::from(file.clone()).check().map_err(|e| err(e.to_string()))?;
        Ok(file)
    }

    /// The text of the file.
    pub fn to_toml(&self) -> String {
        let mut out = format!(
            "# dmfabric keys of client platform {}: keep this file secret (mode 0600)\nclient = {}\nsend = {}\n",
            self.client, self.client, self.send
        );
        for (id, secret) in &self.keys {
            out.push_str(&format!("\n[[key]]\nid = {id}\nsecret = \"{}\"\n", secret.to_hex()));
        }
        out
    }

    /// Read the key file at `path`: refused if group or others may read or
    /// write it, if it is not a regular file, or if it is larger than a key
    /// file can be.
    pub fn load(path: &Path) -> Result<KeyFile, KeyError> {
        let err = |what: String| KeyError::File { path: path.to_path_buf(), what };
        let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open it: {e}")))?;
        // The mode of what was opened, not of what the path names later.
        let meta = file.metadata().map_err(|e| err(format!("cannot stat it: {e}")))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o044 != 0 {
            return Err(KeyError::Exposed { path: path.to_path_buf(), mode, why: "readable by others" });
        }
        if mode & 0o022 != 0 {
            return Err(KeyError::Exposed { path: path.to_path_buf(), mode, why: "writable by others" });
        }
        if meta.len() > MAX_KEYS_BYTES {
            return Err(err(format!("{} bytes, more than a key file takes ({MAX_KEYS_BYTES})", meta.len())));
        }
        let mut text = String::new();
        file.take(MAX_KEYS_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| err(format!("cannot read it as text: {e}")))?;
        KeyFile::parse(path, &text)
    }

    /// Write the file at `path`, mode 0600, replacing one that is there:
    /// a new file is written and renamed over it, so a reader sees the old
    /// keys or the new ones, never a part.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        self.write(path, true)
    }

    /// [`KeyFile::save`], refusing to replace a file already at `path`
    /// ([`KeyError::Exists`]).
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        self.write(path, false)
    }

    fn write(&self, path: &Path, replace: bool) -> Result<(), KeyError> {
        let err = |what: String| KeyError::File { path: path.to_path_buf(), what };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().ok_or_else(|| err("not a file name".into()))?;
        let mut tag = [0u8; 6];
        getrandom::fill(&mut tag).map_err(|e| KeyError::Random(e.to_string()))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = dir.join(format!(".{}.{tag}.tmp", name.to_string_lossy()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
            // The umask may have taken bits off 0600 (the owner's too): set it outright.
            f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| err(e.to_string()))?;
            f.write_all(self.to_toml().as_bytes()).map_err(|e| err(format!("cannot write it: {e}")))?;
            f.sync_all().map_err(|e| err(format!("cannot write it: {e}")))?;
            if replace {
                std::fs::rename(&tmp, path).map_err(|e| err(format!("cannot put it in place: {e}")))
            } else {
                // A hard link fails if the name is taken: no check-then-write race.
                match std::fs::hard_link(&tmp, path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Err(KeyError::Exists { path: path.to_path_buf() })
                    }
                    Err(e) => Err(err(format!("cannot put it in place: {e}"))),
                }
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        result?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The ring the file's keys make.
    pub fn ring(&self) -> Result<KeyRing, KeyError> {
        ClientKeys::from(self.clone()).ring()
    }
}

/// The first line of a (TOML) error, which spans several.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> Secret {
        Secret::from_bytes([b; SECRET_LEN])
    }

    fn keys(ids: &[u8], send: u8) -> ClientKeys {
        ClientKeys {
            client: 3,
            keys: ids.iter().map(|&id| StoredKey { id, secret: secret(id), added_unix: u64::from(id) }).collect(),
            send,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dmfabric-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn generated_keys_are_random_and_make_a_ring() {
        let a = ClientKeys::generate(3).unwrap();
        let b = ClientKeys::generate(3).unwrap();
        assert_eq!((a.client, a.ids(), a.send), (3, vec![1], 1));
        assert_ne!(a.keys[0].secret, b.keys[0].secret);
        assert_eq!(a.ring().unwrap().sending().id, 1);
    }

    #[test]
    fn stored_keys_round_trip_and_bad_ones_are_clear_errors() {
        let k = keys(&[1, 2], 2);
        let json = k.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(&secret(1).to_hex()), "secrets as hex: {text}");
        assert_eq!(ClientKeys::from_json("keys of client platform 3", &json).unwrap(), k);
        let bad = |j: &str| ClientKeys::from_json("keys/client/3", j.as_bytes()).unwrap_err().to_string();
        let hex = secret(1).to_hex();
        let e = bad(&format!(r#"{{"client":3,"keys":[{{"id":1,"secret":"{hex}"}}],"send":2}}"#));
        assert!(e.starts_with("keys/client/3 is corrupt:") && e.contains("sends with key 2"), "{e}");
        let e = bad(&format!(
            r#"{{"client":3,"keys":[{{"id":1,"secret":"{hex}"}},{{"id":1,"secret":"{hex}"}}],"send":1}}"#
        ));
        assert!(e.contains("key id 1 appears twice"), "{e}");
        assert!(bad(r#"{"client":3,"keys":[],"send":1}"#).contains("1 to 4 keys"));
        assert!(bad(r#"{"client":3,"keys":[{"id":1,"secret":"abc"}],"send":1}"#).contains("64 hex digits"));
        let five: Vec<String> = (1..=5).map(|i| format!(r#"{{"id":{i},"secret":"{hex}"}}"#)).collect();
        assert!(bad(&format!(r#"{{"client":3,"keys":[{}],"send":1}}"#, five.join(","))).contains("not 5"));
        assert!(bad(&format!(r#"{{"client":3,"keys":[{{"id":0,"secret":"{hex}"}}],"send":0}}"#)).contains("0 is not"));
        assert!(bad("not json").contains("is corrupt"));
        let huge = vec![b' '; MAX_KEYS_BYTES as usize + 1];
        assert!(ClientKeys::from_json("x", &huge).unwrap_err().to_string().contains("more than keys take"));
        // Secrets never show in Debug.
        assert!(!format!("{k:?}").contains(&hex));
    }

    #[test]
    fn a_rekey_adds_then_sends_then_retires() {
        let one = keys(&[1], 1);
        let (two, id) = one.with_new_key(50).unwrap();
        assert_eq!((id, two.ids(), two.send), (2, vec![1, 2], 1), "send unchanged");
        let moved = two.sending_with(2).unwrap();
        assert_eq!(moved.ring().unwrap().sending().id, 2);
        // A third key drops the oldest one not sent with: at most two.
        let (three, id) = moved.with_new_key(60).unwrap();
        assert_eq!((id, three.ids(), three.send), (3, vec![2, 3], 2));
        // Without the switch, the sending key stays.
        let (again, id) = two.with_new_key(70).unwrap();
        assert_eq!((id, again.ids(), again.send), (3, vec![1, 3], 1));
        assert_eq!(three.retired().unwrap().ids(), vec![2]);
        assert!(two.sending_with(9).is_err());
        // Ids wrap from 255 to 1, skipping ids held.
        let (wrapped, id) = keys(&[1, 255], 1).with_new_key(0).unwrap();
        assert_eq!((id, wrapped.ids()), (2, vec![1, 2]));
    }

    #[test]
    fn key_files_round_trip_at_mode_0600_and_exposed_ones_are_refused() {
        let d = tmp("files");
        let p = d.join("client3.keys");
        let f = KeyFile::from(&keys(&[1, 2], 1));
        f.save_new(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(KeyFile::load(&p).unwrap(), f);
        assert_eq!(f.ring().unwrap().sending().id, 1);
        assert!(matches!(f.save_new(&p), Err(KeyError::Exists { .. })), "no overwrite without asking");
        let g = KeyFile::from(&keys(&[2], 2));
        g.save(&p).unwrap();
        assert_eq!(KeyFile::load(&p).unwrap(), g);
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary files left");

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyFile::load(&p).unwrap_err().to_string();
        let shown = p.display();
        assert_eq!(e, format!("key file {shown} is readable by others (mode 0644): chmod 600 {shown}"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(KeyFile::load(&p).unwrap_err().to_string().contains("writable by others"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn key_file_text_defaults_send_to_the_highest_id_and_refuses_nonsense() {
        let p = Path::new("k.toml");
        let (a, b) = (secret(1).to_hex(), secret(2).to_hex());
        let text = format!("client = 3\n[[key]]\nid = 1\nsecret = \"{a}\"\n[[key]]\nid = 2\nsecret = \"{b}\"\n");
        let f = KeyFile::parse(p, &text).unwrap();
        assert_eq!((f.client, f.send, f.keys.len()), (3, 2, 2));
        let bad = |t: &str| KeyFile::parse(p, t).unwrap_err().to_string();
        assert!(bad("client = 3\n").contains("key file k.toml"));
        assert!(bad(&format!("client = 3\nsend = 5\n[[key]]\nid = 1\nsecret = \"{a}\"\n")).contains("sends with key 5"));
        assert!(bad("client = 3\n[[key]]\nid = 1\nsecret = \"xyz\"\n").contains("64 hex digits"));
        assert!(bad("client = 70000\n").contains("key file k.toml"));
        assert!(bad(&format!("client = 3\nextra = 1\n[[key]]\nid = 1\nsecret = \"{a}\"\n")).contains("unknown field"));
        assert!(!bad("client = 3\n").contains('\n'), "one line");
    }

    #[test]
    fn odd_key_files_are_clear_errors() {
        let d = tmp("odd");
        let e = KeyFile::load(&d.join("missing")).unwrap_err().to_string();
        assert!(e.contains("cannot open it"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(KeyFile::load(&d).unwrap_err().to_string().contains("not a regular file"));
        let big = d.join("big");
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&big).unwrap();
        std::fs::write(&big, vec![b'#'; MAX_KEYS_BYTES as usize + 10]).unwrap();
        assert!(KeyFile::load(&big).unwrap_err().to_string().contains("more than a key file takes"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
