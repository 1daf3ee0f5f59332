//! The file-system steps of saving, replacing and pruning checkpoints, one call each, counted.
//!
//! Every change a save makes on disk goes through [`FsSteps`]: a directory created, one file
//! written, an fsync, a rename, one file or empty directory removed. [`FsSteps::failing_at`]`(k)`
//! makes the k-th step (0-based) return an error instead of running, and nothing after it runs, so
//! the disk is left as a kill -9 just before that step would leave it. The crash tests use it to
//! stop a run at every step in turn and check what the next run finds; a normal run uses
//! [`FsSteps::new`], which never fails on its own.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts file-system steps; optionally refuses the k-th.
#[derive(Debug, Default)]
pub struct FsSteps {
    done: AtomicU64,
    fail_at: Option<u64>,
}

impl FsSteps {
    /// Steps that all run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Step `k` (0-based, counted over every save and prune this value sees) fails instead of
    /// running, as if the process were killed just before it.
    pub fn failing_at(k: u64) -> Self {
        Self { done: AtomicU64::new(0), fail_at: Some(k) }
    }

    /// Steps run so far.
    pub fn count(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Counts one step, or fails if it is the one to stop before.
    fn step(&self, what: &str, path: &Path) -> Result<()> {
        let k = self.done.load(Ordering::SeqCst);
        if self.fail_at == Some(k) {
            bail!("stopped before file-system step {k} ({what} {}), as FsSteps::failing_at asked", path.display());
        }
        self.done.store(k + 1, Ordering::SeqCst);
        Ok(())
    }

    pub fn create_dir_all(&self, dir: &Path) -> Result<()> {
        self.step("create", dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
    }

    pub fn create_dir(&self, dir: &Path) -> Result<()> {
        self.step("create", dir)?;
        std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))
    }

    /// One file written by `write` (which gets the path).
    pub fn write_with(&self, path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        self.step("write", path)?;
        write(path)
    }

    /// fsync of a file or a directory. A directory that cannot be opened for syncing (Windows) is
    /// skipped: the sync only matters for power loss, not for a killed process.
    pub fn sync(&self, path: &Path) -> Result<()> {
        self.step("sync", path)?;
        if path.is_dir() {
            if let Ok(d) = std::fs::File::open(path) {
                let _ = d.sync_all();
            }
            return Ok(());
        }
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {} to sync it", path.display()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", path.display()))
    }

    /// An atomic rename (both paths in one directory).
    pub fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.step("rename", from)?;
        std::fs::rename(from, to).with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
    }

    /// Removes a file, or a directory tree one entry at a time (a step per file and per emptied
    /// directory). A path that does not exist is not an error.
    pub fn remove_tree(&self, path: &Path) -> Result<()> {
        let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
        if meta.is_dir() {
            let entries = std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?;
            for e in entries {
                self.remove_tree(&e.with_context(|| format!("cannot list {}", path.display()))?.path())?;
            }
            self.step("remove", path)?;
            std::fs::remove_dir(path).with_context(|| format!("cannot remove {}", path.display()))
        } else {
            self.step("remove", path)?;
            std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_at_the_asked_step_and_runs_nothing_there() {
        let d = tempfile::tempdir().unwrap();
        let fs = FsSteps::failing_at(2);
        fs.create_dir(&d.path().join("a")).unwrap();
        fs.write_with(&d.path().join("a/f"), |p| Ok(std::fs::write(p, "x")?)).unwrap();
        let e = fs.rename(&d.path().join("a"), &d.path().join("b")).unwrap_err().to_string();
        assert!(e.contains("step 2") && e.contains("rename"), "{e}");
        assert!(d.path().join("a/f").exists() && !d.path().join("b").exists());
        assert_eq!(fs.count(), 2);
        // A tree goes one entry at a time: 1 file + 1 directory.
        let all = FsSteps::new();
        all.remove_tree(&d.path().join("a")).unwrap();
        assert_eq!(all.count(), 2);
        assert!(!d.path().join("a").exists());
        all.remove_tree(&d.path().join("a")).unwrap();
    }
}
