//! Fuzzes the multicast announcement decoder: any datagram decodes or is refused, and what
//! decodes encodes back to the same bytes.
#![no_main]

use discovery_multicast::Announcement;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = Announcement::decode(data) {
        let again = a.encode().expect("a decoded announcement encodes");
        assert_eq!(Announcement::decode(&again).expect("re-decodes"), a);
    }
});
