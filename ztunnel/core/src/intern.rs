//! One shared copy of equal values: the labels of the pods of one Deployment,
//! say, stored once for all of them (and for their workloads in the state,
//! which take the pod's `Arc`).

use std::{collections::HashSet, hash::Hash, sync::Arc};

/// Below this many entries the table is not swept.
const SWEEP_FLOOR: usize = 1024;

/// Hands out one `Arc` per distinct value. The table forgets the values no one
/// else holds any more when it has doubled since it was last swept: it stays
/// within twice what is in use (or the floor), and a sweep's cost is spread
/// over the values added since the last one, never paid per lookup.
#[derive(Debug)]
pub struct Interner<T> {
    table: HashSet<Arc<T>>,
    /// Entries after the last sweep.
    swept: usize,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            table: HashSet::new(),
            swept: 0,
        }
    }
}

impl<T: Hash + Eq> Interner<T> {
    /// The shared copy of `value`: one already handed out, or `value` itself,
    /// kept for the next one equal to it.
    pub fn intern(&mut self, value: Arc<T>) -> Arc<T> {
        if let Some(shared) = self.table.get(&*value) {
            return shared.clone();
        }
        if self.table.len() >= (2 * self.swept).max(SWEEP_FLOOR) {
            self.sweep();
        }
        self.table.insert(value.clone());
        value
    }

    /// Distinct values kept, in use or not yet swept.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Forgets the values only the table holds.
    pub fn sweep(&mut self) {
        self.table.retain(|v| Arc::strong_count(v) > 1);
        self.swept = self.table.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_arc_and_unused_ones_are_swept() {
        let mut interner = Interner::default();
        let a = interner.intern(Arc::new(String::from("app=web")));
        let b = interner.intern(Arc::new(String::from("app=web")));
        assert!(Arc::ptr_eq(&a, &b));
        let other = interner.intern(Arc::new(String::from("app=db")));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(interner.len(), 2);
        drop((b, other));
        interner.sweep();
        assert_eq!(interner.len(), 1, "app=db is no longer held");
        assert!(Arc::ptr_eq(
            &interner.intern(Arc::new("app=web".into())),
            &a
        ));
    }

    #[test]
    fn the_table_stays_within_twice_what_is_in_use() {
        let mut interner = Interner::default();
        let kept: Vec<Arc<u32>> = (0..100).map(|i| interner.intern(Arc::new(i))).collect();
        // Values handed out and dropped at once: swept as the table grows.
        for i in 100..100_000 {
            interner.intern(Arc::new(i));
        }
        assert!(interner.len() <= SWEEP_FLOOR, "{} kept", interner.len());
        for (i, value) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(&interner.intern(Arc::new(i as u32)), value));
        }
    }
}
