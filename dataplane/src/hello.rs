//! Opening a session with a server ([`dmfabric_wire::session`]): broadcast
//! a Hello sealed with the client platform's key and carrying a fresh
//! random challenge, take the first HelloReply that verifies, names the
//! challenge (and the wanted server id, if one is given), then tell the
//! server the session is in use (a Register). A reply that does not verify
//! or names another challenge — a forgery, or an old answer replayed — is
//! ignored.

use std::time::{Duration, Instant};

use dmfabric_wire::auth::KeyRing;
use dmfabric_wire::session::{HelloBody, HelloReplyBody, Seq, CHALLENGE_LEN};
use dmfabric_wire::{ControlMsg, ControlOp, EthernetRepr, Frame, FrameRepr, MacAddr, Message, Route};

use crate::batch::FrameBatch;
use crate::transport::{Transport, TransportError};

/// A session a server opened for this client platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub server: u16,
    /// The server's MAC (the reply's source, under its tag).
    pub mac: MacAddr,
    /// The server's epoch: it changes when the server restarts.
    pub epoch: u64,
    pub id: u32,
}

impl Session {
    /// The epoch as frames carry it.
    pub fn epoch32(&self) -> u32 {
        self.epoch as u32
    }
}

/// How a client seals what it sends: its keys, or (to measure what sealing
/// costs, never in service) no tag at all.
#[derive(Debug, Clone)]
pub struct Sealer {
    pub keys: KeyRing,
    pub authenticate: bool,
}

impl Sealer {
    pub fn new(keys: KeyRing) -> Sealer {
        Sealer { keys, authenticate: true }
    }

    /// Emit `repr` sealed (or not) into `batch`; false if it did not fit.
    pub fn push(&self, batch: &mut FrameBatch, repr: &FrameRepr<'_>) -> bool {
        if self.authenticate {
            let key = self.keys.sending();
            batch.push_with(|buf| repr.emit_sealed(buf, &key).ok())
        } else {
            batch.push_with(|buf| repr.emit(buf).ok())
        }
    }

    /// Whether `bytes` is a frame sealed with one of our keys (always, when
    /// not authenticating).
    pub fn verifies(&self, bytes: &[u8]) -> bool {
        if !self.authenticate {
            return true;
        }
        Frame::new_checked(bytes).is_ok_and(|f| self.keys.verify(&f).is_ok())
    }
}

/// Fresh random bytes for a challenge.
pub fn challenge() -> [u8; CHALLENGE_LEN] {
    let mut c = [0u8; CHALLENGE_LEN];
    if getrandom::fill(&mut c).is_err() {
        // No random source: the clock's nanoseconds still make it fresh.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        c.copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    c
}

/// The Hello of `route` with `challenge`, to broadcast.
pub fn hello_frame(from: MacAddr, route: Route, challenge: &[u8; CHALLENGE_LEN]) -> FrameRepr<'_> {
    // The body lives in the challenge itself: HelloBody is its bytes.
    FrameRepr::new(
        EthernetRepr { dst: MacAddr::BROADCAST, src: from },
        Message::Control(ControlMsg { route, seq: 0, op: ControlOp::Hello, payload: challenge }),
    )
}

/// The HelloReply in `bytes` answering one of `challenges`, if it is one
/// (and verifies), from server `server` if given.
pub fn reply_to(
    bytes: &[u8],
    sealer: &Sealer,
    challenges: &[[u8; CHALLENGE_LEN]],
    server: Option<u16>,
) -> Option<Session> {
    if !sealer.verifies(bytes) {
        return None;
    }
    let FrameRepr { eth, msg: Message::Control(c), .. } = FrameRepr::parse_bytes(bytes).ok()? else { return None };
    if c.op != ControlOp::HelloReply || server.is_some_and(|s| s != c.route.server) {
        return None;
    }
    let body = HelloReplyBody::parse(c.payload)?;
    if !challenges.contains(&body.challenge) {
        return None;
    }
    Some(Session { server: c.route.server, mac: eth.src, epoch: body.epoch.get(), id: body.session.get() })
}

/// The Register that starts using `session`.
pub fn register_frame(from: MacAddr, route: Route, session: &Session) -> FrameRepr<'static> {
    let route = Route { server: session.server, ..route };
    let mut repr = FrameRepr::new(
        EthernetRepr { dst: session.mac, src: from },
        Message::Control(ControlMsg { route, seq: Seq::new(session.id, 0).0, op: ControlOp::Register, payload: &[] }),
    );
    repr.epoch = session.epoch32();
    repr
}

/// Broadcast a sealed Hello as `route` every 100 ms until a server (`server`,
/// if given) answers or `timeout` passes; then Register. Returns the
/// session, or `None`. Frames that are not the answer are dropped.
pub fn open_session(
    t: &mut (impl Transport + ?Sized),
    route: Route,
    server: Option<u16>,
    sealer: &Sealer,
    timeout: Duration,
) -> Result<Option<Session>, TransportError> {
    let end = Instant::now() + timeout;
    let mut batch = FrameBatch::new();
    let mut sent = Vec::new();
    while Instant::now() < end {
        let c = challenge();
        debug_assert_eq!(HelloBody::parse(&c).map(|h| h.challenge), Some(c));
        sent.push(c);
        sealer.push(&mut batch, &hello_frame(t.mac(), route, &c));
        t.send(&mut batch)?;
        let retry = (Instant::now() + Duration::from_millis(100)).min(end);
        let mut found = None;
        while found.is_none() && Instant::now() < retry {
            t.recv(16, &mut |f| {
                if found.is_none() {
                    found = reply_to(f, sealer, &sent, server);
                }
            })?;
        }
        if let Some(session) = found {
            sealer.push(&mut batch, &register_frame(t.mac(), route, &session));
            t.send(&mut batch)?;
            return Ok(Some(session));
        }
    }
    Ok(None)
}
