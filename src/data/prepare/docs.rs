//! Documents read from the input files in bounded pieces, so memory does not grow with a file.
//!
//! - Text: documents end at the separator (default `<|endoftext|>`; with an empty separator the
//!   whole file is one document). Whitespace around a document is trimmed and whitespace-only
//!   documents are skipped. A document longer than [`MAX_PIECE`] bytes comes in pieces cut after a
//!   `'\n'` between two ASCII non-space bytes, where the GPT-2 pre-tokenizer splits anyway (so a
//!   byte-level BPE gives the same ids as for the whole document).
//! - JSON lines: one document per line, its string field (default `text`) as it is; blank lines
//!   and empty strings are skipped. A line that is not JSON, or lacks the field, is refused (the
//!   error names file, line and byte offset): nothing is dropped silently.
//!
//! - Parquet (feature `parquet`): one document per row of the text column (`--text-field`); a
//!   position is a row index, not a byte offset.
//!
//! Invalid UTF-8 is refused, naming the file and the byte offset.

use super::inputs::{Format, Input};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};

/// The longest piece of a document handed to the tokenizer at once.
pub const MAX_PIECE: usize = 8 << 20;
/// Bytes read from a text file per read call.
const READ_BLOCK: usize = 1 << 20;
/// A document this long without a place to cut it is refused.
const MAX_UNCUT: usize = 256 << 20;

/// Where a document starts: input index, byte offset in that file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Pos {
    pub input: usize,
    pub offset: u64,
}

/// A piece of a document.
#[derive(Debug)]
pub struct Piece {
    pub text: String,
    /// The document's index over all inputs (documents counted in reading order).
    pub doc: u64,
    /// The document's first piece (an end-of-text token goes before it).
    pub first: bool,
    /// The document's last piece; then `after` is where the next document starts.
    pub last: bool,
    pub after: Pos,
    /// The input the piece came from.
    pub input: usize,
}

/// Reading options.
#[derive(Clone, Debug)]
pub struct DocOptions {
    pub separator: String,
    pub text_field: String,
}

/// Reads documents from `inputs`, starting at `from` with document index `doc`.
pub struct DocReader<'a> {
    inputs: &'a [Input],
    opts: DocOptions,
    next_input: usize,
    current: Option<(usize, FileReader)>,
    doc: u64,
    start: Pos,
}

enum FileReader {
    Text(TextReader),
    Jsonl(JsonlReader),
    #[cfg(feature = "parquet")]
    Parquet(super::parquet_docs::ParquetReader, u64),
}

impl<'a> DocReader<'a> {
    pub fn new(inputs: &'a [Input], opts: DocOptions, from: Pos, doc: u64) -> Self {
        Self { inputs, opts, next_input: from.input, current: None, doc, start: from }
    }

    /// Bytes of all inputs before the reading position (for a progress bar).
    pub fn bytes_done(&self) -> u64 {
        let before: u64 = self.inputs[..self.next_input.min(self.inputs.len())].iter().map(|i| i.bytes).sum();
        match &self.current {
            Some((i, r)) => before - self.inputs[*i].bytes + r.offset(),
            None => before,
        }
    }

    /// The next piece, or None after the last input.
    pub fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            if self.current.is_none() {
                if self.next_input >= self.inputs.len() {
                    return Ok(None);
                }
                let i = self.next_input;
                let offset = if i == self.start.input { self.start.offset } else { 0 };
                let input = &self.inputs[i];
                let r = match input.format {
                    Format::Text => FileReader::Text(TextReader::open(input, offset, &self.opts.separator)?),
                    Format::Jsonl => FileReader::Jsonl(JsonlReader::open(input, offset, &self.opts.text_field)?),
                    #[cfg(feature = "parquet")]
                    Format::Parquet => FileReader::Parquet(
                        super::parquet_docs::ParquetReader::open(input, offset, &self.opts.text_field)?,
                        input.bytes,
                    ),
                    #[cfg(not(feature = "parquet"))]
                    Format::Parquet => bail!(
                        "source {} is parquet: rebuild gumbel-moe with `--features parquet` to read it",
                        input.name
                    ),
                };
                self.current = Some((i, r));
                self.next_input += 1;
            }
            let (i, r) = self.current.as_mut().expect("opened above");
            let raw = match r {
                FileReader::Text(t) => t.next()?,
                FileReader::Jsonl(j) => j.next()?,
                #[cfg(feature = "parquet")]
                FileReader::Parquet(p, _) => p.next()?,
            };
            let Some((text, first, last, after)) = raw else {
                self.current = None;
                continue;
            };
            let input = *i;
            if first && last && text.is_empty() {
                continue;
            }
            let doc = self.doc;
            if last {
                self.doc += 1;
            }
            return Ok(Some(Piece { text, doc, first, last, after: Pos { input, offset: after }, input }));
        }
    }
}

impl FileReader {
    fn offset(&self) -> u64 {
        match self {
            FileReader::Text(t) => t.base + t.buf.len() as u64,
            FileReader::Jsonl(j) => j.offset,
            #[cfg(feature = "parquet")]
            FileReader::Parquet(p, bytes) => (p.fraction_done() * *bytes as f64) as u64,
        }
    }
}

/// Checks UTF-8, naming the file and the byte offset of the first bad byte.
fn utf8(bytes: Vec<u8>, name: &str, at: u64) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let bad = e.utf8_error().valid_up_to();
        anyhow::anyhow!(
            "source {name} is not valid UTF-8: invalid byte 0x{:02x} at byte offset {}",
            e.as_bytes()[bad],
            at + bad as u64
        )
    })
}

/// A text file's documents, a bounded buffer at a time.
struct TextReader {
    name: String,
    file: std::fs::File,
    sep: Vec<u8>,
    /// Bytes read and not yet compacted away; `buf[0]` is at file offset `base`.
    buf: Vec<u8>,
    base: u64,
    /// Where the unconsumed bytes start in `buf`.
    pos: usize,
    /// `buf[..scanned]` holds no separator start beyond what was consumed.
    scanned: usize,
    eof: bool,
    /// A document has started (its next piece is a continuation).
    in_doc: bool,
}

/// Where a long document may be cut: after a '\n' whose neighbours are ASCII non-space bytes.
fn safe_cut(buf: &[u8], limit: usize) -> Option<usize> {
    let ok = |b: u8| b.is_ascii_graphic();
    (1..limit.min(buf.len().saturating_sub(1))).rev().find(|&i| buf[i] == b'\n' && ok(buf[i - 1]) && ok(buf[i + 1]))
}

impl TextReader {
    fn open(input: &Input, offset: u64, sep: &str) -> Result<Self> {
        let mut file =
            std::fs::File::open(&input.path).with_context(|| format!("cannot open source {}", input.name))?;
        file.seek(SeekFrom::Start(offset)).with_context(|| format!("cannot seek in source {}", input.name))?;
        Ok(Self {
            name: input.name.clone(),
            file,
            sep: sep.as_bytes().to_vec(),
            buf: Vec::new(),
            base: offset,
            pos: 0,
            scanned: 0,
            eof: false,
            in_doc: false,
        })
    }

    /// Copies the next `n` unconsumed bytes out as a piece (an allocation of their own, so pieces
    /// never hold the read buffer) and consumes `skip` more (the separator).
    fn take(&mut self, n: usize, skip: usize, last: bool) -> Result<(String, bool, bool, u64)> {
        let at = self.base + self.pos as u64;
        let bytes = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n + skip;
        self.scanned = if skip > 0 { self.pos } else { self.scanned.max(self.pos) };
        let first = !self.in_doc;
        self.in_doc = !last;
        let mut text = utf8(bytes, &self.name, at)?;
        if last {
            text.truncate(text.trim_end().len());
        }
        if first {
            let lead = text.len() - text.trim_start().len();
            text.drain(..lead);
        }
        Ok((text, first, last, self.base + self.pos as u64))
    }

    /// The next piece: (text, first, last, offset after it).
    fn next(&mut self) -> Result<Option<(String, bool, bool, u64)>> {
        loop {
            if !self.sep.is_empty() {
                let from = self.pos.max(self.scanned.saturating_sub(self.sep.len() - 1));
                if let Some(i) = memchr::memmem::find(&self.buf[from..], &self.sep) {
                    return self.take(from + i - self.pos, self.sep.len(), true).map(Some);
                }
                self.scanned = self.buf.len();
            }
            let avail = self.buf.len() - self.pos;
            if self.eof {
                if avail == 0 && !self.in_doc {
                    return Ok(None);
                }
                return self.take(avail, 0, true).map(Some);
            }
            if avail >= MAX_PIECE {
                if let Some(cut) = safe_cut(&self.buf[self.pos..], MAX_PIECE) {
                    return self.take(cut + 1, 0, false).map(Some);
                }
                if avail >= MAX_UNCUT {
                    bail!(
                        "source {}: a document of more than {} MB from byte offset {} has no line break to cut it at",
                        self.name,
                        MAX_UNCUT >> 20,
                        self.base + self.pos as u64
                    );
                }
            }
            // Drop the consumed bytes, then read more.
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.scanned -= self.pos.min(self.scanned);
            self.pos = 0;
            let len = self.buf.len();
            self.buf.resize(len + READ_BLOCK, 0);
            let got =
                self.file.read(&mut self.buf[len..]).with_context(|| format!("cannot read source {}", self.name))?;
            self.buf.truncate(len + got);
            self.eof = got == 0;
        }
    }
}

/// A JSON-lines file's documents, one line at a time.
struct JsonlReader {
    name: String,
    reader: BufReader<std::fs::File>,
    field: String,
    offset: u64,
    line: u64,
    line_known: bool,
}

impl JsonlReader {
    fn open(input: &Input, offset: u64, field: &str) -> Result<Self> {
        let mut file =
            std::fs::File::open(&input.path).with_context(|| format!("cannot open source {}", input.name))?;
        file.seek(SeekFrom::Start(offset)).with_context(|| format!("cannot seek in source {}", input.name))?;
        Ok(Self {
            name: input.name.clone(),
            reader: BufReader::with_capacity(1 << 20, file),
            field: field.to_string(),
            offset,
            line: 0,
            line_known: offset == 0,
        })
    }

    fn next(&mut self) -> Result<Option<(String, bool, bool, u64)>> {
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            let at = self.offset;
            let n = self
                .reader
                .read_until(b'\n', &mut bytes)
                .with_context(|| format!("cannot read source {}", self.name))?;
            if n == 0 {
                return Ok(None);
            }
            self.offset += n as u64;
            self.line += 1;
            let line = if self.line_known { format!("line {}", self.line) } else { "a line".to_string() };
            let text = utf8(std::mem::take(&mut bytes), &self.name, at)?;
            if text.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "source {} {line} (byte offset {at}) is not valid JSON: {e}; fix or remove the line (bad lines \
                     are refused, not skipped)",
                    self.name
                )
            })?;
            let Some(doc) = value.get(&self.field).and_then(|v| v.as_str()) else {
                bail!(
                    "source {} {line} (byte offset {at}) has no string field {:?} (choose the field with --text-field)",
                    self.name,
                    self.field
                );
            };
            if doc.is_empty() {
                continue;
            }
            return Ok(Some((doc.to_string(), true, true, self.offset)));
        }
    }
}
