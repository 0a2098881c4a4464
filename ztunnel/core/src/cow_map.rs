//! A map whose clones share their contents, for the snapshot and the state.
//!
//! The entries are spread over shards by hash, each shard a vector sorted by
//! key; the shards hang in groups of up to [`FANOUT`], so a map is a tree two
//! levels deep (groups, then shards). A clone shares everything, and a write
//! copies only the path to the shard it touches: the list of groups, one group
//! and one shard, each at most [`FANOUT`] pointers or a few dozen entries. So a
//! new version of a map of 100,000 objects after one object changed costs about
//! a hundred pointers and a few dozen entries, and [`CowMap::diff`] between two
//! versions skips the groups and shards they still share: it grows with what
//! differs, not with the map. Values sit behind an `Arc`, so a copied shard
//! copies pointers, and readers of an old version are never disturbed by a
//! writer. A sorted vector holds an entry in its key and one pointer, with no
//! per-node overhead (a `BTreeMap` leaf of eleven slots took 536 bytes for
//! `String` keys and values).

use std::{
    borrow::Borrow,
    cmp::Ordering,
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

/// Shards per group, and groups per map at most.
const FANOUT: usize = 64;
/// Entries per shard before the shards double (up to [`MAX_SHARDS`]).
const PER_SHARD: usize = 32;
const MAX_SHARDS: usize = FANOUT * FANOUT;

type Shard<K, V> = Arc<Vec<(K, Arc<V>)>>;
type Group<K, V> = Arc<Vec<Shard<K, V>>>;

pub struct CowMap<K, V> {
    /// Shard `i` is `groups[i / FANOUT][i % FANOUT]`; a power of two of shards
    /// (none while empty).
    groups: Arc<Vec<Group<K, V>>>,
    shards: usize,
    len: usize,
}

impl<K, V> Clone for CowMap<K, V> {
    fn clone(&self) -> Self {
        Self {
            groups: self.groups.clone(),
            shards: self.shards,
            len: self.len,
        }
    }
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        Self {
            groups: Arc::new(Vec::new()),
            shards: 0,
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

/// The vector behind `arc`, this version's own: copied if shared, with room for
/// one more entry (a write that inserts then does not reallocate it).
fn own<T: Clone>(arc: &mut Arc<Vec<T>>) -> &mut Vec<T> {
    if Arc::get_mut(arc).is_none() {
        let mut copy = Vec::with_capacity(arc.len() + 1);
        copy.extend(arc.iter().cloned());
        *arc = Arc::new(copy);
    }
    Arc::get_mut(arc).expect("just made unique")
}

/// Where `key` is in a sorted shard.
fn search<K: Borrow<Q>, V, Q: Ord + ?Sized>(shard: &[(K, V)], key: &Q) -> Result<usize, usize> {
    shard.binary_search_by(|(k, _)| k.borrow().cmp(key))
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
        self.groups
            .iter()
            .flat_map(|g| g.iter())
            .flat_map(|s| s.iter().map(|(k, v)| (k, v)))
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
        Arc::ptr_eq(&self.groups, &other.groups)
    }

    fn shard(&self, index: usize) -> &[(K, Arc<V>)] {
        &self.groups[index / FANOUT][index % FANOUT]
    }
}

impl<K: Ord + Hash + Clone, V> CowMap<K, V> {
    fn shard_index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (hash_of(key) as usize) & (self.shards.wrapping_sub(1))
    }

    pub fn get_arc<Q>(&self, key: &Q) -> Option<&Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        if self.shards == 0 {
            return None;
        }
        let shard = self.shard(self.shard_index(key));
        search(shard, key).ok().map(|i| &shard[i].1)
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
        if self.shards < MAX_SHARDS && self.len >= self.shards * PER_SHARD {
            self.grow();
        }
        let index = self.shard_index(&key);
        let shard = self.own_shard(index);
        match search(shard, &key) {
            Ok(i) => Some(std::mem::replace(&mut shard[i].1, value)),
            Err(i) => {
                shard.insert(i, (key, value));
                self.len += 1;
                None
            }
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        let (shard, i) = self.shard_holding(key)?;
        let (_, removed) = shard.remove(i);
        self.len -= 1;
        Some(removed)
    }

    /// Shard `index`, made this version's own (the groups and the group on the
    /// way copied if shared).
    fn own_shard(&mut self, index: usize) -> &mut Vec<(K, Arc<V>)> {
        let group = own(&mut self.groups)
            .get_mut(index / FANOUT)
            .expect("a shard of the map");
        own(&mut own(group)[index % FANOUT])
    }

    /// The shard holding `key`, made this version's own, and the key's place in
    /// it; `None` when the key is absent, so a miss copies nothing.
    fn shard_holding<Q>(&mut self, key: &Q) -> Option<(&mut Vec<(K, Arc<V>)>, usize)>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        if self.shards == 0 {
            return None;
        }
        let index = self.shard_index(key);
        let i = search(self.shard(index), key).ok()?;
        Some((self.own_shard(index), i))
    }

    /// Doubles the shards (one, when there are none): amortised over the inserts
    /// that filled them. Shard `i` splits into shards `i` and `i + shards`, each
    /// still sorted.
    fn grow(&mut self) {
        let count = (self.shards * 2).max(1);
        let mut shards: Vec<Vec<(K, Arc<V>)>> = (0..count).map(|_| Vec::new()).collect();
        for (key, value) in self.arcs() {
            shards[(hash_of(key) as usize) & (count - 1)].push((key.clone(), value.clone()));
        }
        let mut shards = shards.into_iter().map(Arc::new);
        let groups = (0..count.div_ceil(FANOUT))
            .map(|_| Arc::new(shards.by_ref().take(FANOUT).collect()))
            .collect();
        self.groups = Arc::new(groups);
        self.shards = count;
    }
}

impl<K: Ord + Hash + Clone, V: Clone> CowMap<K, V> {
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Ord + ?Sized,
    {
        let (shard, i) = self.shard_holding(key)?;
        Some(Arc::make_mut(&mut shard[i].1))
    }

    /// Copies every shard still shared: for whole-map rewrites only.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        own(&mut self.groups)
            .iter_mut()
            .flat_map(|g| own(g).iter_mut())
            .flat_map(|s| own(s).iter_mut().map(|(_, v)| Arc::make_mut(v)))
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
    /// The entries that differ from `old`'s, in no particular order. Groups and
    /// shards both versions share are skipped, and so are values they share.
    pub fn diff<'a>(&'a self, old: &'a Self) -> Vec<Change<'a, K, V>> {
        let mut changes = Vec::new();
        if self.ptr_eq(old) {
            return changes;
        }
        let same = |a: &Arc<V>, b: &Arc<V>| Arc::ptr_eq(a, b) || **a == **b;
        if self.shards != old.shards {
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
        for (new, was) in self.groups.iter().zip(old.groups.iter()) {
            if Arc::ptr_eq(new, was) {
                continue;
            }
            for (new, was) in new.iter().zip(was.iter()) {
                if Arc::ptr_eq(new, was) {
                    continue;
                }
                // Both sorted: one merge.
                let (mut a, mut b) = (new.iter().peekable(), was.iter().peekable());
                loop {
                    let order = match (a.peek(), b.peek()) {
                        (None, None) => break,
                        (Some(_), None) => Ordering::Less,
                        (None, Some(_)) => Ordering::Greater,
                        (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
                    };
                    match order {
                        Ordering::Less => {
                            let (k, v) = a.next().expect("peeked");
                            changes.push((k, None, Some(v)));
                        }
                        Ordering::Greater => {
                            let (k, v) = b.next().expect("peeked");
                            changes.push((k, Some(v), None));
                        }
                        Ordering::Equal => {
                            let ((k, now), (_, then)) =
                                (a.next().expect("peeked"), b.next().expect("peeked"));
                            if !same(now, then) {
                                changes.push((k, Some(then), Some(now)));
                            }
                        }
                    }
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
        let pairs = || a.groups.iter().zip(b.groups.iter());
        let shared_groups = pairs().filter(|(x, y)| Arc::ptr_eq(x, y)).count();
        assert_eq!(shared_groups, a.groups.len() - 1);
        let shared_shards = pairs()
            .flat_map(|(x, y)| x.iter().zip(y.iter()))
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert_eq!(shared_shards, a.shards - 1);
        assert!(a.groups.len() > 1, "two levels: {} shards", a.shards);
        assert_eq!(a[&5], 5);
        assert_eq!(b[&5], 6);
    }

    #[test]
    fn every_key_is_found_after_growing_through_both_levels() {
        let mut map: CowMap<u32, u32> = CowMap::new();
        let mut versions = Vec::new();
        for i in 0..200_000 {
            map.insert(i, i * 2);
            if i % 50_000 == 0 {
                versions.push((i, map.clone()));
            }
        }
        assert_eq!(map.shards, MAX_SHARDS);
        assert!((0..200_000).all(|i| map.get(&i) == Some(&(i * 2))));
        assert_eq!(map.get(&200_000), None);
        for i in (0..200_000).step_by(3) {
            assert_eq!(map.remove(&i), Some(Arc::new(i * 2)));
        }
        assert!((0..200_000).all(|i| map.contains_key(&i) == (i % 3 != 0)));
        assert_eq!(map.len(), map.iter().count());
        // Older versions keep what they had.
        for (last, version) in versions {
            assert_eq!(version.len(), last as usize + 1);
            assert!((0..=last).all(|i| version.get(&i) == Some(&(i * 2))));
        }
    }
}
