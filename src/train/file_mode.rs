//! File permissions of what a save writes, and a clear first line when a file cannot be read for
//! want of permission. The safetensors crate writes through a temporary file (mode 0600 on Unix);
//! [`as_if_created`] gives such a file the mode any other new file gets (0666 & !umask), so the
//! weights are as readable to other users as the config.json beside them.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Gives `path` the permissions a file newly created beside it gets (a probe file is created and
/// removed to learn them: the umask cannot be read without changing it). A no-op off Unix.
pub fn as_if_created(path: &Path) -> Result<()> {
    if !cfg!(unix) {
        return Ok(());
    }
    let name = path.file_name().context("no file name")?.to_string_lossy();
    let probe = path.with_file_name(format!(".mode-{name}-{}", std::process::id()));
    let perms = {
        let f = std::fs::File::create(&probe).with_context(|| format!("cannot create {}", probe.display()))?;
        f.metadata().with_context(|| format!("cannot stat {}", probe.display()))?.permissions()
    };
    std::fs::remove_file(&probe).with_context(|| format!("cannot remove {}", probe.display()))?;
    std::fs::set_permissions(path, perms).with_context(|| format!("cannot set the permissions of {}", path.display()))
}

/// Fails with "permission denied: ..." first when `path` exists but cannot be opened for reading
/// for want of permission (e.g. another user's file); other problems are left to the reader.
pub fn check_readable(path: &Path, what: &str) -> Result<()> {
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!("permission denied: cannot read {what} {} (ask its owner for read access)", path.display())
        }
        _ => Ok(()),
    }
}
