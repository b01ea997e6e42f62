//! Feeds arbitrary bytes to the host's decoder of guest frames: it must never panic,
//! hang or allocate beyond the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_protocol::{
    decode, read_frame, ApiHello, ApiHelloReply, ApiReply, ApiRequest, GuestMessage, HostMessage,
};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<GuestMessage>(data);
    let _ = decode::<HostMessage>(data);
    // The supervisor API's frames (a client and a supervisor of different builds meet here).
    let _ = decode::<ApiRequest>(data);
    let _ = decode::<ApiReply>(data);
    let _ = decode::<ApiHello>(data);
    let _ = decode::<ApiHelloReply>(data);
    let mut r = data;
    while let Ok(Some(_)) = read_frame::<_, GuestMessage>(&mut r) {}
});
