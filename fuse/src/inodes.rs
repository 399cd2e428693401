//! The table between nodes of the tree and FUSE inode numbers.
//!
//! Inode numbers are handed out on first sight and never reused. An entry
//! the kernel has looked up is kept until the kernel forgets it; entries only
//! seen in a `readdir` stay (they are small, and a listing of the same
//! directory gives the same numbers again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chainvault_guestfs::NodeId;

use crate::point::PointId;

/// A node of the tree.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    /// `/by-id`
    ById,
    /// `/by-id/<backup-id>`
    ByIdBackup(Arc<str>),
    /// `/by-id/<backup-id>/disk<N>` (a symlink)
    ByIdLink(Arc<str>, u32),
    /// `/<vm>` by its directory name
    Vm(Arc<str>),
    /// `/<vm>/disk<N>`
    Disk(Arc<str>, u32),
    /// `/<vm>/disk<N>/latest` (a symlink)
    Latest(Arc<str>, u32),
    /// `/<vm>/disk<N>/<point>`
    Point(PointId),
    DiskRaw(PointId),
    Info(PointId),
    /// `WARNING.txt`: present while the point failed deep verify, or reads
    /// through one that did.
    Warning(PointId),
    /// A volume's directory (the guest root when its filesystem opened).
    Volume(PointId, u16),
    VolRaw(PointId, u16),
    VolError(PointId, u16),
    /// A guest file, directory or symlink below a volume's root.
    Guest(PointId, u16, NodeId),
}

pub const ROOT_INO: u64 = 1;

struct Entry {
    node: Node,
    lookups: u64,
}

/// Thread-safe inode table.
pub struct Inodes {
    t: Mutex<Table>,
}

struct Table {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Entry>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Inodes {
    pub fn new() -> Inodes {
        let mut t = Table {
            by_node: HashMap::new(),
            by_ino: HashMap::new(),
            next: ROOT_INO + 1,
        };
        t.by_node.insert(Node::Root, ROOT_INO);
        t.by_ino.insert(
            ROOT_INO,
            Entry {
                node: Node::Root,
                lookups: 0,
            },
        );
        Inodes { t: Mutex::new(t) }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.t.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The inode of `node`, allocated if new (no lookup reference).
    pub fn ino(&self, node: &Node) -> u64 {
        self.get_or_add(node, 0)
    }

    /// The inode of `node` for a lookup reply: counts one kernel reference.
    pub fn lookup(&self, node: &Node) -> u64 {
        self.get_or_add(node, 1)
    }

    fn get_or_add(&self, node: &Node, refs: u64) -> u64 {
        let mut t = self.table();
        if let Some(&ino) = t.by_node.get(node) {
            if let Some(e) = t.by_ino.get_mut(&ino) {
                e.lookups += refs;
            }
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        t.by_node.insert(node.clone(), ino);
        t.by_ino.insert(
            ino,
            Entry {
                node: node.clone(),
                lookups: refs,
            },
        );
        ino
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.table().by_ino.get(&ino).map(|e| e.node.clone())
    }

    /// The kernel dropped `n` references; forget the entry at zero.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.table();
        let gone = match t.by_ino.get_mut(&ino) {
            Some(e) => {
                e.lookups = e.lookups.saturating_sub(n);
                e.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(e) = t.by_ino.remove(&ino) {
                t.by_node.remove(&e.node);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.table().by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_and_forgotten_at_zero() {
        let t = Inodes::new();
        assert_eq!(t.ino(&Node::Root), ROOT_INO);
        let a = t.lookup(&Node::Guest(0, 0, 7));
        assert_eq!(t.lookup(&Node::Guest(0, 0, 7)), a);
        assert_eq!(t.node(a), Some(Node::Guest(0, 0, 7)));
        t.forget(a, 1);
        assert_eq!(t.node(a), Some(Node::Guest(0, 0, 7)));
        t.forget(a, 1);
        assert_eq!(t.node(a), None);
        let b = t.lookup(&Node::Guest(0, 0, 7));
        assert_ne!(a, b, "numbers are never reused");
        t.forget(ROOT_INO, 5);
        assert_eq!(t.node(ROOT_INO), Some(Node::Root));
    }
}
