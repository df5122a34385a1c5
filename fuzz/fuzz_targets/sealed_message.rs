//! Fuzzes opening sealed messages: arbitrary bytes must be refused without a panic, and a
//! message sealed from the input must open to the same bytes exactly once.
#![no_main]

use keyring::{Keyring, Sealer, SealerConfig};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fuzz_target!(|data: &[u8]| {
    let ring = Keyring::parse(KEY, "fuzz").expect("valid key");
    let s = Sealer::new(ring, SealerConfig::default());
    let now = 1_700_000_000_000;
    assert!(s.open_at(b"aad", data, now).is_err());
    let sealed = s.seal_at(b"aad", data, now);
    assert_eq!(s.open_at(b"aad", &sealed, now).expect("opens"), data);
    assert!(s.open_at(b"aad", &sealed, now).is_err(), "a replay opened");
});
