//! Files in Hugging Face dataset repos, `hf://OWNER/NAME/FILE`, read through the `hf-hub` cache.
//!
//! `FILE` may contain slashes; the revision is `main`. The cache is [`HubOptions::cache_dir`] when
//! set, else what `hf-hub` resolves: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`. `hf-hub` does not read `HF_HUB_OFFLINE`; [`HubOptions::from_env`]
//! does, and an offline lookup only looks in the cache so that nothing waits on the network.

use anyhow::Result;
use std::path::PathBuf;

/// The prefix of a hub spec.
pub const HUB_PREFIX: &str = "hf://";

/// The form a hub spec must take, quoted in errors.
const HUB_FORM: &str = "hf://OWNER/NAME/FILE (a file in a Hugging Face dataset repo, e.g. \
                        hf://SamPIngram/tinyshakespeare/input.txt)";

/// Where and how hub files are looked up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HubOptions {
    /// The hub cache (the folder holding `datasets--OWNER--NAME`); None: `hf-hub`'s own choice
    /// from the environment.
    pub cache_dir: Option<PathBuf>,
    /// Look only in the cache, never on the network.
    pub offline: bool,
}

impl HubOptions {
    /// The cache from the environment (through `hf-hub`), offline when `HF_HUB_OFFLINE` is "1",
    /// "true", "yes" or "on" (any case).
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self { cache_dir: None, offline }
    }
}

/// A file in a Hugging Face dataset repo, parsed from `hf://OWNER/NAME/FILE`.
#[derive(Debug, PartialEq)]
pub struct HubFile {
    pub owner: String,
    pub name: String,
    pub file: String,
}

impl HubFile {
    /// Parses a hub spec; every part must be non-empty and `FILE` must not have empty segments.
    pub fn parse(spec: &str) -> Result<Self> {
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

    /// The file's local path in the cache (a flattened snapshot link followed to its blob),
    /// downloading it first unless `hub.offline`. Retries are off so a missing network fails at once.
    #[cfg(feature = "hub")]
    pub fn fetch(&self, hub: &HubOptions) -> Result<PathBuf> {
        use anyhow::Context;
        let mut builder = hf_hub::HFClient::builder().retry_max_attempts(0);
        if let Some(dir) = &hub.cache_dir {
            builder = builder.cache_dir(dir.clone());
        }
        let client = builder.build().context("cannot set up the Hugging Face hub client")?;
        let cache = client.cache_dir().to_path_buf();
        let sync = hf_hub::HFClientSync::from_inner(client).context("cannot start the Hugging Face hub client")?;
        let repo = sync.dataset(self.owner.as_str(), self.name.as_str());
        let result = repo.download_file().filename(self.file.as_str()).local_files_only(hub.offline).send();
        let path = result.map_err(|e| {
            let repo = format!("{}/{}", self.owner, self.name);
            let file = &self.file;
            let cache = cache.display();
            if hub.offline {
                anyhow::anyhow!(
                    "file {file:?} of Hugging Face dataset {repo} (revision main) is not in the hub cache \
                     {cache}; the lookup was offline (HF_HUB_OFFLINE or an offline caller) ({e})"
                )
            } else {
                anyhow::anyhow!(
                    "cannot fetch file {file:?} of Hugging Face dataset {repo} (revision main, hub cache \
                     {cache}): {e}"
                )
            }
        })?;
        Ok(follow_flattened_link(path))
    }

    /// The files of the repo (revision `main`) whose paths match `FILE` as a glob (`*` stays within
    /// a folder, `**` crosses folders), sorted by path. Online the repo's tree is listed on the hub;
    /// offline the cached snapshot of `main` is listed (so only cached files are found).
    #[cfg(feature = "hub")]
    pub fn expand_glob(&self, hub: &HubOptions) -> Result<Vec<HubFile>> {
        use anyhow::Context;
        let repo = format!("{}/{}", self.owner, self.name);
        let pattern =
            glob::Pattern::new(&self.file).with_context(|| format!("hf://{repo}/{}: not a valid glob", self.file))?;
        let opts = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
        let mut builder = hf_hub::HFClient::builder().retry_max_attempts(0);
        if let Some(dir) = &hub.cache_dir {
            builder = builder.cache_dir(dir.clone());
        }
        let client = builder.build().context("cannot set up the Hugging Face hub client")?;
        let cache = client.cache_dir().to_path_buf();
        let mut paths = Vec::new();
        if hub.offline {
            let root = cache.join(format!("datasets--{}--{}", self.owner, self.name));
            let commit = std::fs::read_to_string(root.join("refs/main")).with_context(|| {
                format!("dataset {repo} is not in the hub cache {} (offline lookup)", cache.display())
            })?;
            let snap = root.join("snapshots").join(commit.trim());
            let mut stack = vec![snap.clone()];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
                    let p = e.with_context(|| format!("cannot list {}", dir.display()))?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(rel) = p.strip_prefix(&snap) {
                        paths.push(rel.to_string_lossy().replace('\\', "/"));
                    }
                }
            }
        } else {
            let sync = hf_hub::HFClientSync::from_inner(client).context("cannot start the Hugging Face hub client")?;
            let entries = sync
                .dataset(self.owner.as_str(), self.name.as_str())
                .list_tree()
                .recursive(true)
                .send()
                .map_err(|e| anyhow::anyhow!("cannot list the files of Hugging Face dataset {repo}: {e}"))?;
            for e in entries {
                if let hf_hub::repository::RepoTreeEntry::File { path, .. } = e {
                    paths.push(path);
                }
            }
        }
        paths.retain(|p| pattern.matches_with(p, opts));
        paths.sort();
        if paths.is_empty() {
            let where_ = if hub.offline { "in the cached snapshot (offline)" } else { "on the hub" };
            anyhow::bail!("hf://{repo}/{}: the glob matches no file of dataset {repo} {where_}", self.file);
        }
        Ok(paths.into_iter().map(|file| HubFile { owner: self.owner.clone(), name: self.name.clone(), file }).collect())
    }

    /// Without the `hub` feature there are no hub globs.
    #[cfg(not(feature = "hub"))]
    pub fn expand_glob(&self, _hub: &HubOptions) -> Result<Vec<HubFile>> {
        anyhow::bail!("cannot list hf://{}/{}: gumbel-moe was built without the `hub` feature", self.owner, self.name)
    }

    /// Without the `hub` feature (the Apple-target type check) there is no hub client.
    #[cfg(not(feature = "hub"))]
    pub fn fetch(&self, _hub: &HubOptions) -> Result<PathBuf> {
        anyhow::bail!(
            "cannot read hf://{}/{}/{}: gumbel-moe was built without the `hub` feature",
            self.owner,
            self.name,
            self.file
        )
    }
}

/// The hub cache stores a snapshot file as a symlink `../../blobs/<etag>` (one more `../` per
/// folder in the file name). A copy made without symlink support (git with
/// `core.symlinks=false`, some archivers) turns it into a small plain file holding that link text;
/// such a file is followed to its blob when the blob exists. Any other path is returned unchanged.
pub fn follow_flattened_link(path: PathBuf) -> PathBuf {
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
