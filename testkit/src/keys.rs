//! Keys for tests: a fixed secret per client platform (tests must not
//! depend on randomness to be repeatable), its ring, sealed frames, and
//! key files a test writes for the binaries it starts.

use std::path::Path;

pub use dmfabric_wire::auth::testing::{ring, secret};
use dmfabric_wire::FrameRepr;

/// `repr` sealed with client platform `client`'s test key.
pub fn sealed(repr: &FrameRepr<'_>, client: u16) -> Vec<u8> {
    let mut buf = vec![0u8; repr.sealed_len()];
    let n = repr.emit_sealed(&mut buf, &ring(client).sending()).expect("the buffer fits the frame");
    buf.truncate(n);
    buf
}

/// `repr` without a tag (what a forger without keys sends).
pub fn unsealed(repr: &FrameRepr<'_>) -> Vec<u8> {
    let repr = FrameRepr { auth_tag: None, ..*repr };
    let mut buf = vec![0u8; repr.buffer_len()];
    let n = repr.emit(&mut buf).expect("the buffer fits the frame");
    buf.truncate(n);
    buf
}

/// Write client platform `client`'s test key as a key file (mode 0600) at
/// `path`, in the format `dmfabric keygen` writes.
pub fn write_key_file(path: &Path, client: u16) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = format!(
        "# dmfabric client platform key (test)\nclient = {client}\nsend = 1\n\n[[key]]\nid = 1\nsecret = \"{}\"\n",
        secret(client).to_hex()
    );
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}
