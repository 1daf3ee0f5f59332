//! metrics.jsonl: one JSON object per line, appended and flushed as training goes, so a crash or a
//! resume keeps every line already written.
//!
//! Each line, newline included, goes out in one write call, so a kill leaves at most the last line
//! torn (cut short, without its newline). Readers skip such a last line, and opening the file to
//! append (or a resume) cuts it off; a bad line anywhere else is an error.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl` for appending (a resumed run continues the same file), first
    /// cutting off a torn last line.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        drop_torn_tail(&path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file, path })
    }

    pub fn write(&mut self, v: &Value) -> Result<()> {
        write_line(&mut self.file, v).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Writes `v` and its newline with a single `write_all` on one buffer (one write call for a file).
pub fn write_line<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())?;
    w.flush()
}

/// Reads every line of a metrics file (for resumes, tests and tools); a torn last line is left out.
pub fn read(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (lines, _) = parse(&text, path)?;
    Ok(lines)
}

/// The lines of `text`, and the byte length of its untorn part.
fn parse(text: &str, path: &Path) -> Result<(Vec<Value>, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let complete = line.ends_with('\n');
        match serde_json::from_str::<Value>(line.trim_end_matches(['\n', '\r'])) {
            Ok(v) => out.push(v),
            Err(_) if line.trim().is_empty() => {}
            // Only the very last line can be torn: it is the one without a newline.
            Err(_) if !complete => break,
            Err(e) => bail!("{}:{}: bad JSON ({e})", path.display(), i + 1),
        }
        at += line.len();
    }
    Ok((out, at))
}

/// Cuts a torn last line off `path`, and ends a whole last line that lost its newline with one, so
/// the next line appended starts on its own (a missing file is fine).
fn drop_torn_tail(path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let (_, keep) = parse(&text, path)?;
    let open = || OpenOptions::new().append(true).open(path).with_context(|| format!("cannot open {}", path.display()));
    if keep < text.len() {
        open()?.set_len(keep as u64).with_context(|| format!("cannot cut the torn last line of {}", path.display()))?;
    }
    if keep > 0 && !text[..keep].ends_with('\n') {
        open()?.write_all(b"\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Drops the lines whose `step` is beyond `step` (written after the checkpoint a run resumes from),
/// the `event` lines and a torn last line, so the resumed run's lines follow on without
/// duplicates. Rewritten atomically.
pub fn truncate_after(dir: &Path, step: u64) -> Result<()> {
    let path = dir.join(METRICS_FILE);
    if !path.exists() {
        return Ok(());
    }
    let keep: String = read(&path)?
        .into_iter()
        .filter(|v| v.get("step").and_then(Value::as_u64).is_none_or(|s| s <= step) && v.get("event").is_none())
        .map(|v| format!("{v}\n"))
        .collect();
    let tmp = dir.join(format!(".tmp-{METRICS_FILE}"));
    std::fs::write(&tmp, keep).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Counts the write calls it gets.
    struct Counting(Vec<u8>, usize);

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.1 += 1;
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_is_one_write_call() {
        let mut w = Counting(Vec::new(), 0);
        let v = json!({"step": 3, "train_loss": 1.25, "tokens_per_expert": [[1, 2], [3, 4]], "name": "a b"});
        write_line(&mut w, &v).unwrap();
        assert_eq!(w.1, 1);
        assert_eq!(String::from_utf8(w.0).unwrap(), format!("{v}\n"));
    }

    #[test]
    fn only_a_torn_last_line_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(METRICS_FILE);
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"st").unwrap();
        assert_eq!(read(&p).unwrap(), [json!({"step": 1}), json!({"step": 2})]);
        // A last line that is whole but lost its newline still counts.
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}").unwrap();
        assert_eq!(read(&p).unwrap().len(), 2);
        // A bad line before the end is corruption, not a torn write.
        std::fs::write(&p, "{\"step\":1}\n{\"st\n{\"step\":2}\n").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2") && e.contains("bad JSON"), "{e}");
        // Opening for append cuts the torn tail, so the next line starts on its own.
        std::fs::write(&p, "{\"step\":1}\n{\"st").unwrap();
        let mut w = MetricsWriter::open(d.path()).unwrap();
        w.write(&json!({"step": 2})).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"step\":1}\n{\"step\":2}\n");
        std::fs::write(&p, "{\"step\":1}").unwrap();
        MetricsWriter::open(d.path()).unwrap().write(&json!({"step": 2})).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"step\":1}\n{\"step\":2}\n");
    }
}
