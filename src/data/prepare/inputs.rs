//! Source specs expanded into the list of input files `prepare` reads, in a fixed order.
//!
//! A spec is a file, a folder (every file below it whose name does not start with `.`, sorted by
//! path), a glob (`data/*.txt`, matches sorted), or `hf://OWNER/NAME/FILE` (fetched into the hub
//! cache; FILE may be a glob, `sample/10BT/*.parquet`, matched against the repo's file list). The extension picks the reader: `.jsonl` / `.ndjson` / `.json` are JSON lines, `.parquet`
//! is parquet, anything else plain text.

use crate::data::hub::{HubFile, HubOptions};
use crate::data::source::resolve_local;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How an input file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Documents separated by the separator (or the whole file one document).
    Text,
    /// One JSON object per line; the document is its text field.
    Jsonl,
    /// A parquet file; the document is each row of the text column.
    Parquet,
}

/// One file to read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// How errors and the manifest name it (the spec's own path, or the hub spec).
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub format: Format,
    /// From a `--val-source`: every document goes to the validation split.
    pub val: bool,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn format_of(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("jsonl" | "ndjson" | "json") => Format::Jsonl,
        Some("parquet") => Format::Parquet,
        _ => Format::Text,
    }
}

/// Every file below `dir` (names starting with `.` skipped), sorted by path.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list source folder {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list source folder {}", dir.display()))?;
    entries.sort();
    for p in entries {
        if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// The files one spec names, in order.
fn expand_one(spec: &str, hub: &HubOptions) -> Result<Vec<(String, PathBuf)>> {
    if spec.starts_with("hf:") {
        let file = HubFile::parse(spec)?;
        let files = if has_glob(&file.file) { file.expand_glob(hub)? } else { vec![file] };
        let mut out = Vec::new();
        for f in files {
            let name = format!("hf://{}/{}/{}", f.owner, f.name, f.file);
            out.push((name, f.fetch(hub)?));
        }
        return Ok(out);
    }
    if has_glob(spec) {
        let mut found = Vec::new();
        for entry in glob::glob(spec).with_context(|| format!("source {spec} is not a valid glob"))? {
            let p = entry.with_context(|| format!("source {spec}: cannot read a match"))?;
            if p.is_file() {
                found.push(p);
            }
        }
        found.sort();
        if found.is_empty() {
            bail!("source {spec}: the glob matches no file");
        }
        return Ok(found.into_iter().map(|p| (p.display().to_string(), p)).collect());
    }
    let path = resolve_local(spec);
    if path.is_dir() {
        let mut found = Vec::new();
        walk(&path, &mut found)?;
        if found.is_empty() {
            bail!("source folder {spec} holds no file");
        }
        return Ok(found.into_iter().map(|p| (p.display().to_string(), p)).collect());
    }
    if !path.is_file() {
        bail!("source {spec} not found (a file, a folder, a glob or hf://OWNER/NAME/FILE)");
    }
    Ok(vec![(spec.to_string(), path)])
}

/// The inputs of the validation specs, then those of the training specs.
pub fn expand(train: &[String], val: &[String], hub: &HubOptions) -> Result<Vec<Input>> {
    if train.is_empty() {
        bail!("no --source given: name at least one file, folder, glob or hf:// file to prepare");
    }
    let mut inputs = Vec::new();
    for (specs, is_val) in [(val, true), (train, false)] {
        for spec in specs {
            for (name, path) in expand_one(spec, hub)? {
                let bytes = std::fs::metadata(&path).with_context(|| format!("cannot stat {name}"))?.len();
                let format = format_of(&path);
                if format == Format::Parquet && !cfg!(feature = "parquet") {
                    bail!("source {name} is parquet: rebuild gumbel-moe with `--features parquet` to read it");
                }
                inputs.push(Input { name, path, bytes, format, val: is_val });
            }
        }
    }
    Ok(inputs)
}
