//! Fills memory with a pattern and checks it back: run under a memory limit smaller than what it
//! fills, it makes the kernel swap its pages out and in again, so a correct result means the swap
//! device returned every page as written. `ram-dl`'s tests (on the host and in the test VM) run
//! it in a memory cgroup.
//!
//! `swap-check MIB [ROUNDS]`: fills MIB MiB of anonymous memory, then reads it all back ROUNDS
//! times (2 by default), each page checked against the pattern. Prints how much of it was swapped
//! out after the fill (`VmSwap`) and `swap-check: OK`, or says which page was wrong and exits 1.

use std::process::ExitCode;

const PAGE: usize = 4096;

/// Fills `page_words` with what page `page` holds: a value of its own in every word, and the
/// page number with the word's index at both ends and in the middle, so a page returned at the
/// wrong place, a torn page or a page of zeroes shows. (Slice fills and comparisons run at
/// memory speed even in a debug build, which the test VM's software emulation needs.)
fn expect(page_words: &mut [u64], page: usize) {
    let tag = (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5DEE_CE66_D1CE_B00C;
    page_words.fill(tag);
    let last = page_words.len() - 1;
    for i in [0, last / 2, last] {
        page_words[i] = tag ^ (i as u64) << 48 ^ 1;
    }
}

fn vm_swap_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmSwap:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mib), rounds) = (
        args.get(1).and_then(|a| a.parse::<usize>().ok()),
        args.get(2).and_then(|a| a.parse::<usize>().ok()).unwrap_or(2),
    ) else {
        eprintln!("usage: swap-check MIB [ROUNDS]");
        return ExitCode::from(2);
    };
    let pages = mib * 1024 * 1024 / PAGE;
    let words = PAGE / 8;
    let mut mem: Vec<u64> = Vec::with_capacity(pages * words);
    let mut expected = vec![0u64; words];
    for page in 0..pages {
        expect(&mut expected, page);
        mem.extend_from_slice(&expected);
    }
    println!("swap-check: filled {mib} MiB; swapped out: {} KiB", vm_swap_kib());
    let mut peak = vm_swap_kib();
    for round in 0..rounds {
        for page in 0..pages {
            let got = &mem[page * words..(page + 1) * words];
            expect(&mut expected, page);
            if got != expected.as_slice() {
                let i = (0..words).find(|&i| got[i] != expected[i]).unwrap_or(0);
                eprintln!(
                    "swap-check: round {round}: page {page} word {i} is {:#018x}, not {:#018x}",
                    got[i], expected[i]
                );
                return ExitCode::FAILURE;
            }
        }
        peak = peak.max(vm_swap_kib());
    }
    println!("swap-check: peak swapped out: {peak} KiB");
    println!("swap-check: OK ({rounds} rounds over {pages} pages)");
    ExitCode::SUCCESS
}
