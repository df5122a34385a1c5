//! Fuzzes the key file parser: any text gives keys or an error that never echoes the input.
#![no_main]

use keyring::Keyring;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = Keyring::parse(&text, "fuzz") {
        let msg = e.to_string();
        let secret_like = |l: &&str| {
            l.len() >= 12
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        };
        for line in text.lines().map(str::trim).filter(secret_like) {
            assert!(!msg.contains(line), "the error echoed a line of the file");
        }
    }
});
