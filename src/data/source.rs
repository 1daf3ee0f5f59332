//! Where training text comes from: a local file, or a file in a Hugging Face dataset repo.
//!
//! A spec is either a path or `hf://OWNER/NAME/FILE` (see [`super::hub`]).
//!
//! A relative path is looked up first in the current directory, then in the crate's own folder
//! (`CARGO_MANIFEST_DIR` when the binary was built). So the default `data/tinyshakespeare.txt`,
//! shipped in the repo, works whatever the directory `gumbel-moe` runs in, while a file of that
//! name in the current directory still wins. Absolute paths are used as they are.

use super::hub::{HubFile, HubOptions};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The crate's folder when it was built: the fallback for relative data paths.
const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Reads the whole text named by `spec`: a local file path, or `hf://OWNER/NAME/FILE` for a file
/// in a Hugging Face dataset repo (revision `main`), with the hub cache and offline mode taken from
/// the environment ([`HubOptions::from_env`]).
///
/// The text must be non-empty UTF-8. Errors name the file (and the repo for hub files), and for
/// invalid UTF-8 the byte offset of the first invalid byte.
pub fn load_text(spec: &str) -> Result<String> {
    load_text_with(spec, &HubOptions::from_env())
}

/// [`load_text`] with the hub cache and offline mode given by the caller (no environment read).
pub fn load_text_with(spec: &str, hub: &HubOptions) -> Result<String> {
    if spec.starts_with("hf:") {
        let path = HubFile::parse(spec)?.fetch(hub)?;
        return read_text_file(&path, &format!("{spec} (cached at {})", path.display()));
    }
    let path = resolve_local(spec);
    if !path.exists() && Path::new(spec).is_relative() {
        let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| "?".into());
        bail!(
            "cannot read text file {spec}: not found in the current directory ({cwd}) nor in the crate \
             directory ({CRATE_DIR})"
        );
    }
    if path == Path::new(spec) {
        read_text_file(&path, spec)
    } else {
        read_text_file(&path, &format!("{spec} (found at {})", path.display()))
    }
}

/// The file a local spec names: the path as given when it is absolute or exists from the current
/// directory, else the same relative path under the crate's folder when it exists there, else the
/// path as given.
pub fn resolve_local(spec: &str) -> PathBuf {
    let path = PathBuf::from(spec);
    if path.is_absolute() || path.exists() {
        return path;
    }
    let in_crate = Path::new(CRATE_DIR).join(&path);
    if in_crate.exists() {
        in_crate
    } else {
        path
    }
}

/// Reads `path` as non-empty UTF-8 text; `name` is how errors refer to it.
fn read_text_file(path: &Path, name: &str) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read text file {name}"))?;
    if bytes.is_empty() {
        bail!("text file {name} is empty");
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let byte = e.as_bytes()[at];
            bail!("text file {name} is not valid UTF-8: invalid byte 0x{byte:02x} at byte offset {at}")
        }
    }
}
