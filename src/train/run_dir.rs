//! A run directory: what a run writes there, refusing to start a new run on top of an earlier one,
//! clearing one when asked, recovering from a save that was cut short, and pruning old checkpoints.
//!
//! A run's files are `config.json`, `metrics.jsonl`, `best/`, `ckpt-NNNNNNN/`, the plots
//! (`val_loss.png`, `train_loss.png`, `load.png`) and, while a save is under way, its `.tmp-*`,
//! `.old-*` and `.trash-*` directories. Anything else in the directory (compare's `train.log`, a
//! user's notes) is not the run's: it never makes the directory count as holding a run, and
//! `--overwrite` leaves it alone.
//!
//! Every change goes through [`FsSteps`], and the order of the steps keeps these true after a
//! kill at any point: each `ckpt-*` and `best` on disk is a complete checkpoint; `best` is either
//! there or, for the moment of a replacement, renamed to `.old-best-<pid>` (which loading falls back
//! to and [`recover`] renames back); a directory being deleted is first renamed to `.trash-*`, so a
//! half-deleted one never counts as a checkpoint.

use super::fs_steps::FsSteps;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Files and directories a run writes, by exact name.
const RUN_NAMES: [&str; 6] = ["config.json", "metrics.jsonl", "best", "val_loss.png", "train_loss.png", "load.png"];
/// ... and by prefix.
const RUN_PREFIXES: [&str; 4] = ["ckpt-", ".tmp-", ".old-", ".trash-"];

/// What a new run does with an output directory that already holds a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IfRunExists {
    /// Stop with an error that offers `--resume DIR` and `--overwrite`.
    #[default]
    Refuse,
    /// Delete the earlier run's files (see the module header) and start afresh.
    Overwrite,
}

/// The names of the run files in `dir`, sorted; empty when `dir` does not exist.
pub fn run_files(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut names = Vec::new();
    for e in entries {
        let name =
            e.with_context(|| format!("cannot list {}", dir.display()))?.file_name().to_string_lossy().to_string();
        if RUN_NAMES.contains(&name.as_str()) || RUN_PREFIXES.iter().any(|p| name.starts_with(p)) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Refuses a new run into `dir` if it holds an earlier run (the error lists what is there and
/// offers `--resume` and `--overwrite`).
pub fn refuse_if_run(dir: &Path) -> Result<()> {
    let files = run_files(dir)?;
    if files.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = files.iter().map(String::as_str).take(6).collect();
    let more = if files.len() > 6 { format!(" and {} more", files.len() - 6) } else { String::new() };
    bail!(
        "{} already holds a run ({}{more}): continue it with `--resume {}`, or pass `--overwrite` to \
         delete that run's checkpoints, best/, config.json, metrics.jsonl and plots and start afresh \
         (other files there are kept)",
        dir.display(),
        shown.join(", "),
        dir.display()
    )
}

/// Deletes the run files of `dir` (each renamed to `.trash-*` first, then removed).
pub fn clear(dir: &Path, fs: &FsSteps) -> Result<()> {
    for name in run_files(dir)? {
        let path = dir.join(&name);
        if name.starts_with(".trash-") || name.starts_with(".tmp-") {
            fs.remove_tree(&path)?;
        } else {
            trash(&path, fs)?;
        }
    }
    Ok(())
}

/// Renames `path` to a `.trash-*` sibling, then removes that.
pub fn trash(path: &Path, fs: &FsSteps) -> Result<()> {
    let parent = path.parent().context("nothing to trash at the file-system root")?;
    let name = path.file_name().context("path without a name")?.to_string_lossy().to_string();
    let doomed = parent.join(format!(".trash-{name}-{}", std::process::id()));
    fs.remove_tree(&doomed)?;
    fs.rename(path, &doomed)?;
    fs.remove_tree(&doomed)
}

/// For `.old-NAME-PID`, the NAME it was renamed from.
fn old_of(entry: &str) -> Option<&str> {
    let (name, pid) = entry.strip_prefix(".old-")?.rsplit_once('-')?;
    (!name.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// The sibling `.old-NAME-PID` of `path` (a checkpoint renamed aside while being replaced), if any.
pub fn renamed_aside(path: &Path) -> Option<PathBuf> {
    let parent = path.parent()?;
    let name = path.file_name()?.to_string_lossy().to_string();
    let mut found: Vec<PathBuf> = std::fs::read_dir(parent)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| old_of(&e.file_name().to_string_lossy()) == Some(name.as_str()))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.pop()
}

/// Puts `dir` back in order after a save that was cut short: a checkpoint renamed aside whose
/// replacement never arrived gets its name back, one whose replacement did is deleted, and the
/// temporary and trash directories are removed. Returns what it did, one line each.
pub fn recover(dir: &Path, fs: &FsSteps) -> Result<Vec<String>> {
    let mut did = Vec::new();
    for name in run_files(dir)? {
        let path = dir.join(&name);
        if let Some(orig) = old_of(&name) {
            if dir.join(orig).exists() {
                trash(&path, fs)?;
                did.push(format!("removed {} (replaced by {orig})", path.display()));
            } else {
                fs.rename(&path, &dir.join(orig))?;
                did.push(format!("restored {orig} from {} (its replacement was never written)", path.display()));
            }
        } else if name.starts_with(".tmp-") || name.starts_with(".trash-") {
            fs.remove_tree(&path)?;
            did.push(format!("removed {} (left by an unfinished save)", path.display()));
        }
    }
    Ok(did)
}

/// The step of a `ckpt-NNNNNNN` name.
pub fn ckpt_step(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// The `ckpt-*` checkpoints of `dir` (directories holding weights), oldest first.
pub fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for name in run_files(dir)? {
        let path = dir.join(&name);
        if let Some(step) = ckpt_step(&name) {
            if path.join(super::checkpoint::MODEL_FILE).exists() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes all but the newest `keep` (at least 1) `ckpt-*` checkpoints, oldest first, each renamed
/// to `.trash-*` before it is deleted.
pub fn prune(dir: &Path, keep: usize, fs: &FsSteps) -> Result<()> {
    let ckpts = checkpoints(dir)?;
    for (_, old) in ckpts.iter().take(ckpts.len().saturating_sub(keep.max(1))) {
        trash(old, fs)?;
    }
    Ok(())
}

/// Whether two paths name the same directory (both canonicalised; a path that does not exist
/// compares as given).
pub fn same_dir(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_files_ignore_other_files() {
        let d = tempfile::tempdir().unwrap();
        assert!(run_files(&d.path().join("missing")).unwrap().is_empty());
        std::fs::write(d.path().join("train.log"), "x").unwrap();
        std::fs::write(d.path().join("notes.md"), "x").unwrap();
        assert!(run_files(d.path()).unwrap().is_empty());
        refuse_if_run(d.path()).unwrap();
        std::fs::create_dir(d.path().join("ckpt-0000003")).unwrap();
        std::fs::write(d.path().join("metrics.jsonl"), "").unwrap();
        assert_eq!(run_files(d.path()).unwrap(), ["ckpt-0000003", "metrics.jsonl"]);
        let e = refuse_if_run(d.path()).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--overwrite") && e.contains("ckpt-0000003"), "{e}");
        clear(d.path(), &FsSteps::new()).unwrap();
        assert!(run_files(d.path()).unwrap().is_empty());
        assert!(d.path().join("train.log").exists() && d.path().join("notes.md").exists());
    }

    #[test]
    fn old_names_parse() {
        assert_eq!(old_of(".old-best-123"), Some("best"));
        assert_eq!(old_of(".old-ckpt-0000006-9"), Some("ckpt-0000006"));
        for bad in [".old-best", ".old--1", ".old-best-x1", "best-1", ".tmp-best-1"] {
            assert_eq!(old_of(bad), None, "{bad}");
        }
    }
}
