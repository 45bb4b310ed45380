//! The console socket's attach protocol, both sides: what a terminal sends
//! the server (`parse_request`, fed in the pieces the input's first byte
//! cuts it into, as reads deliver it) and what the server answers it
//! (`parse_answer`, as `dmfabric console` reads it). A decision, once made,
//! is the one the whole input gives; what the server writes, a terminal
//! reads back as meant.
#![no_main]

use dmfabric_dm_workers::console::{
    answer_error, answer_ok, parse_answer, parse_request, request_line, AnswerError, Request, MAX_ANSWER, MAX_REQUEST,
};
use libfuzzer_sys::fuzz_target;

/// A request without what was typed after it: what the server decides.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Attach { vm: u32, line: String },
    Invalid(String),
}

fn decision(r: Request<'_>) -> Option<Decision> {
    match r {
        Request::Incomplete => None,
        Request::Attach { vm, line, .. } => Some(Decision::Attach { vm, line }),
        Request::Invalid(why) => Some(Decision::Invalid(why)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    // The server's side, a read at a time.
    let piece = usize::from(cut % 64) + 1;
    let mut buf = Vec::new();
    let mut decided = None;
    for chunk in bytes.chunks(piece) {
        buf.extend_from_slice(chunk);
        match decision(parse_request(&buf)) {
            None => assert!(buf.len() <= MAX_REQUEST, "{} bytes held without a decision", buf.len()),
            some => {
                decided = some;
                break;
            }
        }
    }
    let whole = parse_request(bytes);
    if let Request::Attach { vm, line, typed } = &whole {
        assert!(bytes.ends_with(typed) && line.len() <= MAX_REQUEST);
        // The request a terminal sends for that VM is understood the same.
        let line = request_line(*vm);
        let again = parse_request(line.as_bytes());
        assert!(matches!(again, Request::Attach { vm: v, typed: b"", .. } if v == *vm), "{again:?}");
    }
    assert_eq!(decided, decision(whole), "a decision made early is the one all the bytes give");

    // The terminal's side: any answer line (as much of it as it reads).
    let vm = u32::from(cut);
    let answer = &bytes[..bytes.len().min(MAX_ANSWER)];
    match parse_answer(answer, vm) {
        Ok(()) => assert_eq!(answer, answer_ok(vm).as_bytes()),
        Err(AnswerError::Refused(why) | AnswerError::Unexpected(why)) => {
            assert!(!why.chars().any(char::is_control), "control characters reach the terminal: {why:?}")
        }
        Err(AnswerError::Closed) => assert!(answer.is_empty()),
    }
    // What the server says to a refused terminal, the terminal shows.
    let why = String::from_utf8_lossy(bytes);
    if !why.chars().any(char::is_control) {
        assert_eq!(parse_answer(answer_error(&why).as_bytes(), vm), Err(AnswerError::Refused(why.into_owned())));
    }
});
