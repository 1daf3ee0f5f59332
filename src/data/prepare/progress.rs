//! `prepare.progress.json`: how far an unfinished `prepare` got, so a rerun continues there.
//!
//! Rewritten (atomically) each time a shard is published: per split, the shards done, the documents
//! in them, and where the next document of that split starts. The settings (inputs with their
//! sizes, options) are recorded too; a rerun with other settings is refused rather than mixed.
//! Deleted once `manifest.json` is written.

use super::docs::Pos;
use crate::data::store::atomic::write_atomic;
use crate::data::store::ShardInfo;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const PROGRESS_FILE: &str = "prepare.progress.json";

/// One split's finished part.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitProgress {
    pub shards: Vec<ShardInfo>,
    pub documents: u64,
    /// Index of the split's next document (those below are in `shards`).
    pub next_doc: u64,
    /// Where reading can restart without missing that document.
    pub resume: Pos,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The settings, as JSON: a rerun must match them.
    pub settings: serde_json::Value,
    pub tokenizer_sha256: String,
    pub eot_id: u32,
    pub train: SplitProgress,
    pub val: SplitProgress,
}

impl Progress {
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(PROGRESS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let p = serde_json::from_str(&text)
            .with_context(|| format!("{} is malformed; delete it to start this prepare over", path.display()))?;
        Ok(Some(p))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(PROGRESS_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }

    pub fn split_mut(&mut self, val: bool) -> &mut SplitProgress {
        if val {
            &mut self.val
        } else {
            &mut self.train
        }
    }
}
