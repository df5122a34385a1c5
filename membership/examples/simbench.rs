//! Prints the simulator's figures for a few cluster sizes; `cargo xtask bench` runs the same.
//! With `--traffic`, also what a member sends per second, by message kind; with `--seeds K`,
//! the detection time over K seeds as well (the figure above is one seed's).
use std::time::{Duration, Instant};

use membership::sim::scenarios;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let breakdown = args.iter().any(|a| a == "--traffic");
    let seeds: u64 = args
        .iter()
        .position(|a| a == "--seeds")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(0);
    let sizes: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || args[i - 1] != "--seeds")
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    let only_traffic = args.iter().any(|a| a == "--only-traffic");
    for n in sizes {
        if only_traffic {
            if let Some(k) = scenarios::traffic(n, 3, Duration::from_secs(30)) {
                for (kind, (m, p, w)) in &k {
                    println!("  {kind:<18} {m:>7.2} {p:>9.1} {w:>9.1}");
                }
            }
            continue;
        }
        let t = Instant::now();
        let c = scenarios::converge(n, 1);
        let d = scenarios::detect(n, 2);
        let b = scenarios::bytes_per_second(n, 3, Duration::from_secs(30));
        println!(
            "n={n} converge={c:?} detect={d:?} bytes_per_s={b:?} (wall {:.1}s)",
            t.elapsed().as_secs_f64()
        );
        if seeds > 0 {
            let ds: Vec<f64> = (10..10 + seeds)
                .filter_map(|s| scenarios::detect(n, s))
                .collect();
            let mean = ds.iter().sum::<f64>() / ds.len().max(1) as f64;
            let max = ds.iter().copied().fold(0.0, f64::max);
            println!(
                "  detect over {} seeds: mean {mean:.2} s, max {max:.2} s",
                ds.len()
            );
        }
        if breakdown && let Some(k) = scenarios::traffic(n, 3, Duration::from_secs(60)) {
            println!(
                "  {:<18} {:>7} {:>9} {:>9}",
                "kind", "msgs/s", "payload", "wire"
            );
            for (kind, (m, p, w)) in &k {
                println!("  {kind:<18} {m:>7.2} {p:>9.1} {w:>9.1}");
            }
        }
    }
}
