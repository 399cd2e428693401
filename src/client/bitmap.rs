//! QEMU dirty bitmaps as checkpoints: naming rules, and `qemu-img` for the
//! bitmaps of local (offline) qcow2 files.
//!
//! A disk's change_id is the name of the dirty bitmap that tracks the writes
//! since that backup's point in time. The client only records a name as a
//! change_id after it has seen that bitmap on the source. A backup read
//! without a new checkpoint records `nocbt:<backup_id>`, which can never be
//! a bitmap name (':' is not allowed in checkpoint names), so the next backup
//! of that disk is a full read.

use std::path::Path;
use std::process::Stdio;

use serde::Deserialize;

/// change_id prefix of a backup taken without a new checkpoint.
pub const NO_CHECKPOINT_PREFIX: &str = "nocbt:";
/// Longest checkpoint (bitmap) name the client accepts.
pub const MAX_NAME: usize = 200;

/// Whether `name` is a checkpoint name the client creates or records:
/// 1 to 200 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or
/// digit. (QEMU allows more; the narrow set keeps names safe in shells,
/// QMP and URLs, and keeps them apart from `nocbt:` change_ids and from
/// other tools' change_ids such as VMware's.)
pub fn is_checkpoint_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The `--bitmap` check, with the fix in the message.
pub fn validate_name(name: &str) -> Result<(), String> {
    if is_checkpoint_name(name) {
        Ok(())
    } else {
        Err(format!(
            "bitmap name {name:?} is not usable as a checkpoint: use 1 to {MAX_NAME} characters \
             of A-Z a-z 0-9 . _ - starting with a letter or digit (e.g. chainvault-20250310T020000Z)"
        ))
    }
}

/// A fresh checkpoint name: `PREFIX` + the UTC time to the millisecond,
/// e.g. `chainvault-20250310T020000.143Z`.
pub fn auto_name(prefix: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{prefix}{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

/// One persistent bitmap of a qcow2 file, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    /// `in-use`: the image was not closed cleanly while the bitmap was
    /// active, so it may have missed writes; QEMU refuses to use it.
    pub in_use: bool,
    /// `auto`: recording writes.
    pub enabled: bool,
}

/// What the client needs from `qemu-img info` of a local image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub bitmaps: Vec<BitmapInfo>,
}

impl ImageInfo {
    pub fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
    pub fn names(&self) -> Vec<String> {
        self.bitmaps.iter().map(|b| b.name.clone()).collect()
    }
}

#[derive(Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<RawSpecific>,
}
#[derive(Deserialize)]
struct RawSpecific {
    #[serde(default)]
    data: Option<RawData>,
}
#[derive(Deserialize)]
struct RawData {
    #[serde(default)]
    bitmaps: Vec<RawBitmap>,
}
#[derive(Deserialize)]
struct RawBitmap {
    name: String,
    #[serde(default)]
    flags: Vec<String>,
}

/// Run a qemu tool; stdout on success, a message naming the command and its
/// stderr otherwise.
async fn qemu_tool(tool: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("`{tool}` is not installed: install the Debian package qemu-utils")
            } else {
                format!("cannot run {tool}: {e}")
            }
        })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(format!("`{tool} {}` failed: {err}", args.join(" ")))
    }
}

/// Add a hint when qemu says the image is locked by another process.
fn explain_lock(path: &Path, msg: String) -> String {
    if msg.contains("lock") {
        format!(
            "{msg}\n{} is in use by another process (a running VM?): a local image must not be \
             in use while it is backed up; back up a running VM through an NBD export of its disk \
             instead (see docs/client.md, \"Running VMs\")",
            path.display()
        )
    } else {
        msg
    }
}

/// `qemu-img info --output=json FILE` (fails, with the reason, when a
/// running VM holds the image's lock).
pub async fn image_info(path: &Path) -> Result<ImageInfo, String> {
    let p = path.to_string_lossy();
    let out = qemu_tool("qemu-img", &["info", "--output=json", &p])
        .await
        .map_err(|e| explain_lock(path, e))?;
    let raw: RawInfo = serde_json::from_slice(&out)
        .map_err(|e| format!("cannot read `qemu-img info` of {}: {e}", path.display()))?;
    let bitmaps = raw
        .format_specific
        .and_then(|f| f.data)
        .map(|d| d.bitmaps)
        .unwrap_or_default()
        .into_iter()
        .map(|b| BitmapInfo {
            in_use: b.flags.iter().any(|f| f == "in-use"),
            enabled: b.flags.iter().any(|f| f == "auto"),
            name: b.name,
        })
        .collect();
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        bitmaps,
    })
}

/// `qemu-img bitmap --add FILE NAME`: a new persistent bitmap, enabled, that
/// records every write from now on.
pub async fn add(path: &Path, name: &str) -> Result<(), String> {
    let p = path.to_string_lossy();
    qemu_tool("qemu-img", &["bitmap", "--add", &p, name])
        .await
        .map(|_| ())
        .map_err(|e| explain_lock(path, e))
}

/// `qemu-img bitmap --remove FILE NAME`. Retries for a moment: a qemu-nbd
/// that was just stopped may still hold the image's lock.
pub async fn remove(path: &Path, name: &str) -> Result<(), String> {
    let p = path.to_string_lossy();
    let mut last = String::new();
    for _ in 0..20 {
        match qemu_tool("qemu-img", &["bitmap", "--remove", &p, name]).await {
            Ok(_) => return Ok(()),
            Err(e) if e.contains("lock") => {
                last = e;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(explain_lock(path, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names() {
        for ok in ["b1", "chainvault-20250310T020000Z", "a.b_c-d", "0"] {
            assert!(is_checkpoint_name(ok), "{ok}");
        }
        let long = "x".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "nocbt:123",
            "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5490",
            "ä",
            long.as_str(),
        ] {
            assert!(!is_checkpoint_name(bad), "{bad}");
            assert!(validate_name(bad).is_err());
        }
        let n = auto_name("chainvault-");
        assert!(is_checkpoint_name(&n) && n.starts_with("chainvault-") && n.ends_with('Z'));
    }
}
