//! The data model shared by the catalog, the engine, the HTTP API and the CLI.
//! Field names and shapes follow the control API that transfer clients
//! already speak (see docs/api.md).

use serde::{Deserialize, Serialize};

pub use crate::engine::retention::{KeepOptions, Rule, Verdict};

/// Full or incremental, as asked for or as given to a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Incremental,
}

/// Status of a VM-level backup or of one disk backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Data is being written.
    Running,
    /// Durable, checked, change_id recorded.
    Completed,
    /// Failed through the API, by timeout, or by an error; its images were removed.
    Failed,
    /// The daemon stopped (or crashed) while it ran; its images were removed.
    Interrupted,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "running" => Some(Status::Running),
            "completed" => Some(Status::Completed),
            "failed" => Some(Status::Failed),
            "interrupted" => Some(Status::Interrupted),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        }
    }
}

/// A disk as the start request describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskSpec {
    pub disk_id: u32,
    #[serde(default)]
    pub disk_key: Option<String>,
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
    /// Per-disk override: "full" after a CBT reset of this disk alone.
    #[serde(default)]
    pub mode: Option<BackupType>,
    /// With a full of a disk that has a previous point: keep the new point as an
    /// overlay of the previous one storing only clusters that differ from it.
    #[serde(default)]
    pub compare_with_parent: bool,
}

/// `POST /api/v1/backups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartRequest {
    pub vm_name: String,
    pub backup_type: BackupType,
    #[serde(default)]
    pub repository_id: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Required the first time a VM is seen; a known VM may omit it.
    #[serde(default)]
    pub disks: Option<Vec<DiskSpec>>,
}

/// One disk's NBD target in the start response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskTarget {
    pub disk_id: u32,
    pub disk_key: Option<String>,
    pub capacity_bytes: u64,
    /// What this disk gets.
    pub mode: BackupType,
    /// Why `mode` differs from what was asked, when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub export_name: String,
    pub nbd_uri: String,
    /// The change_id to read changed blocks since; "" for a full.
    pub previous_change_id: String,
    pub parent_backup_id: Option<String>,
    pub compare_with_parent: bool,
}

/// Response to a start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartResponse {
    pub backup_id: String,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub status: Status,
    pub created_at: String,
    pub disks: Vec<DiskTarget>,
}

/// `POST /api/v1/backups/{id}/complete`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CompleteRequest {
    #[serde(default)]
    pub change_id: Option<String>,
    #[serde(default)]
    pub disk_id: Option<u32>,
    #[serde(default)]
    pub bytes_transferred: Option<u64>,
    /// The client's digest of what it read from the source
    /// (`cvblk2-blake3:<hex>`, docs/layout.md): the disk fails unless the
    /// stored point has the same.
    #[serde(default)]
    pub digest: Option<String>,
}

/// Response to a completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteResponse {
    pub status: String,
    pub backup_id: String,
    pub disk_id: u32,
    pub change_id: String,
    /// The point's digest (`cvblk2-blake3:<hex>`).
    #[serde(default)]
    pub digest: Option<String>,
    pub message: String,
    pub timestamp: String,
    /// Status of the whole backup after this completion.
    pub backup_status: Status,
}

/// `GET /api/v1/backups/changeid`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeIdResponse {
    pub vm_name: String,
    pub disk_id: u32,
    pub change_id: String,
    pub backup_id: String,
    pub message: String,
}

/// A VM and its disks, as the catalog knows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub disks: Vec<VmDisk>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmDisk {
    pub disk_id: u32,
    pub disk_key: Option<String>,
    pub capacity_bytes: u64,
}

/// A VM-level backup job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRecord {
    pub backup_id: String,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub status: Status,
    pub repository_id: Option<String>,
    pub tags: Vec<String>,
    pub disk_ids: Vec<u32>,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// A protected backup is never removed by prune or delete.
    #[serde(default)]
    pub protected: bool,
    /// Free text a person attached to the backup.
    #[serde(default)]
    pub note: Option<String>,
}

/// One disk's part of a backup: keyed by (backup_id, disk_id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskBackupRecord {
    pub backup_id: String,
    pub disk_id: u32,
    pub vm_name: String,
    pub disk_key: Option<String>,
    pub capacity_bytes: u64,
    pub mode: BackupType,
    pub reason: Option<String>,
    /// The point this one is an overlay of.
    pub parent_backup_id: Option<String>,
    /// Identifies the chain (a full starts a new one).
    pub chain_id: String,
    /// Image path relative to the repository root.
    pub image: String,
    pub status: Status,
    pub change_id: Option<String>,
    /// What the point reads, as `cvblk2-blake3:<hex>` (docs/layout.md);
    /// recorded with the change_id. None for points made before digests.
    #[serde(default)]
    pub digest: Option<String>,
    /// The last deep verify of this point (`chainvault verify --deep`).
    #[serde(default)]
    pub deep_verify: Option<DeepVerifyResult>,
    pub bytes_transferred: Option<u64>,
    pub size_on_disk: Option<u64>,
    pub started_at: String,
    pub completed_at: Option<String>,
    pub error: Option<String>,
}

/// The head of the current chain of one disk: keyed by (vm_name, disk_id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainHead {
    pub vm_name: String,
    pub disk_id: u32,
    pub chain_id: String,
    pub head_backup_id: String,
    pub head_change_id: String,
}

/// A backup with its disks, as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupView {
    #[serde(flatten)]
    pub backup: BackupRecord,
    pub disks: Vec<DiskBackupRecord>,
}

/// All points of one disk, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainView {
    pub vm_name: String,
    pub disk_id: u32,
    pub head: Option<ChainHead>,
    pub points: Vec<DiskBackupRecord>,
}

/// `PATCH /api/v1/backups/{backup_id}`: protect, unprotect, set or clear
/// the note. A field left out is left as it is; `"note": null` clears it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub note: Option<Option<String>>,
}

/// A field that is present (even as `null`) deserializes to `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::deserialize(d)?))
}

/// When the daemon applies a VM's retention policy by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneWhen {
    /// After each backup of the VM completes.
    #[default]
    AfterBackup,
    /// On the policy's `schedule`.
    Schedule,
    /// Only when someone runs `chainvault prune`.
    Never,
}

/// A retention policy: a VM's own, or the server-wide default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    #[serde(flatten)]
    pub keep: KeepOptions,
    /// IANA name, "UTC" or an offset such as "+02:00"; periods are in UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub prune: PruneWhen,
    /// With `prune: schedule`: "HH:MM" (daily, in the policy's time zone) or
    /// "every 6h" (also s, m, d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// A completed incremental that makes a disk's chain longer than this
    /// consolidates the oldest points until it is this long again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chain_length: Option<u32>,
    #[serde(default)]
    pub updated_at: String,
}

/// `GET /api/v1/policies/...`: a policy and whose it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    /// The VM asked about, or null for the default.
    pub vm_name: Option<String>,
    /// "vm" (the VM's own), "default" (the server-wide one), or "none".
    pub source: String,
    pub policy: Option<RetentionPolicy>,
}

/// `POST /api/v1/prune`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// One VM, or every VM when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Keep options for this run; when any is given they replace the
    /// stored policy's keep options (its time zone still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<i64>,
    #[serde(default)]
    pub dry_run: bool,
}

/// `PUT /api/v1/policies/...`: keep counts, time zone, when to prune, depth limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<i64>,
    #[serde(default)]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub prune: Option<PruneWhen>,
    #[serde(default)]
    pub schedule: Option<String>,
    #[serde(default)]
    pub max_chain_length: Option<i64>,
}

/// The keep counts of a request, in [`Rule::ALL`] order.
macro_rules! keep_counts {
    ($t:ty) => {
        impl $t {
            pub fn counts(&self) -> [Option<i64>; 6] {
                [
                    self.keep_last,
                    self.keep_hourly,
                    self.keep_daily,
                    self.keep_weekly,
                    self.keep_monthly,
                    self.keep_yearly,
                ]
            }
        }
    };
}
keep_counts!(PruneRequest);
keep_counts!(PolicyRequest);

/// One backup in a prune report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneEntry {
    pub backup_id: String,
    pub created_at: String,
    pub status: Status,
    pub verdict: Verdict,
    /// The option that keeps it ("keep-daily"), or why it is kept or removed.
    pub reason: String,
    /// Bytes its removal frees (an estimate from the images' cluster maps);
    /// 0 for kept backups.
    pub bytes_freed: u64,
    /// Set when the removal was tried and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The prune of one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmPrune {
    pub vm_name: String,
    /// Where the keep options came from: "request", "vm", "default" or "none".
    pub policy_source: String,
    pub keep: KeepOptions,
    pub time_zone: String,
    /// Newest first.
    pub backups: Vec<PruneEntry>,
    pub kept: u64,
    pub removed: u64,
    pub bytes_freed: u64,
}

/// `POST /api/v1/prune` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub vms: Vec<VmPrune>,
    pub kept: u64,
    pub removed: u64,
    pub bytes_freed: u64,
    /// Removals that failed (the rest went on).
    pub errors: Vec<String>,
}

/// One image to import.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// Absolute path on the daemon's machine.
    pub path: String,
    /// When the point was taken (RFC 3339); default: the file's mtime.
    #[serde(default)]
    pub created_at: Option<String>,
}

/// `POST /api/v1/imports`: adopt existing qcow2 files as the next points of
/// one disk, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    pub vm_name: String,
    pub disk_id: u32,
    pub images: Vec<ImportImage>,
    /// The change_id of the last image (the next incremental starts from it).
    #[serde(default)]
    pub change_id: Option<String>,
    /// Remove each source file once its point is in the catalog.
    #[serde(default, rename = "move")]
    pub move_files: bool,
}

/// What an import adopted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportReport {
    pub vm_name: String,
    pub disk_id: u32,
    /// The new points, oldest first.
    pub points: Vec<DiskBackupRecord>,
    pub bytes_copied: u64,
    pub moved: bool,
}

/// `POST /api/v1/restores`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub backup_id: String,
    pub disk_id: u32,
    /// Instant recovery: serve the point read-write through a scratch
    /// overlay (the point itself never changes).
    #[serde(default)]
    pub writable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreView {
    pub restore_id: String,
    pub backup_id: String,
    /// The VM the point belongs to.
    #[serde(default)]
    pub vm_name: String,
    pub disk_id: u32,
    pub export_name: String,
    pub nbd_uri: String,
    pub size: u64,
    pub created_at: String,
    /// An instant restore: writes go to a scratch overlay.
    #[serde(default)]
    pub writable: bool,
    /// Bytes the overlay of an instant restore occupies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_bytes: Option<u64>,
}

/// Numbers for `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Metrics {
    pub backups_by_status: Vec<(String, u64)>,
    pub bytes_received: u64,
    pub active_exports: u64,
    pub active_restores: u64,
    /// Per VM: name, bytes its images occupy, completed points.
    #[serde(default)]
    pub vms: Vec<(String, u64, u64)>,
    /// Bytes of the whole repository directory.
    #[serde(default)]
    pub repository_bytes: u64,
    /// Free bytes of its file system.
    #[serde(default)]
    pub free_bytes: u64,
    /// Completed points by deep-verify outcome: (never, ok, bad).
    #[serde(default)]
    pub deep_verify: (u64, u64, u64),
}

/// The outcome of one point's deep verify, kept with the point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeepVerifyResult {
    /// When it ran (RFC 3339 UTC).
    pub at: String,
    /// Every block read back with its recorded digest.
    pub ok: bool,
    /// Disk offset of the first bad block, when one was found.
    #[serde(default)]
    pub first_bad_offset: Option<u64>,
    /// What was wrong, in a sentence.
    #[serde(default)]
    pub message: Option<String>,
}

impl DiskBackupRecord {
    /// A deep verify found this point bad: it is never a parent.
    pub fn is_bad(&self) -> bool {
        self.deep_verify.as_ref().is_some_and(|v| !v.ok)
    }
}

/// `POST /api/v1/verify/deep`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeepVerifyRequest {
    /// Only this VM's points.
    #[serde(default)]
    pub vm_name: Option<String>,
    /// Read at most this many MiB per second.
    #[serde(default)]
    pub rate_mib_s: Option<u64>,
}

/// A block whose bytes do not match its recorded digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BadBlock {
    pub vm_name: String,
    pub disk_id: u32,
    /// The point whose own layer holds the block.
    pub backup_id: String,
    /// Disk offset and length of the block.
    pub offset: u64,
    pub length: u64,
    /// The image file that holds its bytes (relative to the repository),
    /// and where in that file, when the block is stored data.
    pub image: Option<String>,
    pub host_offset: Option<u64>,
    pub compressed: bool,
    /// Later points that read this block through the chain.
    pub affected: Vec<String>,
    pub message: String,
}

/// What a deep verify found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeepVerifyReport {
    pub points_checked: u64,
    pub points_bad: u64,
    /// Points with no block digests to check against.
    pub points_without_digests: u64,
    pub blocks_checked: u64,
    pub bytes_read: u64,
    pub seconds: f64,
    pub bad_blocks: Vec<BadBlock>,
    /// Other findings (a point that cannot be read, digest files that do
    /// not resolve to the recorded digest).
    pub problems: Vec<String>,
}

/// What `chain verify` found.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct VerifyReport {
    pub points_checked: u64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

// ---------------------------------------------------------------------------
// API tokens (docs/api.md, "Tokens and roles")
// ---------------------------------------------------------------------------

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Start, complete and fail backups; read change_ids and its VMs' backups.
    Backup,
    /// List backups, open read-only restores, read files; never write.
    Restore,
    /// Read-only: lists, metrics, verify results.
    Audit,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Backup, Role::Restore, Role::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Audit => "audit",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A token as the catalog keeps it: never the secret, only its hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// VM names or glob patterns (`*`, `?`) the token is limited to; empty
    /// means every VM.
    #[serde(default)]
    pub vms: Vec<String>,
    /// BLAKE3 of the secret, lower-case hex.
    pub secret_hash: String,
    pub created_at: String,
}

/// A token as the API and the CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub role: Role,
    pub vms: Vec<String>,
    pub created_at: String,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> Self {
        TokenView {
            name: t.name.clone(),
            role: t.role,
            vms: t.vms.clone(),
            created_at: t.created_at.clone(),
        }
    }
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub name: String,
    pub role: String,
    #[serde(default)]
    pub vms: Vec<String>,
}

/// Response of `POST /api/v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub name: String,
    pub role: Role,
    pub vms: Vec<String>,
    pub created_at: String,
    /// The secret, to send as `Authorization: Bearer <token>`.
    pub token: String,
}

/// Response of `GET /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// RFC 3339 UTC timestamp of now.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
