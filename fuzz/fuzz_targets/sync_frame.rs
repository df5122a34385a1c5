//! Fuzzes the stream path: the sync, list and leave decoders and the engine's handling of a
//! frame that arrived over TCP, where no datagram size cap applies.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use membership::{Config, Engine, NodeId, Role, wire};

fuzz_target!(|data: &[u8]| {
    let tag = data
        .get(4..12)
        .map_or(0, |t| u64::from_be_bytes(t.try_into().expect("8 bytes")));
    if let Ok((_, payload)) = wire::split_header(data, tag) {
        let _ = wire::decode_sync(payload, 64);
    }
    let me = NodeId::new(
        "127.0.0.1:10081".parse().expect("addr"),
        uuid::Uuid::from_u128(1),
        1,
        Role::Scheduler,
    );
    let mut cfg = Config::lan();
    cfg.max_members = 64;
    let mut engine = Engine::new(me, tag, cfg, 11, Duration::ZERO);
    let from = "127.0.0.2:10081".parse().expect("addr");
    engine.handle_stream(from, data, Duration::from_millis(10));
    engine.tick(Duration::from_secs(2));
    let _ = engine.drain_outputs();
    let _ = engine.drain_changes();
});
