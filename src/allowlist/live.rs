//! The list in force: one immutable snapshot swapped atomically, so every
//! decision sees either the whole old list or the whole new one and a
//! reload never waits on, or for, the data path.

use super::trie::Allowlist;
use arc_swap::{ArcSwap, Guard};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counts of reload outcomes, for logs now and metrics later.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub updated: AtomicU64,
    pub unchanged: AtomicU64,
    pub failed: AtomicU64,
    /// Unix time of the last fetch that proved the list current.
    pub last_success_unix: AtomicU64,
}

#[derive(Debug)]
pub struct Live {
    list: ArcSwap<Allowlist>,
    loaded: AtomicBool,
    pub stats: ReloadStats,
}

impl Live {
    /// No list yet: everything is denied and the gateway is not ready.
    pub fn empty() -> Live {
        Live {
            list: ArcSwap::from_pointee(Allowlist::default()),
            loaded: AtomicBool::new(false),
            stats: ReloadStats::default(),
        }
    }

    /// A list already in force.
    pub fn with(list: Allowlist) -> Live {
        let live = Live::empty();
        live.install(list);
        live
    }

    /// The snapshot to decide with. Cheap, lock-free, never blocks.
    pub fn current(&self) -> Guard<Arc<Allowlist>> {
        self.list.load()
    }

    /// Whether any list has been loaded since start.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Swaps `list` in. Connections already admitted are unaffected.
    pub fn install(&self, list: Allowlist) {
        self.list.store(Arc::new(list));
        self.loaded.store(true, Ordering::Release);
    }
}
