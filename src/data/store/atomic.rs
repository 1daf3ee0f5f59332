//! Files that appear whole or not at all: written under `.tmp-NAME`, synced, then renamed.
//!
//! The same steps as a checkpoint save (`train/fs_steps.rs`), kept here because the store sits
//! below `train/`. A reader never sees a half-written file: it only opens final names.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The temporary name `path` is written under before the rename: `.tmp-NAME` in the same folder.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".tmp-{name}"))
}

/// Whether a file name is a temporary one (left behind by a killed writer).
pub fn is_tmp_name(name: &str) -> bool {
    name.starts_with(".tmp-")
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    publish(&tmp, path)
}

/// Syncs the finished file `tmp`, renames it to `path` and syncs the folder.
pub fn publish(tmp: &Path, path: &Path) -> Result<()> {
    let f = std::fs::File::open(tmp).with_context(|| format!("cannot open {} to sync it", tmp.display()))?;
    f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
    std::fs::rename(tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Only matters for power loss; a folder that cannot be opened (Windows) is skipped.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Removes the temporary files a killed writer left in `dir`; returns their names.
pub fn remove_tmp_files(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        if is_tmp_name(&name) && e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}
