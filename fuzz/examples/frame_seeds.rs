//! Writes the seeds of the receive-path and config targets into
//! `corpus/<target>/`: real frames of each kind as a client and a server
//! send them (in the targets' input format: a length byte whose low bit asks
//! the target to seal the frame, then the frame), and the example configs.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example frame_seeds -- fuzz/corpus

use std::path::{Path, PathBuf};

use dmfabric_wire::session::{HelloBody, HelloReplyBody, Seq, CHALLENGE_LEN};
use dmfabric_wire::{
    AccessSize, ControlMsg, ControlOp, Direction, EthernetRepr, FrameRepr, Interrupt, InterruptAck, IoCompletion,
    IoRequest, IrqSource, Kind, MacAddr, Message, Nack, NackReason, Route, Space, Status, Trigger, LIFECYCLE_RESET,
};

const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);
/// The session both targets start with.
const SESSION: u32 = 0x100;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    server_rx(&out.join("server_rx"));
    client_rx(&out.join("client_rx"));
    configs(&out);
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("the corpus directory");
    std::fs::write(dir.join(name), bytes).expect("a seed written");
}

/// `msgs` in the targets' input format, each to be sealed by the target.
fn input(dst: MacAddr, src: MacAddr, msgs: &[Message<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let repr = FrameRepr::new(EthernetRepr { dst, src }, *m);
        let mut buf = vec![0u8; repr.buffer_len()];
        let n = repr.emit(&mut buf).expect("a frame");
        out.push(((n as u8) << 1) | 1);
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn route(device: u32) -> Route {
    Route { server: 1, hypervisor: 1, client: 3, vm: 7, vcpu: 0, device }
}

fn request(device: u32, n: u32, dir: Direction, addr: u64, data: u64) -> Message<'static> {
    Message::IoRequest(IoRequest {
        route: route(device),
        seq: Seq::new(SESSION, n).0,
        space: Space::Pio,
        dir,
        size: AccessSize::B1,
        addr,
        data,
    })
}

fn server_rx(dir: &Path) {
    let w = |n, addr, data| request(1, n, Direction::Write, addr, data);
    put(dir, "regfile_write_read", &input(SERVER, CLIENT, &[w(0, 0x500, 7), request(1, 1, Direction::Read, 0x500, 0)]));
    put(dir, "by_address", &input(SERVER, CLIENT, &[request(0, 0, Direction::Write, 0x3f8, 0x41)]));
    put(
        dir,
        "uart_rtc_timer",
        &input(
            SERVER,
            CLIENT,
            &[
                request(7001, 0, Direction::Write, 0x3f9, 0x0f),
                request(7002, 0, Direction::Write, 0x70, 0x0b),
                request(7004, 0, Direction::Write, 0x700, 1),
            ],
        ),
    );
    put(
        dir,
        "irqtest_and_ack",
        &input(
            SERVER,
            CLIENT,
            &[
                request(101, 0, Direction::Write, 0x600, 1),
                Message::InterruptAck(InterruptAck { route: route(101), seq: Seq::new(SESSION, 0).0 }),
            ],
        ),
    );
    let body = HelloBody { challenge: [9; CHALLENGE_LEN] };
    let hello = Message::Control(ControlMsg { route: route(0), seq: 0, op: ControlOp::Hello, payload: body.bytes() });
    let register = Message::Control(ControlMsg {
        route: route(0),
        seq: Seq::new(SESSION + 1, 0).0,
        op: ControlOp::Register,
        payload: &[],
    });
    put(dir, "hello_register", &input(SERVER, CLIENT, &[hello, register]));
    put(
        dir,
        "retransmit_and_replay",
        &input(SERVER, CLIENT, &[w(0, 0x500, 1), w(0, 0x500, 1), w(1, 0x500, 2), w(0, 0x500, 1)]),
    );
}

fn client_rx(dir: &Path) {
    let irq = |n, trigger| {
        Message::Interrupt(Interrupt {
            route: route(1),
            seq: Seq::new(SESSION, n).0,
            source: IrqSource::Line(5),
            trigger,
        })
    };
    put(
        dir,
        "interrupts",
        &input(
            CLIENT,
            SERVER,
            &[irq(0, Trigger::Edge), irq(1, Trigger::Level { asserted: true }), irq(1, Trigger::Edge)],
        ),
    );
    let reset = [LIFECYCLE_RESET];
    let lifecycle = Message::Control(ControlMsg {
        route: route(1),
        seq: Seq::new(SESSION, 0).0,
        op: ControlOp::Lifecycle,
        payload: &reset,
    });
    put(dir, "reset", &input(CLIENT, SERVER, &[lifecycle]));
    let completion = Message::IoCompletion(IoCompletion {
        route: route(1),
        seq: Seq::new(SESSION, 0).0,
        space: Space::Pio,
        dir: Direction::Read,
        size: AccessSize::B1,
        addr: 0x500,
        data: 7,
        status: Status::Ok,
    });
    let nack = Message::Nack(Nack { route: route(1), seq: 1, reason: NackReason::NoSession, nacked: Kind::IoRequest });
    put(dir, "completion_nack", &input(CLIENT, SERVER, &[completion, nack]));
    let body = HelloReplyBody::new([0; CHALLENGE_LEN], 0x5151_5152, 0);
    let announce =
        Message::Control(ControlMsg { route: route(0), seq: 0, op: ControlOp::HelloReply, payload: body.bytes() });
    put(dir, "announce", &input(CLIENT, SERVER, &[announce]));
}

fn configs(out: &Path) {
    put(&out.join("server_config"), "example", dmfabric::server_config::EXAMPLE.as_bytes());
    put(
        &out.join("server_config"),
        "clients_only",
        b"[[client]]\nid = 3\nmac = \"02:00:00:00:00:03\"\nkey_file = \"k\"\nvms = [{ id = 1, vcpus = 2 }]\n",
    );
    put(&out.join("client_config"), "example", dmfabric::client::EXAMPLE.as_bytes());
    put(&out.join("client_config"), "pc_remote", b"client = 3\nkey_file = \"k\"\n[link]\niface = \"dmf0\"\n[[vm]]\nid = 1\nmemory_mib = 512\nkernel = \"/nonexistent\"\npc = \"remote\"\n");
}
