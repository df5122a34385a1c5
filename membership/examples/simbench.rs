//! Prints the simulator's figures for a few cluster sizes; `cargo xtask bench` runs the same.
use std::time::{Duration, Instant};

use membership::sim::scenarios;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    for n in sizes {
        let t = Instant::now();
        let c = scenarios::converge(n, 1);
        let d = scenarios::detect(n, 2);
        let b = scenarios::bytes_per_second(n, 3, Duration::from_secs(30));
        println!(
            "n={n} converge={c:?} detect={d:?} bytes_per_s={b:?} (wall {:.1}s)",
            t.elapsed().as_secs_f64()
        );
    }
}
