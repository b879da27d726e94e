//! Compression of checkpoint archives on the wire (`--transfer-zstd-level`), with the zstd
//! streaming codec the agents use: for each archive and level, the size ratio, compression and
//! decompression MiB/s on one core (CPU seconds per GiB beside them), and what a transfer would
//! reach on links of 1 and 10 Gbit/s: the slowest of compressing, the link carrying the
//! compressed bytes, and decompressing (a pipeline), against the link alone uncompressed.
//!
//!   scripts/bench-compression.sh   (makes a real CRIU memory image first, runs this on it)
//!   KM_BENCH_ARCHIVES=a.tar,b.tar cargo bench --bench compression
//!
//! KM_BENCH_ARCHIVES (default: a generated archive of incompressible pages, 64 MiB);
//! KM_BENCH_ZSTD_LEVELS (default 1,3); KM_BENCH_RUNS (default 3, the best of each is kept).

#[path = "common/mod.rs"]
mod common;

use std::{io::Read, time::Instant};

use common::{cpu_seconds, load_average};

const MIB: f64 = (1 << 20) as f64;
/// 1 and 10 Gbit/s in MiB/s of payload.
const LINKS: [(&str, f64); 2] = [("1 Gbit/s", 119.2), ("10 Gbit/s", 1192.1)];

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse().ok().unwrap_or_else(|| panic!("{name}: {s:?}")))
        .collect()
}

/// Wall and CPU seconds of `f`, best of `runs`.
fn best<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, f64, T) {
    let mut out = None;
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    for _ in 0..runs {
        let (c0, t0) = (cpu_seconds(std::process::id()), Instant::now());
        let value = f();
        wall = wall.min(t0.elapsed().as_secs_f64());
        cpu = cpu.min(cpu_seconds(std::process::id()) - c0);
        out = Some(value);
    }
    (wall, cpu, out.unwrap())
}

fn main() {
    let runs: usize = env_list("KM_BENCH_RUNS", "3")[0];
    let levels: Vec<i32> = env_list("KM_BENCH_ZSTD_LEVELS", "1,3");
    let archives: Vec<String> = env_list("KM_BENCH_ARCHIVES", "");
    let mut inputs: Vec<(String, Vec<u8>)> = archives
        .iter()
        .map(|path| {
            let mut bytes = Vec::new();
            std::fs::File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
            (path.rsplit('/').next().unwrap().to_string(), bytes)
        })
        .collect();
    if inputs.is_empty() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise = (0..64 << 17)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        inputs.push(("incompressible pages".into(), noise));
    }
    println!(
        "zstd {}; {runs} run(s), best kept; load average {}",
        zstd::zstd_safe::version_string(),
        load_average()
    );
    print!("\n| archive | size | level | ratio | compress MiB/s (CPU s/GiB) | decompress MiB/s (CPU s/GiB) |");
    for (link, _) in LINKS {
        print!(" {link}: zstd / plain |");
    }
    println!(
        "\n| --- | ---: | ---: | ---: | ---: | ---: |{}",
        " ---: |".repeat(LINKS.len())
    );
    for (name, input) in &inputs {
        let mib = input.len() as f64 / MIB;
        for &level in &levels {
            let (c_wall, c_cpu, packed) = best(runs, || {
                let mut out = Vec::with_capacity(input.len() / 2);
                zstd::stream::copy_encode(&input[..], &mut out, level).unwrap();
                out
            });
            let (d_wall, d_cpu, unpacked) = best(runs, || {
                let mut out = Vec::with_capacity(input.len());
                zstd::stream::copy_decode(&packed[..], &mut out).unwrap();
                out
            });
            assert!(unpacked == *input, "zstd round trip of {name}");
            let ratio = input.len() as f64 / packed.len() as f64;
            let (c_rate, d_rate) = (mib / c_wall, mib / d_wall);
            let per_gib = |cpu: f64| cpu * 1024.0 / mib;
            print!(
                "| {name} | {mib:.1} MiB | {level} | {ratio:.2} | {c_rate:.0} ({:.2}) | {d_rate:.0} ({:.2}) |",
                per_gib(c_cpu),
                per_gib(d_cpu)
            );
            for (_, link) in LINKS {
                let zstd = c_rate.min(d_rate).min(link * ratio);
                print!(" {zstd:.0} / {link:.0} MiB/s |");
            }
            println!();
        }
    }
}
