//! Where training text comes from: a local file, or a file in a Hugging Face dataset repo.
//!
//! A spec is either a path (`data/input.txt`) or `hf://OWNER/NAME/FILE`, which names `FILE` (it may
//! contain slashes) in the dataset repo `OWNER/NAME` at revision `main`. Hub files go through the
//! `hf-hub` cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (the crate
//! resolves this itself). `hf-hub` does not read `HF_HUB_OFFLINE`; we do, and then only look in the
//! cache so that nothing waits on the network.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// The prefix of a hub spec.
const HUB_PREFIX: &str = "hf://";

/// The form a hub spec must take, quoted in errors.
const HUB_FORM: &str = "hf://OWNER/NAME/FILE (a file in a Hugging Face dataset repo, e.g. \
                        hf://SamPIngram/tinyshakespeare/input.txt)";

/// Reads the whole text named by `spec`: a local file path, or `hf://OWNER/NAME/FILE` for a file
/// in a Hugging Face dataset repo (revision `main`).
///
/// The text must be non-empty UTF-8. Errors name the file (and the repo for hub files), and for
/// invalid UTF-8 the byte offset of the first invalid byte.
pub fn load_text(spec: &str) -> Result<String> {
    if spec.starts_with("hf:") {
        let hub = HubFile::parse(spec)?;
        let path = follow_flattened_link(hub.fetch()?);
        read_text_file(&path, &format!("{spec} (cached at {})", path.display()))
    } else {
        read_text_file(Path::new(spec), spec)
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

/// The hub cache stores a snapshot file as a symlink `../../blobs/<etag>` (one more `../` per
/// folder in the file name). A copy made without symlink support (git with
/// `core.symlinks=false`, some archivers) turns it into a small plain file holding that link text;
/// such a file is followed to its blob when the blob exists. Any other path is returned unchanged.
fn follow_flattened_link(path: std::path::PathBuf) -> std::path::PathBuf {
    let small = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() <= 512);
    if !small {
        return path;
    }
    let Ok(link) = std::fs::read_to_string(&path) else {
        return path;
    };
    let mut rest = link.as_str();
    let mut ups = 0;
    while let Some(r) = rest.strip_prefix("../") {
        rest = r;
        ups += 1;
    }
    let etag = rest.strip_prefix("blobs/").unwrap_or_default();
    let is_etag = !etag.is_empty() && etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ups < 2 || !is_etag {
        return path;
    }
    match path.parent().map(|dir| dir.join(&link)) {
        Some(target) if target.is_file() => target,
        _ => path,
    }
}

/// A file in a Hugging Face dataset repo, parsed from `hf://OWNER/NAME/FILE`.
#[derive(Debug, PartialEq)]
struct HubFile {
    owner: String,
    name: String,
    file: String,
}

impl HubFile {
    /// Parses a hub spec; every part must be non-empty and `FILE` must not have empty segments.
    fn parse(spec: &str) -> Result<Self> {
        let malformed = || anyhow::anyhow!("malformed hub spec {spec:?}: expected {HUB_FORM}");
        let rest = spec.strip_prefix(HUB_PREFIX).ok_or_else(malformed)?;
        let mut parts = rest.splitn(3, '/');
        let owner = parts.next().unwrap_or_default();
        let name = parts.next().unwrap_or_default();
        let file = parts.next().unwrap_or_default();
        if owner.is_empty() || name.is_empty() || file.is_empty() || file.split('/').any(str::is_empty) {
            return Err(malformed());
        }
        Ok(Self { owner: owner.to_string(), name: name.to_string(), file: file.to_string() })
    }

    /// Resolves the file to a local path through the `hf-hub` cache, downloading it unless
    /// `HF_HUB_OFFLINE` is set. Retries are off so a missing network fails at once.
    #[cfg(feature = "hub")]
    fn fetch(&self) -> Result<std::path::PathBuf> {
        let offline = hub_offline();
        let client = hf_hub::HFClient::builder()
            .retry_max_attempts(0)
            .build()
            .context("cannot set up the Hugging Face hub client")?;
        let cache = client.cache_dir().to_path_buf();
        let sync = hf_hub::HFClientSync::from_inner(client).context("cannot start the Hugging Face hub client")?;
        let repo = sync.dataset(self.owner.as_str(), self.name.as_str());
        let result = repo.download_file().filename(self.file.as_str()).local_files_only(offline).send();
        result.map_err(|e| {
            let repo = format!("{}/{}", self.owner, self.name);
            let file = &self.file;
            let cache = cache.display();
            if offline {
                anyhow::anyhow!(
                    "file {file:?} of Hugging Face dataset {repo} (revision main) is not in the hub cache \
                     {cache}; the lookup was offline because HF_HUB_OFFLINE is set ({e})"
                )
            } else {
                anyhow::anyhow!(
                    "cannot fetch file {file:?} of Hugging Face dataset {repo} (revision main, hub cache \
                     {cache}): {e}"
                )
            }
        })
    }

    /// Without the `hub` feature (the Apple-target type check) there is no hub client.
    #[cfg(not(feature = "hub"))]
    fn fetch(&self) -> Result<std::path::PathBuf> {
        anyhow::bail!(
            "cannot read hf://{}/{}/{}: gumbel-moe was built without the `hub` feature",
            self.owner,
            self.name,
            self.file
        )
    }
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only lookups ("1", "true", "yes" or "on", any case).
#[cfg(feature = "hub")]
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_only_flattened_blob_links() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/c0/sub")).unwrap();
        std::fs::write(repo.join("blobs/abc123"), "the text").unwrap();
        let flat = repo.join("snapshots/c0/input.txt");
        std::fs::write(&flat, "../../blobs/abc123").unwrap();
        assert_eq!(follow_flattened_link(flat.clone()), flat.parent().unwrap().join("../../blobs/abc123"));
        let nested = repo.join("snapshots/c0/sub/input.txt");
        std::fs::write(&nested, "../../../blobs/abc123").unwrap();
        assert_eq!(std::fs::read_to_string(follow_flattened_link(nested)).unwrap(), "the text");
        // Link text to a missing blob, or ordinary text, stays as it is.
        for text in ["../../blobs/missing", "hello", "../blobs/abc123", "../../blobs/../x"] {
            std::fs::write(&flat, text).unwrap();
            assert_eq!(follow_flattened_link(flat.clone()), flat, "{text}");
        }
    }

    #[test]
    fn parses_hub_specs() {
        let f = HubFile::parse("hf://a/b/dir/c.txt").unwrap();
        assert_eq!((f.owner.as_str(), f.name.as_str(), f.file.as_str()), ("a", "b", "dir/c.txt"));
        for bad in ["hf:/a/b/c", "hf://a/b", "hf://a//c", "hf:///b/c", "hf://a/b/", "hf://a/b/d//c"] {
            let err = HubFile::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("hf://OWNER/NAME/FILE"), "{bad}: {err}");
        }
    }
}
