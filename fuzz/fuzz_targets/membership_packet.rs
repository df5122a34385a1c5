//! Fuzzes the gossip datagram path: the envelope, every message decoder, the foca codec and
//! the engine that consumes them, with the cluster tag taken from the input so every kind is
//! reachable.
#![no_main]

use std::time::Duration;

use foca::Codec as _;
use libfuzzer_sys::fuzz_target;
use membership::{Config, Engine, NodeId, Role, wire};

fuzz_target!(|data: &[u8]| {
    let tag = data
        .get(4..12)
        .map_or(0, |t| u64::from_be_bytes(t.try_into().expect("8 bytes")));
    if let Ok((_, payload)) = wire::split_header(data, tag) {
        let _ = wire::decode_list(payload, 64);
        let _ = wire::decode_pull(payload);
        let _ = wire::decode_leave(payload);
        let mut codec = wire::Codec;
        let mut buf = payload;
        if codec.decode_header(&mut buf).is_ok() {
            for _ in 0..64 {
                if codec.decode_member(&mut buf).is_err() {
                    break;
                }
            }
        }
    }
    let me = NodeId::new(
        "127.0.0.1:10081".parse().expect("addr"),
        uuid_from(data),
        1,
        Role::Worker,
    );
    let mut cfg = Config::lan();
    cfg.max_members = 64;
    let mut engine = Engine::new(me, tag, cfg, 7, Duration::ZERO);
    let from = "127.0.0.2:10081".parse().expect("addr");
    engine.handle_datagram(from, data, Duration::from_millis(10));
    engine.tick(Duration::from_secs(2));
    let _ = engine.drain_outputs();
    let _ = engine.drain_changes();
});

fn uuid_from(data: &[u8]) -> uuid::Uuid {
    let mut b = [1u8; 16];
    for (d, s) in b.iter_mut().zip(data.iter().rev()) {
        *d = *s;
    }
    uuid::Uuid::from_bytes(b)
}
