//! metrics.jsonl: one JSON object per line, appended and flushed as training goes, so a crash or a
//! resume keeps every line already written.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl` for appending (a resumed run continues the same file).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file, path })
    }

    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}").with_context(|| format!("writing {}", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }
}

/// Reads every line of a metrics file (for tests and tools).
pub fn read(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: bad JSON", path.display(), i + 1)))
        .collect()
}

/// Drops the lines whose `step` is beyond `step` (written after the checkpoint a run resumes from),
/// so the resumed run's lines follow on without duplicates. Rewritten atomically.
pub fn truncate_after(dir: &Path, step: u64) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    if !path.exists() {
        return Ok(());
    }
    let keep: Vec<String> = read(&path)?
        .into_iter()
        .filter(|v| v.get("step").and_then(Value::as_u64).is_none_or(|s| s <= step) && v.get("event").is_none())
        .map(|v| v.to_string())
        .collect();
    let tmp = dir.join("metrics.jsonl.tmp");
    std::fs::write(&tmp, keep.iter().map(|l| format!("{l}\n")).collect::<String>())?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}
