//! The catalog: sled trees of VMs, backups, disk backups and chain heads.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `schema_version` | u32, big-endian |
//! | `vms` | vm name | [`VmRecord`] (JSON) |
//! | `backups` | backup id | [`BackupRecord`] (JSON) |
//! | `disk_backups` | backup id, NUL, disk index (u32 BE) | [`DiskBackupRecord`] (JSON) |
//! | `disk_index` | vm name, NUL, disk index (u32 BE), NUL, backup id | empty (all points of one disk, in id order) |
//! | `heads` | vm name, NUL, disk index (u32 BE) | [`ChainHead`] (JSON) |
//! | `policies` | `default`, or `vm`, NUL, vm name | [`RetentionPolicy`] (JSON) |
//! | `tokens` | token name | [`TokenRecord`] (JSON: role, VM patterns, the secret's hash) |
//!
//! Backup ids sort by time, so id order is time order. Every change that
//! touches more than one record is one sled transaction, and every
//! transaction is flushed to disk before the call returns: nothing the API
//! acknowledges is lost.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use crate::model::{
    BackupRecord, ChainHead, DiskBackupRecord, RetentionPolicy, Status, TokenRecord, VmRecord,
};

/// Version of the layout above. Bumped when it changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("catalog at {path} is in use by another process (is `chainvault serve` running? use --server instead)")]
    Locked { path: String },
    #[error("catalog schema version {found} is newer than this chainvault understands ({SCHEMA_VERSION}); upgrade chainvault")]
    TooNew { found: u32 },
    #[error("catalog: {0}")]
    Sled(#[from] sled::Error),
    #[error("catalog record {key:?} is damaged: {detail}")]
    Damaged { key: String, detail: String },
}

pub type CatalogResult<T> = Result<T, CatalogError>;

/// The open catalog.
pub struct Catalog {
    db: sled::Db,
    vms: sled::Tree,
    backups: sled::Tree,
    disks: sled::Tree,
    index: sled::Tree,
    heads: sled::Tree,
    policies: sled::Tree,
    tokens: sled::Tree,
}

fn policy_key(vm: Option<&str>) -> Vec<u8> {
    match vm {
        None => b"default".to_vec(),
        Some(v) => {
            let mut k = b"vm\0".to_vec();
            k.extend_from_slice(v.as_bytes());
            k
        }
    }
}

fn disk_key(backup_id: &str, disk_id: u32) -> Vec<u8> {
    let mut k = backup_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&disk_id.to_be_bytes());
    k
}

fn vm_disk_prefix(vm: &str, disk_id: u32) -> Vec<u8> {
    let mut k = vm.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&disk_id.to_be_bytes());
    k
}

fn index_key(vm: &str, disk_id: u32, backup_id: &str) -> Vec<u8> {
    let mut k = vm_disk_prefix(vm, disk_id);
    k.push(0);
    k.extend_from_slice(backup_id.as_bytes());
    k
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serialising our own plain records cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn dec<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> CatalogResult<T> {
    serde_json::from_slice(v).map_err(|e| CatalogError::Damaged {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

type TxResult = Result<(), ConflictableTransactionError<()>>;

fn tx_err(e: TransactionError<()>) -> CatalogError {
    match e {
        TransactionError::Storage(s) => CatalogError::Sled(s),
        TransactionError::Abort(()) => CatalogError::Damaged {
            key: "transaction".into(),
            detail: "aborted".into(),
        },
    }
}

/// One change to apply in a transaction.
#[derive(Debug, Clone)]
pub enum Change {
    PutVm(VmRecord),
    PutBackup(BackupRecord),
    PutDisk(DiskBackupRecord),
    DeleteBackup(String),
    DeleteDisk {
        vm_name: String,
        backup_id: String,
        disk_id: u32,
    },
    PutHead(ChainHead),
    DeleteHead {
        vm_name: String,
        disk_id: u32,
    },
}

impl Catalog {
    /// Open (or create) the catalog in directory `path`.
    pub fn open(path: &Path) -> CatalogResult<Catalog> {
        let db = sled::Config::new().path(path).open().map_err(|e| {
            let p = path.display().to_string();
            match &e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.raw_os_error() == Some(11) =>
                {
                    CatalogError::Locked { path: p }
                }
                _ if e.to_string().contains("lock") => CatalogError::Locked { path: p },
                _ => CatalogError::Open { path: p, source: e },
            }
        })?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0xff; 4]));
                if found > SCHEMA_VERSION {
                    return Err(CatalogError::TooNew { found });
                }
            }
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        Ok(Catalog {
            vms: db.open_tree("vms")?,
            backups: db.open_tree("backups")?,
            disks: db.open_tree("disk_backups")?,
            index: db.open_tree("disk_index")?,
            heads: db.open_tree("heads")?,
            policies: db.open_tree("policies")?,
            tokens: db.open_tree("tokens")?,
            db,
        })
    }

    /// Apply `changes` atomically and make them durable.
    pub fn apply(&self, changes: &[Change]) -> CatalogResult<()> {
        (
            &self.vms,
            &self.backups,
            &self.disks,
            &self.index,
            &self.heads,
        )
            .transaction(|(vms, backups, disks, index, heads)| -> TxResult {
                for c in changes {
                    apply_one(c, vms, backups, disks, index, heads)?;
                }
                Ok(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn vm(&self, name: &str) -> CatalogResult<Option<VmRecord>> {
        self.vms
            .get(name)?
            .map(|v| dec(name.as_bytes(), &v))
            .transpose()
    }

    pub fn vms(&self) -> CatalogResult<Vec<VmRecord>> {
        self.vms
            .iter()
            .map(|r| r.map_err(CatalogError::from).and_then(|(k, v)| dec(&k, &v)))
            .collect()
    }

    pub fn backup(&self, id: &str) -> CatalogResult<Option<BackupRecord>> {
        self.backups
            .get(id)?
            .map(|v| dec(id.as_bytes(), &v))
            .transpose()
    }

    /// All backups, oldest first.
    pub fn backups(&self) -> CatalogResult<Vec<BackupRecord>> {
        self.backups
            .iter()
            .map(|r| r.map_err(CatalogError::from).and_then(|(k, v)| dec(&k, &v)))
            .collect()
    }

    pub fn disk(&self, backup_id: &str, disk_id: u32) -> CatalogResult<Option<DiskBackupRecord>> {
        let k = disk_key(backup_id, disk_id);
        self.disks.get(&k)?.map(|v| dec(&k, &v)).transpose()
    }

    /// The disk backups of one backup, by disk index.
    pub fn disks_of(&self, backup_id: &str) -> CatalogResult<Vec<DiskBackupRecord>> {
        let mut p = backup_id.as_bytes().to_vec();
        p.push(0);
        self.disks
            .scan_prefix(&p)
            .map(|r| r.map_err(CatalogError::from).and_then(|(k, v)| dec(&k, &v)))
            .collect()
    }

    /// Every point of one disk of a VM, oldest first.
    pub fn points_of(&self, vm: &str, disk_id: u32) -> CatalogResult<Vec<DiskBackupRecord>> {
        let mut p = vm_disk_prefix(vm, disk_id);
        p.push(0);
        let mut out = Vec::new();
        for r in self.index.scan_prefix(&p) {
            let (k, _) = r?;
            let id = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            if let Some(d) = self.disk(&id, disk_id)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// All disk backups, in (backup id, disk) order.
    pub fn all_disks(&self) -> CatalogResult<Vec<DiskBackupRecord>> {
        self.disks
            .iter()
            .map(|r| r.map_err(CatalogError::from).and_then(|(k, v)| dec(&k, &v)))
            .collect()
    }

    pub fn head(&self, vm: &str, disk_id: u32) -> CatalogResult<Option<ChainHead>> {
        let k = vm_disk_prefix(vm, disk_id);
        self.heads.get(&k)?.map(|v| dec(&k, &v)).transpose()
    }

    pub fn heads(&self) -> CatalogResult<Vec<ChainHead>> {
        self.heads
            .iter()
            .map(|r| r.map_err(CatalogError::from).and_then(|(k, v)| dec(&k, &v)))
            .collect()
    }

    /// The running backup of a VM, if any.
    pub fn running_backup_of(&self, vm: &str) -> CatalogResult<Option<BackupRecord>> {
        Ok(self
            .backups()?
            .into_iter()
            .find(|b| b.vm_name == vm && b.status == Status::Running))
    }

    /// The policy of one VM (`Some(name)`) or the server-wide default (`None`).
    pub fn policy(&self, vm: Option<&str>) -> CatalogResult<Option<RetentionPolicy>> {
        let k = policy_key(vm);
        self.policies.get(&k)?.map(|v| dec(&k, &v)).transpose()
    }

    /// Store (durably) or, with `None`, remove a policy. Returns whether one was there.
    pub fn set_policy(&self, vm: Option<&str>, p: Option<&RetentionPolicy>) -> CatalogResult<bool> {
        let k = policy_key(vm);
        let old = match p {
            Some(p) => self.policies.insert(&k, enc(p))?,
            None => self.policies.remove(&k)?,
        };
        self.db.flush()?;
        Ok(old.is_some())
    }

    /// Every VM's own policy, by VM name.
    pub fn vm_policies(&self) -> CatalogResult<Vec<(String, RetentionPolicy)>> {
        self.policies
            .scan_prefix(b"vm\0")
            .map(|r| {
                let (k, v) = r?;
                Ok((String::from_utf8_lossy(&k[3..]).into_owned(), dec(&k, &v)?))
            })
            .collect()
    }

    /// Every API token, by name.
    pub fn tokens(&self) -> CatalogResult<Vec<TokenRecord>> {
        self.tokens
            .iter()
            .map(|r| {
                let (k, v) = r?;
                dec(&k, &v)
            })
            .collect()
    }

    /// Whether any API token exists (the API then asks every request for one).
    pub fn has_tokens(&self) -> CatalogResult<bool> {
        Ok(!self.tokens.is_empty())
    }

    /// Store a new token durably; false (and nothing stored) when one of
    /// that name exists.
    pub fn add_token(&self, t: &TokenRecord) -> CatalogResult<bool> {
        let r =
            self.tokens
                .compare_and_swap(t.name.as_bytes(), None as Option<&[u8]>, Some(enc(t)))?;
        self.db.flush()?;
        Ok(r.is_ok())
    }

    /// Remove a token durably; whether it was there.
    pub fn remove_token(&self, name: &str) -> CatalogResult<bool> {
        let old = self.tokens.remove(name.as_bytes())?;
        self.db.flush()?;
        Ok(old.is_some())
    }

    pub fn flush(&self) -> CatalogResult<()> {
        self.db.flush()?;
        Ok(())
    }
}

fn apply_one(
    c: &Change,
    vms: &TransactionalTree,
    backups: &TransactionalTree,
    disks: &TransactionalTree,
    index: &TransactionalTree,
    heads: &TransactionalTree,
) -> TxResult {
    match c {
        Change::PutVm(v) => {
            vms.insert(v.name.as_bytes(), enc(v))?;
        }
        Change::PutBackup(b) => {
            backups.insert(b.backup_id.as_bytes(), enc(b))?;
        }
        Change::PutDisk(d) => {
            disks.insert(disk_key(&d.backup_id, d.disk_id), enc(d))?;
            index.insert(index_key(&d.vm_name, d.disk_id, &d.backup_id), &[][..])?;
        }
        Change::DeleteBackup(id) => {
            backups.remove(id.as_bytes())?;
        }
        Change::DeleteDisk {
            vm_name,
            backup_id,
            disk_id,
        } => {
            disks.remove(disk_key(backup_id, *disk_id))?;
            index.remove(index_key(vm_name, *disk_id, backup_id))?;
        }
        Change::PutHead(h) => {
            heads.insert(vm_disk_prefix(&h.vm_name, h.disk_id), enc(h))?;
        }
        Change::DeleteHead { vm_name, disk_id } => {
            heads.remove(vm_disk_prefix(vm_name, *disk_id))?;
        }
    }
    Ok(())
}
