//! Feeds arbitrary bytes to the host's decoder of guest frames: it must never panic,
//! hang or allocate beyond the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_protocol::{decode, read_frame, GuestMessage, HostMessage};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<GuestMessage>(data);
    let _ = decode::<HostMessage>(data);
    let mut r = data;
    while let Ok(Some(_)) = read_frame::<_, GuestMessage>(&mut r) {}
});
