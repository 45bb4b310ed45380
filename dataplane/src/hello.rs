//! Finding a server on the link: broadcast a Control Hello and take the
//! first HelloReply (from the wanted server id, if one is given). The Hello
//! carries the sender's route, so the server also learns that this client
//! (re)started and forgets its old streams.

use std::time::{Duration, Instant};

use dmfabric_wire::{ControlMsg, ControlOp, EthernetRepr, FrameRepr, MacAddr, Message, Route};

use crate::batch::FrameBatch;
use crate::transport::{Transport, TransportError};

/// Broadcast Hello as `route` every 100 ms until a server answers or
/// `timeout` passes. Returns the server's MAC and id, or `None`.
pub fn discover(
    t: &mut (impl Transport + ?Sized),
    route: Route,
    server: Option<u16>,
    timeout: Duration,
) -> Result<Option<(MacAddr, u16)>, TransportError> {
    let end = Instant::now() + timeout;
    let mut batch = FrameBatch::new();
    let mut seq = 0u64;
    while Instant::now() < end {
        seq += 1;
        let hello = FrameRepr::new(
            EthernetRepr { dst: MacAddr::BROADCAST, src: t.mac() },
            Message::Control(ControlMsg { route, seq, op: ControlOp::Hello, payload: &[] }),
        );
        batch.push_with(|buf| hello.emit(buf).ok());
        t.send(&mut batch)?;
        let retry = (Instant::now() + Duration::from_millis(100)).min(end);
        let mut found = None;
        while found.is_none() && Instant::now() < retry {
            t.recv(16, &mut |f| {
                if let Ok(FrameRepr { eth, msg: Message::Control(c), .. }) = FrameRepr::parse_bytes(f) {
                    if c.op == ControlOp::HelloReply && server.is_none_or(|s| s == c.route.server) {
                        found = Some((eth.src, c.route.server));
                    }
                }
            })?;
        }
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}
