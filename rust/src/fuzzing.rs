//! Contracts of the crate's parsers and byte scanners, checked over arbitrary input: by the
//! cargo-fuzz targets in fuzz/ (feature `fuzzing`, nightly or RUSTC_BOOTSTRAP=1, never in
//! CI) and by a short pseudo-random run in `cargo test` (stable, in CI). Each function
//! panics on a broken contract.
//!
//! What takes input vmstore does not control: /proc/self/mountinfo (its mount points are
//! whatever paths an administrator or a FUSE filesystem chose), and the bytes of every
//! download, whose zero blocks the writer leaves as holes.

use std::path::Path;

use crate::fsinfo::{mount_fstype, unescape};
use crate::writer::{is_all_zero, nonzero_runs, ZERO_BLOCK};

/// `data`: the first line is a path, the rest a mountinfo text.
pub fn mountinfo(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (path, table) = text.split_once('\n').unwrap_or(("/", &text));
    if let Some(fstype) = mount_fstype(table, Path::new(path)) {
        // The answer is the fstype field of a line whose mount point holds the path.
        let holder = table.lines().any(|line| {
            let Some((left, right)) = line.split_once(" - ") else { return false };
            right.split(' ').next() == Some(fstype.as_str())
                && left.split(' ').nth(4).is_some_and(|mount| Path::new(path).starts_with(unescape(mount)))
        });
        assert!(holder, "{fstype:?} for {path:?} is no line's answer");
    }
    // Escaping what mountinfo escapes and unescaping gives the text back.
    let mut escaped = String::new();
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => escaped.push_str(&format!("\\{:03o}", c as u32)),
            other => escaped.push(other),
        }
    }
    assert_eq!(unescape(&escaped), path);
}

/// `data`: 4 bytes of file offset (in 1..2^32), the rest a chunk written there.
pub fn zero_runs(data: &[u8]) {
    let Some((head, chunk)) = data.split_first_chunk::<4>() else { return };
    let offset = u64::from(u32::from_le_bytes(*head));
    assert_eq!(is_all_zero(chunk), chunk.iter().all(|&b| b == 0));
    let runs = nonzero_runs(chunk, offset);
    let mut covered = vec![false; chunk.len()];
    let mut previous_end = None;
    for &(start, end) in &runs {
        assert!(start < end && end <= chunk.len(), "{runs:?}");
        assert!(previous_end.is_none_or(|p| p < start), "runs overlap or touch: {runs:?}");
        let at = |i: usize| offset + i as u64;
        assert!(start == 0 || at(start).is_multiple_of(ZERO_BLOCK), "{runs:?}");
        assert!(end == chunk.len() || at(end).is_multiple_of(ZERO_BLOCK), "{runs:?}");
        covered[start..end].iter_mut().for_each(|c| *c = true);
        previous_end = Some(end);
    }
    // Nothing non-zero is skipped, and every skipped block really is zeros.
    for (i, &b) in chunk.iter().enumerate() {
        assert!(covered[i] || b == 0, "non-zero byte {i} outside {runs:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: reproducible inputs without a crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    #[test]
    fn mountinfo_contract_holds_on_pseudo_random_tables() {
        let pieces =
            ["/", "/mnt", "/mnt/a b", "\\040", "\\134", "\\", " - ", " ", "fuse.x", "ext4", "\n", "7", "é", "\\7"];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let mut text = String::from(rng.pick(&["/", "/mnt/a b/x", "/mnt", "rel", ""]));
            text.push('\n');
            for _ in 0..(rng.next() % 4) {
                text.push_str("36 35 98:0 / ");
                for _ in 0..(rng.next() % 4) {
                    text.push_str(rng.pick(&pieces));
                }
                text.push_str(rng.pick(&[" rw - ", " - ", " rw "]));
                text.push_str(rng.pick(&pieces));
                text.push_str(" src rw\n");
            }
            mountinfo(text.as_bytes());
        }
        mountinfo(b"/mnt/gluster vol/a\n40 22 0:50 / /mnt/gluster\\040vol rw - fuse.glusterfs srv:/vol rw\n");
    }

    #[test]
    fn zero_runs_contract_holds_on_pseudo_random_chunks() {
        let mut rng = Rng(42);
        for _ in 0..3_000 {
            let len = (rng.next() % 20_000) as usize;
            let mut data = (rng.next() as u32 % (1 << 20)).to_le_bytes().to_vec();
            let density = rng.next() % 4;
            data.extend((0..len).map(|_| if rng.next() % 4096 < density { rng.next() as u8 | 1 } else { 0 }));
            zero_runs(&data);
        }
    }
}
