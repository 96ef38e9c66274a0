//! Maglev tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016,
//! §3.4): each backend ranks the table's entries in an order of its own, derived from its address alone;
//! backends take turns claiming their next preferred free entry until the table is full. Every node builds
//! the same table from the same backends, whatever their ids or the order they came in, and a change of one
//! backend moves about 1/N of the entries.

use std::net::IpAddr;

/// Whether `n` is prime (table sizes must be, so every skip visits every entry).
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// `SplitMix64`'s finaliser: a fixed, well-mixed function of its input, the same on every node and build.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend's (offset, skip) in a table of `size` entries, from its address and port.
fn preference(addr: IpAddr, port: u16, size: usize) -> (usize, usize) {
    let folded = match addr {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        // Both halves of an IPv6 address count: pods of one node share the upper one.
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            mix(u64::try_from(bits >> 64).expect("64 bits"))
                ^ u64::try_from(bits & u128::from(u64::MAX)).expect("64 bits")
        }
    };
    let name = (folded << 16) | u64::from(port);
    let below = |v: u64, n: usize| usize::try_from(v % n as u64).expect("a remainder is below its divisor");
    (below(mix(name ^ 0x6f66_6673_6574), size), below(mix(name ^ 0x736b_6970), size - 1) + 1)
}

/// The table: for each of `size` entries, the index into `backends` of the backend it names. `size` must
/// be a prime larger than the number of backends; `backends` must not be empty. Backends are ranked by
/// address and port first, so the input's order does not matter.
#[must_use]
pub fn table(backends: &[(IpAddr, u16)], size: u32) -> Vec<usize> {
    assert!(!backends.is_empty() && is_prime(size), "a Maglev table needs backends and a prime size");
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|i| backends[*i]);
    let size_usize = size as usize;
    let prefs: Vec<(usize, usize)> =
        order.iter().map(|i| preference(backends[*i].0, backends[*i].1, size_usize)).collect();
    let mut entries = vec![usize::MAX; size_usize];
    let mut next = vec![0usize; order.len()];
    let mut filled = 0;
    'fill: loop {
        for (rank, &backend) in order.iter().enumerate() {
            let (offset, skip) = prefs[rank];
            let mut slot = (offset + next[rank] * skip) % size_usize;
            while entries[slot] != usize::MAX {
                next[rank] += 1;
                slot = (offset + next[rank] * skip) % size_usize;
            }
            entries[slot] = backend;
            next[rank] += 1;
            filled += 1;
            if filled == size_usize {
                break 'fill;
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: u8) -> Vec<(IpAddr, u16)> {
        (1..=n).map(|i| (Ipv4Addr::new(10, 200, 1, i).into(), 8080)).collect()
    }

    fn names(t: &[usize], b: &[(IpAddr, u16)]) -> Vec<(IpAddr, u16)> {
        t.iter().map(|i| b[*i]).collect()
    }

    #[test]
    fn sizes_must_be_prime() {
        assert!(is_prime(16_381) && is_prime(65_521) && is_prime(2) && is_prime(251));
        assert!(!is_prime(16_384) && !is_prime(1) && !is_prime(0) && !is_prime(65_535));
    }

    #[test]
    fn every_entry_is_filled_and_the_load_is_even() {
        for n in [1u8, 2, 3, 7, 10, 100] {
            let b = backends(n);
            let t = table(&b, 16_381);
            let mut counts = vec![0usize; b.len()];
            for i in &t {
                counts[*i] += 1;
            }
            let ideal = 16_381 / b.len();
            // The paper's bound: entries per backend differ by at most one turn's worth.
            assert!(counts.iter().all(|c| c.abs_diff(ideal) <= 1), "n={n}: {counts:?}");
        }
    }

    #[test]
    fn the_order_of_the_backends_does_not_matter() {
        let b = backends(5);
        let mut shuffled = b.clone();
        shuffled.reverse();
        shuffled.swap(0, 2);
        assert_eq!(names(&table(&b, 251), &b), names(&table(&shuffled, 251), &shuffled));
    }

    /// Removing one of N backends moves that backend's entries and few others; adding one takes about
    /// 1/(N+1) of the table, nearly all of it from the others' share.
    #[test]
    fn a_change_of_one_backend_moves_about_one_nth() {
        for n in [4u8, 10, 50] {
            let b = backends(n);
            let before = names(&table(&b, 16_381), &b);
            let fewer: Vec<_> = b[..b.len() - 1].to_vec();
            let after = names(&table(&fewer, 16_381), &fewer);
            let gone = *b.last().unwrap();
            let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
            let of_gone = before.iter().filter(|x| **x == gone).count();
            let extra = moved - of_gone;
            assert!(extra * 100 <= 16_381 * 3, "n={n}: {extra} entries of staying backends moved");
            assert!(before.iter().zip(&after).all(|(x, y)| *x != gone || y != &gone));

            let more: Vec<_> = b.iter().copied().chain([(Ipv4Addr::new(10, 200, 2, 1).into(), 8080)]).collect();
            let grown = names(&table(&more, 16_381), &more);
            let taken = before.iter().zip(&grown).filter(|(x, y)| x != y).count();
            let share = 16_381 / (usize::from(n) + 1);
            assert!(taken.abs_diff(share) * 100 <= 16_381 * 3, "n={n}: adding took {taken}, ideal {share}");
        }
    }
}
