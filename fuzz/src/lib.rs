//! Shared pieces of the fuzz targets (fuzz_targets/*.rs); docs/fuzzing.md says what each
//! target checks.

pub mod tarfmt;
pub mod unpack;

/// Deterministic chunk lengths from a seed: mostly small, sometimes across a block boundary,
/// never zero.
pub fn chunks(data: &[u8], seed: u64) -> Vec<&[u8]> {
    let mut x = seed | 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = match x % 4 {
            0 => 1 + (x >> 8) as usize % 8,
            1 => 1 + (x >> 8) as usize % 600,
            2 => 512 - (x >> 8) as usize % 3,
            _ => 1 + (x >> 8) as usize % 5000,
        };
        let (head, tail) = rest.split_at(len.min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}
