//! Sessions between a client platform and a server, and the sequence
//! numbers that live in them.
//!
//! A client opens a session with each server it uses: a Hello carrying a
//! fresh random challenge ([`HelloBody`]); the server answers with the
//! challenge, its epoch (random, drawn when it starts) and the id of a
//! session it offers ([`HelloReplyBody`]). Both frames are sealed with the
//! client's key, so the answer is fresh (it names the challenge) and
//! genuine. The session is in force at the server once the client's first
//! request in it arrives: a replayed Hello only makes the server offer a
//! session nobody can use, and never wipes what the server remembers.
//!
//! A sequence number ([`Seq`]) is the session id in its high 32 bits and a
//! counter in its low 32. A stream — requests of (client platform, VM,
//! vCPU, device), interrupts of (client platform, VM) — starts at counter 0
//! of the session in force, and its receiver takes only the number after
//! the last one it took (the last one again is a retransmission, answered
//! from its cache); a stream keeps the session it started in until it
//! starts again. A server takes a stream's start only in a session it
//! offered in this life, from a frame naming its epoch (header field
//! `epoch`); session ids count up from a random start the server draws when
//! it starts, so none is offered twice in one life, and a frame recorded in
//! an earlier session or an earlier life is never taken again.

use zerocopy::byteorder::network_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of a client's challenge.
pub const CHALLENGE_LEN: usize = 16;

/// A sequence number: session id and counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(pub u64);

impl Seq {
    pub const fn new(session: u32, counter: u32) -> Seq {
        Seq(((session as u64) << 32) | counter as u64)
    }

    pub const fn session(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub const fn counter(self) -> u32 {
        self.0 as u32
    }

    /// The number after this one in the same session (the counter wraps
    /// after 2^32 frames: a stream that long starts a new session first).
    pub const fn next(self) -> Seq {
        Seq::new(self.session(), self.counter().wrapping_add(1))
    }
}

/// Payload of a Hello.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct HelloBody {
    /// Fresh random bytes the answer must carry back.
    pub challenge: [u8; CHALLENGE_LEN],
}

/// Payload of a HelloReply.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct HelloReplyBody {
    /// The Hello's challenge.
    pub challenge: [u8; CHALLENGE_LEN],
    /// The server's epoch: random, drawn when it starts. A client that sees
    /// it change knows the server restarted (its device models are new).
    pub epoch: U64,
    /// The session the server offers.
    pub session: U32,
}

impl HelloBody {
    /// The bytes of the payload.
    pub fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }

    /// The body of `payload`, if it is exactly one.
    pub fn parse(payload: &[u8]) -> Option<HelloBody> {
        HelloBody::read_from_bytes(payload).ok()
    }
}

impl HelloReplyBody {
    pub fn new(challenge: [u8; CHALLENGE_LEN], epoch: u64, session: u32) -> HelloReplyBody {
        HelloReplyBody { challenge, epoch: U64::new(epoch), session: U32::new(session) }
    }

    /// The bytes of the payload.
    pub fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }

    /// The body of `payload`, if it is exactly one.
    pub fn parse(payload: &[u8]) -> Option<HelloReplyBody> {
        HelloReplyBody::read_from_bytes(payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seq_is_a_session_and_a_counter() {
        let s = Seq::new(0xdead_beef, u32::MAX);
        assert_eq!((s.session(), s.counter()), (0xdead_beef, u32::MAX));
        assert_eq!(s.next(), Seq::new(0xdead_beef, 0), "the counter wraps inside the session");
        assert_eq!(Seq::new(1, 2).0, (1 << 32) | 2);
    }

    #[test]
    fn bodies_parse_only_at_their_exact_length() {
        let r = HelloReplyBody::new([7; CHALLENGE_LEN], 42, 9);
        let bytes = r.as_bytes();
        assert_eq!(bytes.len(), 28);
        assert_eq!(HelloReplyBody::parse(bytes), Some(r));
        assert_eq!(HelloReplyBody::parse(&bytes[1..]), None);
        assert_eq!(HelloBody::parse(&[1; CHALLENGE_LEN]).map(|h| h.challenge), Some([1; CHALLENGE_LEN]));
        assert_eq!(HelloBody::parse(&[1; CHALLENGE_LEN + 1]), None);
    }
}
