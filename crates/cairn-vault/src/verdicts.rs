//! What verify found of each chunk it read: a compact set of good ones, the bad ones with why.
//!
//! Verify reads each chunk once however many points reference it, so it remembers every chunk
//! it read: ten million in a large vault. The good ones are kept as 16 bytes of their id in
//! 256 shards keyed by the id's first byte (a 136-bit key); each shard is a sorted array with
//! a small unsorted tail merged into it when it grows past an eighth of the array, so a
//! verdict costs 16 bytes plus growth slack (a hash set cost twice that). The bad ones, few,
//! are kept whole with their reason. Two chunks that share the 136 bits would let the second
//! go unread; with SHA-256 ids (keyed in an encrypted vault) that takes about 2^68 tries to
//! arrange on purpose.

use std::collections::BTreeMap;

use cairn_format::Digest;

/// One shard of good verdicts.
#[derive(Debug, Default)]
struct Shard {
    sorted: Vec<u128>,
    tail: Vec<u128>,
}

impl Shard {
    fn contains(&self, k: u128) -> bool {
        self.sorted.binary_search(&k).is_ok() || self.tail.contains(&k)
    }

    fn insert(&mut self, k: u128) {
        if self.contains(k) {
            return;
        }
        self.tail.push(k);
        if self.tail.len() >= 64.max(self.sorted.len() / 8) {
            self.merge();
        }
    }

    fn remove(&mut self, k: u128) {
        if let Ok(at) = self.sorted.binary_search(&k) {
            self.sorted.remove(at);
        }
        self.tail.retain(|t| *t != k);
    }

    /// Moves the tail into the sorted array, growing it by a quarter at a time.
    fn merge(&mut self) {
        let need = self.sorted.len() + self.tail.len();
        if need > self.sorted.capacity() {
            self.sorted.reserve_exact((need - self.sorted.len()).max(need / 4));
        }
        self.sorted.append(&mut self.tail);
        self.sorted.sort_unstable();
        self.sorted.dedup();
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Verdicts {
    good: Vec<Shard>,
    bad: BTreeMap<Digest, String>,
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts { good: (0..256).map(|_| Shard::default()).collect(), bad: BTreeMap::new() }
    }
}

fn key(id: &Digest) -> (usize, u128) {
    let mut b = [0u8; 16];
    b.copy_from_slice(&id.0[1..17]);
    (usize::from(id.0[0]), u128::from_le_bytes(b))
}

impl Verdicts {
    /// True if chunk `id` was read (good or bad).
    pub(crate) fn known(&self, id: &Digest) -> bool {
        self.good(id) || self.bad.contains_key(id)
    }

    /// True if chunk `id` was read and is good.
    pub(crate) fn good(&self, id: &Digest) -> bool {
        let (shard, k) = key(id);
        self.good[shard].contains(k)
    }

    /// True if chunk `id` was read and is bad.
    pub(crate) fn bad(&self, id: &Digest) -> bool {
        self.bad.contains_key(id)
    }

    /// Records what reading `id` found: `None` good, or why it is bad (a bad verdict replaces
    /// a good one: a sound patch chunk that does not rebuild its block is bad).
    pub(crate) fn set(&mut self, id: Digest, verdict: Option<String>) {
        let (shard, k) = key(&id);
        match verdict {
            None => self.good[shard].insert(k),
            Some(reason) => {
                self.good[shard].remove(k);
                self.bad.insert(id, reason);
            }
        }
    }

    /// The bad chunks and why.
    pub(crate) fn into_bad(self) -> BTreeMap<Digest, String> {
        self.bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_verdict_replaces_a_good_one() {
        let mut v = Verdicts::default();
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        assert!(!v.known(&a));
        v.set(a, None);
        v.set(b, None);
        assert!(v.good(&a) && v.known(&a) && !v.bad(&a));
        v.set(a, Some("does not rebuild".into()));
        assert!(!v.good(&a) && v.bad(&a) && v.known(&a));
        assert!(v.good(&b));
        assert_eq!(v.into_bad().into_keys().collect::<Vec<_>>(), vec![a]);
    }

    proptest::proptest! {
        #[test]
        fn holds_exactly_what_was_set(ids in proptest::collection::vec(proptest::prelude::any::<[u8; 32]>(), 0..600), bad in proptest::collection::vec(0usize..600, 0..20)) {
            let mut v = Verdicts::default();
            // Few shards, so tails merge many times.
            let ids: Vec<Digest> = ids.into_iter().map(|mut b| { b[0] %= 3; Digest(b) }).collect();
            for id in &ids {
                v.set(*id, None);
            }
            let bad: Vec<Digest> = bad.into_iter().filter_map(|i| ids.get(i).copied()).collect();
            for id in &bad {
                v.set(*id, Some("bad".into()));
            }
            for id in &ids {
                proptest::prop_assert!(v.known(id));
                proptest::prop_assert_eq!(v.good(id), !bad.contains(id));
            }
            proptest::prop_assert!(!v.known(&Digest([9; 32])));
        }
    }
}
