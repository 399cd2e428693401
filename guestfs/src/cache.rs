//! Small bounded caches shared by the filesystem readers.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::{DirEntry, NodeId};

/// A least-recently-used map bounded by the summed weight of its values.
/// Eviction drops the oldest eighth in one pass so its O(n) scan is rare.
pub(crate) struct Lru<K, V> {
    inner: Mutex<LruState<K, V>>,
    max_weight: usize,
}

struct LruState<K, V> {
    tick: u64,
    weight: usize,
    map: HashMap<K, (V, u64, usize)>,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    pub fn new(max_weight: usize) -> Self {
        Lru {
            inner: Mutex::new(LruState {
                tick: 0,
                weight: 0,
                map: HashMap::new(),
            }),
            max_weight,
        }
    }

    pub fn get(&self, k: &K) -> Option<V> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        st.tick += 1;
        let t = st.tick;
        st.map.get_mut(k).map(|(v, used, _)| {
            *used = t;
            v.clone()
        })
    }

    pub fn insert(&self, k: K, v: V, weight: usize) {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        st.tick += 1;
        let t = st.tick;
        if let Some((_, _, w)) = st.map.insert(k, (v, t, weight)) {
            st.weight -= w;
        }
        st.weight += weight;
        while st.weight > self.max_weight && st.map.len() > 1 {
            let mut ticks: Vec<u64> = st.map.values().map(|(_, t, _)| *t).collect();
            let cut = ticks.len() / 8;
            ticks.select_nth_unstable(cut);
            let limit = ticks[cut];
            let mut freed = 0;
            st.map.retain(|_, (_, used, w)| {
                let keep = *used > limit;
                if !keep {
                    freed += *w;
                }
                keep
            });
            st.weight -= freed;
        }
    }
}

/// A directory listing with a name index for fast lookups in big
/// directories (a FUSE `ls -l` of 100k entries looks every name up).
pub(crate) struct Listing {
    pub entries: Arc<[DirEntry]>,
    index: Option<HashMap<Vec<u8>, NodeId>>,
}

impl Listing {
    pub fn new(entries: Vec<DirEntry>) -> Arc<Self> {
        let index = (entries.len() > 32)
            .then(|| entries.iter().map(|e| (e.name.clone(), e.node)).collect());
        Arc::new(Listing {
            entries: entries.into(),
            index,
        })
    }

    pub fn find(&self, name: &[u8]) -> Option<NodeId> {
        match &self.index {
            Some(ix) => ix.get(name).copied(),
            None => self.entries.iter().find(|e| e.name == name).map(|e| e.node),
        }
    }

    /// Cache weight: entries, plus one so empty listings count.
    pub fn weight(&self) -> usize {
        self.entries.len() + 1
    }
}

/// Listings of one filesystem, at most this many entries in all.
pub(crate) const DIR_CACHE_ENTRIES: usize = 1 << 20;
