//! A map whose clones share their contents, for the snapshot and the state.
//!
//! The entries are spread over shards by hash; a clone shares every shard, and a
//! write copies only the shard it touches (and the list of shards). So a new
//! version of a map of 100,000 objects after one object changed costs a few dozen
//! entries, and [`CowMap::diff`] between two versions skips the shards they still
//! share: it grows with what differs, not with the map. Values sit behind an
//! `Arc`, so a copied shard copies pointers, and readers of an old version are
//! never disturbed by a writer.

use std::{
    borrow::Borrow,
    collections::BTreeMap,
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

/// Entries per shard before the shards double (up to [`MAX_SHARDS`]).
const PER_SHARD: usize = 32;
const MAX_SHARDS: usize = 4096;

type Shard<K, V> = Arc<BTreeMap<K, Arc<V>>>;

pub struct CowMap<K, V> {
    /// A power of two of them (none while empty).
    shards: Arc<Vec<Shard<K, V>>>,
    len: usize,
}

impl<K, V> Clone for CowMap<K, V> {
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
            len: self.len,
        }
    }
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        Self {
            shards: Arc::new(Vec::new()),
            len: 0,
        }
    }
}

/// `DefaultHasher::new()` has fixed keys: the same key lands in the same shard in
/// every map, so two versions' shards line up.
fn hash_of<Q: Hash + ?Sized>(key: &Q) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

impl<K, V> CowMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// In shard order, then key order within a shard: deterministic for a given
    /// history, but not sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.arcs().map(|(k, v)| (k, &**v))
    }

    pub fn arcs(&self) -> impl Iterator<Item = (&K, &Arc<V>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.arcs().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.arcs().map(|(_, v)| &**v)
    }

    /// Whether the two share all their contents (one is an unchanged clone of the
    /// other).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shards, &other.shards)
    }
}

impl<K: Ord + Hash + Clone, V> CowMap<K, V> {
    fn shard_index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (hash_of(key) as usize) & (self.shards.len().wrapping_sub(1))
    }

    pub fn get_arc<Q>(&self, key: &Q) -> Option<&Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        if self.shards.is_empty() {
            return None;
        }
        self.shards[self.shard_index(key)].get(key)
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        self.get_arc(key).map(|v| &**v)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        self.get_arc(key).is_some()
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<Arc<V>> {
        self.insert_arc(key, Arc::new(value))
    }

    pub fn insert_arc(&mut self, key: K, value: Arc<V>) -> Option<Arc<V>> {
        if self.shards.len() < MAX_SHARDS && self.len >= self.shards.len() * PER_SHARD {
            self.grow();
        }
        let index = self.shard_index(&key);
        let shards = Arc::make_mut(&mut self.shards);
        let previous = Arc::make_mut(&mut shards[index]).insert(key, value);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        let removed = self.shard_holding(key)?.remove(key);
        self.len -= 1;
        removed
    }

    /// The shard holding `key`, made this version's own (copied if shared); `None`
    /// when the key is absent, so a miss copies nothing.
    fn shard_holding<Q>(&mut self, key: &Q) -> Option<&mut BTreeMap<K, Arc<V>>>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        if !self.contains_key(key) {
            return None;
        }
        let index = self.shard_index(key);
        let shards = Arc::make_mut(&mut self.shards);
        Some(Arc::make_mut(&mut shards[index]))
    }

    /// Doubles the shards (one, when there are none): amortised over the inserts
    /// that filled them.
    fn grow(&mut self) {
        let count = (self.shards.len() * 2).max(1);
        let mut shards: Vec<BTreeMap<K, Arc<V>>> = (0..count).map(|_| BTreeMap::new()).collect();
        for (key, value) in self.arcs() {
            shards[(hash_of(key) as usize) & (count - 1)].insert(key.clone(), value.clone());
        }
        self.shards = Arc::new(shards.into_iter().map(Arc::new).collect());
    }
}

impl<K: Ord + Hash + Clone, V: Clone> CowMap<K, V> {
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        self.shard_holding(key)?.get_mut(key).map(Arc::make_mut)
    }

    /// Copies every shard still shared: for whole-map rewrites only.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        Arc::make_mut(&mut self.shards)
            .iter_mut()
            .flat_map(|s| Arc::make_mut(s).values_mut().map(Arc::make_mut))
    }

    pub fn into_values(self) -> impl Iterator<Item = V> {
        self.arcs()
            .map(|(_, v)| V::clone(v))
            .collect::<Vec<_>>()
            .into_iter()
    }
}

/// One key whose entry differs between two versions: the old and the new entry.
pub type Change<'a, K, V> = (&'a K, Option<&'a Arc<V>>, Option<&'a Arc<V>>);

impl<K: Ord + Hash + Clone, V: PartialEq> CowMap<K, V> {
    /// The entries that differ from `old`'s, in no particular order. Shards both
    /// versions share are skipped, and so are values they share.
    pub fn diff<'a>(&'a self, old: &'a Self) -> Vec<Change<'a, K, V>> {
        let mut changes = Vec::new();
        if self.ptr_eq(old) {
            return changes;
        }
        let same = |a: &Arc<V>, b: &Arc<V>| Arc::ptr_eq(a, b) || **a == **b;
        if self.shards.len() != old.shards.len() {
            // Laid out differently: key by key.
            for (key, new) in self.arcs() {
                match old.get_arc(key) {
                    Some(was) if same(was, new) => {}
                    was => changes.push((key, was, Some(new))),
                }
            }
            for (key, was) in old.arcs() {
                if !self.contains_key(key) {
                    changes.push((key, Some(was), None));
                }
            }
            return changes;
        }
        for (new, was) in self.shards.iter().zip(old.shards.iter()) {
            if Arc::ptr_eq(new, was) {
                continue;
            }
            // Both sorted: one merge.
            let (mut a, mut b) = (new.iter().peekable(), was.iter().peekable());
            loop {
                match (a.peek(), b.peek()) {
                    (None, None) => break,
                    (Some((k, v)), None) => {
                        changes.push((*k, None, Some(*v)));
                        a.next();
                    }
                    (None, Some((k, v))) => {
                        changes.push((*k, Some(*v), None));
                        b.next();
                    }
                    (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                        std::cmp::Ordering::Less => {
                            changes.push((*ka, None, Some(*va)));
                            a.next();
                        }
                        std::cmp::Ordering::Greater => {
                            changes.push((*kb, Some(*vb), None));
                            b.next();
                        }
                        std::cmp::Ordering::Equal => {
                            if !same(va, vb) {
                                changes.push((*ka, Some(*vb), Some(*va)));
                            }
                            a.next();
                            b.next();
                        }
                    },
                }
            }
        }
        changes
    }
}

impl<K: Ord + Hash + Clone, V: PartialEq> PartialEq for CowMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.diff(other).is_empty()
    }
}

impl<K: Ord + Hash + Clone, V: Eq> Eq for CowMap<K, V> {}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Ord + Hash + Clone, V> FromIterator<(K, V)> for CowMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = Self::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

impl<K: Ord + Hash + Clone, V, Q> std::ops::Index<&Q> for CowMap<K, V>
where
    K: Borrow<Q>,
    Q: Hash + Ord + ?Sized,
{
    type Output = V;
    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("no entry for the key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_until_written_and_diff_names_only_what_changed() {
        let mut a: CowMap<u32, String> = (0..1000).map(|i| (i, i.to_string())).collect();
        assert_eq!(a.len(), 1000);
        assert_eq!(a.get(&7).map(String::as_str), Some("7"));
        let before = a.clone();
        assert!(a.ptr_eq(&before));
        a.insert(7, "seven".into());
        a.remove(&8);
        a.insert(1000, "1000".into());
        a.insert(9, "9".into()); // the same value: no change
        let mut changes: Vec<(u32, Option<String>, Option<String>)> = a
            .diff(&before)
            .into_iter()
            .map(|(k, o, n)| (*k, o.map(|v| v.to_string()), n.map(|v| v.to_string())))
            .collect();
        changes.sort();
        assert_eq!(
            changes,
            vec![
                (7, Some("7".into()), Some("seven".into())),
                (8, Some("8".into()), None),
                (1000, None, Some("1000".into())),
            ]
        );
        // The old version is untouched.
        assert_eq!(before.get(&7).map(String::as_str), Some("7"));
        assert_eq!(before.len(), 1000);
        assert_eq!(a.len(), 1000);
        assert_ne!(a, before);
    }

    #[test]
    fn maps_laid_out_differently_compare_by_content() {
        // Grown to more shards, then emptied back: equal to one built small.
        let mut big: CowMap<u32, u32> = (0..500).map(|i| (i, i)).collect();
        for i in 3..500 {
            big.remove(&i);
        }
        let small: CowMap<u32, u32> = (0..3).map(|i| (i, i)).collect();
        assert_eq!(big, small);
        assert!(small.diff(&big).is_empty());
        let mut other = small.clone();
        other.insert(1, 5);
        assert_eq!(other.diff(&big).len(), 1);
        assert_eq!(big.diff(&CowMap::new()).len(), 3);
        assert_eq!(CowMap::<u32, u32>::new().diff(&big).len(), 3);
    }

    #[test]
    fn a_write_copies_one_shard() {
        let a: CowMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        let mut b = a.clone();
        *b.get_mut(&5).unwrap() = 6;
        let shared = a
            .shards
            .iter()
            .zip(b.shards.iter())
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert_eq!(shared, a.shards.len() - 1);
        assert_eq!(a[&5], 5);
        assert_eq!(b[&5], 6);
    }
}
