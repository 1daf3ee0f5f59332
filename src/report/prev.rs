//! Earlier generations of a comparison's runs. A run folder that cannot be reused (its config
//! changed) is moved to `OUT/.prev/G/NAME`, where G is one more than the highest generation
//! already there, so every earlier generation is kept until the user deletes it.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The highest numbered folder in `OUT/.prev` (0 when there is none).
fn last_generation(prev: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(prev) else { return 0 };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .max()
        .unwrap_or(0)
}

/// Moves the run folders `OUT/NAME` of `names` into a new generation `OUT/.prev/G/`; returns that
/// folder (None when `names` is empty).
pub fn move_aside(out: &Path, names: &[&str]) -> Result<Option<PathBuf>> {
    if names.is_empty() {
        return Ok(None);
    }
    let prev = out.join(".prev");
    let generation = prev.join((last_generation(&prev) + 1).to_string());
    std::fs::create_dir_all(&generation).with_context(|| format!("cannot create {}", generation.display()))?;
    for name in names {
        let (from, to) = (out.join(name), generation.join(name));
        std::fs::rename(&from, &to)
            .with_context(|| format!("cannot move {} aside to {}", from.display(), to.display()))?;
    }
    Ok(Some(generation))
}
