//! The guest-agent protocol decoder (`smolvm::agent::protocol`) on arbitrary bytes, as both
//! peers see them: the agent decoding requests, the host decoding what a (possibly hostile)
//! guest sends. The input is a byte stream cut into frames with `split_frame`; each frame is
//! decoded as a request and as a response. Checks:
//! - no panic, and `read_frame` over the same stream yields the same frames and the same
//!   error as `split_frame` (a short stream ends in `UnexpectedEof` or a clean end);
//! - every decoded message re-encodes to exactly the frame it came from (the encoding is
//!   canonical) and decodes again to an equal message;
//! - a decoded exec request passes `ExecRequest::validate`; data payloads respect `MAX_CHUNK`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm::agent::protocol::{
    decode_request, decode_response, read_frame, split_frame, ReadFrameError, Request, MAX_CHUNK,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut reader = data;
    let mut buf = Vec::new();
    loop {
        let split = split_frame(rest);
        let read = read_frame(&mut reader, &mut buf);
        let (t, payload, used) = match (split, read) {
            (Ok(Some((t, p, used))), Ok(Some(rt))) => {
                assert_eq!(t, rt);
                assert_eq!(p, &buf[..]);
                (t, p, used)
            }
            (Ok(None), Ok(None)) => {
                assert!(rest.is_empty());
                break;
            }
            (Ok(None), Err(ReadFrameError::Io(e))) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                break;
            }
            (Err(a), Err(ReadFrameError::Decode(b))) => {
                assert_eq!(a, b);
                break;
            }
            (s, r) => panic!("split_frame {s:?} but read_frame {r:?}"),
        };
        let frame = &rest[..used];
        if let Ok(req) = decode_request(t, payload) {
            if let Request::Exec(e) = &req {
                e.validate().expect("a decoded exec request must be valid");
            }
            if let Request::Data(d) = &req {
                assert!(d.len() <= MAX_CHUNK);
            }
            let mut w = Vec::new();
            req.encode(&mut w);
            assert_eq!(w, frame, "request encoding is not canonical");
            assert_eq!(decode_request(t, payload).unwrap(), req);
        }
        if let Ok(resp) = decode_response(t, payload) {
            let mut w = Vec::new();
            resp.encode(&mut w);
            assert_eq!(w, frame, "response encoding is not canonical");
            assert_eq!(decode_response(t, payload).unwrap(), resp);
        }
        rest = &rest[used..];
    }
});
