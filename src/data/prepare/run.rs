//! The `prepare` pipeline: documents read in bounded batches, tokenized in parallel, written in
//! reading order into train and validation shards, the manifest last.
//!
//! The output depends only on the inputs and the options, never on the thread count: each batch's
//! documents are tokenized side by side and written in order. A killed run leaves its published
//! shards and `prepare.progress.json`; run again, it discards temporary files and continues after
//! the last published shard of each split.

use super::docs::{DocOptions, DocReader, Piece, Pos};
use super::inputs::{expand, Input};
use super::progress::{Progress, SplitProgress, PROGRESS_FILE};
use super::tokenizer_setup::{self, TokenizerChoice};
use crate::data::hub::HubOptions;
use crate::data::prepared::{file_sha256, kind_name};
use crate::data::store::atomic::{publish, remove_tmp_files, tmp_path};
use crate::data::store::format::{token_width, VERSION};
use crate::data::store::manifest::FORMAT;
use crate::data::store::{shard_name, Manifest, ShardSpec, ShardWriter, SourceInfo, TokenizerInfo};
use crate::data::store::{MANIFEST_FILE, TOKENIZER_FILE};
use crate::data::Tokenizer;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Text bytes read per batch (tokenized side by side, then written in order).
const BATCH_BYTES: usize = 8 << 20;

/// What `prepare` does.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub sources: Vec<String>,
    /// Validation sources; when empty, `val_fraction` of the documents are drawn for validation.
    pub val_sources: Vec<String>,
    pub out: PathBuf,
    pub tokenizer: TokenizerChoice,
    /// Bytes of training documents (the first ones, in reading order) the tokenizer learns from.
    pub sample_bytes: u64,
    pub val_fraction: f64,
    /// Document separator of text sources; empty: a whole file is one document.
    pub separator: String,
    /// The field of a JSON line that holds the document.
    pub text_field: String,
    /// A shard is closed at the first document end at or past this many tokens (the other split's
    /// open shard closes with it, so both record the same point to continue from).
    pub shard_tokens: u64,
    /// The end-of-text token put before every document.
    pub eot: String,
    pub hub: HubOptions,
    pub progress: bool,
    /// Stop with an error right after the shards are closed this many times, as a kill would (tests).
    pub stop_after_shards: Option<usize>,
}

impl PrepareOptions {
    /// The defaults for `sources` into `out`: a byte-level BPE of 8,192 tokens trained on the first
    /// 64 MiB, 0.5% of the documents for validation, `<|endoftext|>` separating documents, shards of
    /// 100M tokens (llm.c's size).
    pub fn new(sources: Vec<String>, out: &Path) -> Self {
        Self {
            sources,
            val_sources: Vec::new(),
            out: out.to_path_buf(),
            tokenizer: TokenizerChoice::Bpe { vocab_size: 8192 },
            sample_bytes: 64 << 20,
            val_fraction: 0.005,
            separator: "<|endoftext|>".into(),
            text_field: "text".into(),
            shard_tokens: 100_000_000,
            eot: "<|endoftext|>".into(),
            hub: HubOptions::from_env(),
            progress: false,
            stop_after_shards: None,
        }
    }
}

/// What a finished `prepare` made.
#[derive(Clone, Debug)]
pub struct Summary {
    pub manifest: Manifest,
    pub manifest_sha256: String,
    /// Whether an interrupted run was continued.
    pub resumed: bool,
    pub wall_s: f64,
    pub bytes: u64,
}

/// Whether document `doc` is drawn for validation: a fixed hash of its index below the fraction.
fn drawn_for_val(doc: u64, fraction: f64) -> bool {
    let mut z = doc.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

struct Router<'a> {
    inputs: &'a [Input],
    by_source: bool,
    fraction: f64,
}

impl Router<'_> {
    fn is_val(&self, p: &Piece) -> bool {
        if self.by_source {
            self.inputs[p.input].val
        } else {
            drawn_for_val(p.doc, self.fraction)
        }
    }
}

/// The first `bytes` of training documents, in reading order.
fn sample(inputs: &[Input], doc_opts: &DocOptions, router: &Router, bytes: u64) -> Result<Vec<String>> {
    let mut reader = DocReader::new(inputs, doc_opts.clone(), Pos::default(), 0);
    let (mut docs, mut total) = (Vec::new(), 0u64);
    while total < bytes {
        let Some(p) = reader.next_piece()? else { break };
        if !router.is_val(&p) && !p.text.is_empty() {
            total += p.text.len() as u64;
            docs.push(p.text);
        }
    }
    Ok(docs)
}

fn settings(o: &PrepareOptions, inputs: &[Input]) -> serde_json::Value {
    serde_json::json!({
        "format_version": VERSION,
        "inputs": inputs,
        "tokenizer": o.tokenizer,
        "sample_bytes": o.sample_bytes,
        "val_fraction": if o.val_sources.is_empty() { Some(o.val_fraction) } else { None },
        "separator": o.separator,
        "text_field": o.text_field,
        "shard_tokens": o.shard_tokens,
        "eot": o.eot,
    })
}

/// The keys of two settings objects that differ (for the refusal message).
fn differing(a: &serde_json::Value, b: &serde_json::Value) -> String {
    let keys: Vec<&String> = a.as_object().map(|m| m.keys().collect()).unwrap_or_default();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

/// Removes published shards past those the progress file records (a run killed between publishing
/// a shard and recording it).
fn remove_unrecorded(dir: &Path, split: &str, kept: usize) -> Result<()> {
    let mut i = kept;
    loop {
        let p = dir.join(shard_name(split, i));
        if !p.exists() {
            return Ok(());
        }
        std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        i += 1;
    }
}

/// Starts or continues the prepare of `o.out`.
fn start(o: &PrepareOptions, inputs: &[Input], doc_opts: &DocOptions, router: &Router) -> Result<(Progress, bool)> {
    let wanted = settings(o, inputs);
    if let Some(p) = Progress::read(&o.out)? {
        if p.settings != wanted {
            bail!(
                "{} holds an interrupted prepare with other settings (they differ in: {}); run it with the same \
                 sources and options to finish it, or choose another --out",
                o.out.display(),
                differing(&p.settings, &wanted)
            );
        }
        return Ok((p, true));
    }
    let docs = if o.tokenizer.needs_sample() { sample(inputs, doc_opts, router, o.sample_bytes)? } else { Vec::new() };
    if o.tokenizer.needs_sample() && docs.is_empty() {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        bail!("empty corpus: the training sources hold no document ({})", names.join(", "));
    }
    let path = o.out.join(TOKENIZER_FILE);
    let tmp = tmp_path(&path);
    let eot_id = tokenizer_setup::build(&o.tokenizer, &docs, &o.eot, &tmp)?;
    publish(&tmp, &path)?;
    let p = Progress {
        settings: wanted,
        tokenizer_sha256: file_sha256(&path)?,
        eot_id,
        train: SplitProgress::default(),
        val: SplitProgress::default(),
    };
    p.write(&o.out)?;
    Ok((p, false))
}

/// Prepares `o.sources` into `o.out` (see the module docs).
pub fn prepare(o: &PrepareOptions) -> Result<Summary> {
    let t0 = Instant::now();
    if !(0.0..1.0).contains(&o.val_fraction) {
        bail!("--val-fraction {} must be in [0, 1)", o.val_fraction);
    }
    if o.shard_tokens == 0 {
        bail!("--shard-tokens must be at least 1");
    }
    if o.out.join(MANIFEST_FILE).exists() {
        bail!("{} already holds a prepared corpus (manifest.json); choose another --out", o.out.display());
    }
    let inputs = expand(&o.sources, &o.val_sources, &o.hub)?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
    for name in remove_tmp_files(&o.out)? {
        eprintln!("note: removed {name}, a file a killed prepare left half written");
    }
    let doc_opts = DocOptions { separator: o.separator.clone(), text_field: o.text_field.clone() };
    let router = Router { inputs: &inputs, by_source: !o.val_sources.is_empty(), fraction: o.val_fraction };
    let (mut progress, resumed) = start(o, &inputs, &doc_opts, &router)?;
    let tok_path = o.out.join(TOKENIZER_FILE);
    let found = file_sha256(&tok_path)?;
    if found != progress.tokenizer_sha256 {
        bail!(
            "{} has sha256 {found}, but the shards already written were made with sha256 {}; delete {} to start over",
            tok_path.display(),
            progress.tokenizer_sha256,
            o.out.join(PROGRESS_FILE).display()
        );
    }
    let tokenizer = tokenizer_setup::load(&tok_path)?;
    let vocab = tokenizer.vocab_size();
    let sha: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&progress.tokenizer_sha256[2 * i..2 * i + 2], 16))
        .collect::<std::result::Result<Vec<u8>, _>>()?
        .try_into()
        .map_err(|_| anyhow::anyhow!("malformed tokenizer hash in the progress file"))?;
    let spec = ShardSpec { vocab_size: vocab as u32, eot_id: progress.eot_id, tokenizer_sha256: sha };
    let mut writers = [false, true].map(|val| {
        let (name, sp) = if val { ("val", &progress.val) } else { ("train", &progress.train) };
        (name, ShardWriter::new(&o.out, name, spec.clone(), sp.shards.len()))
    });
    for (name, sp) in [("train", &progress.train), ("val", &progress.val)] {
        remove_unrecorded(&o.out, name, sp.shards.len())?;
    }
    // Both splits record the same point (they close together).
    let from = &progress.train;
    let mut reader = DocReader::new(&inputs, doc_opts, from.resume, from.next_doc);
    let total_bytes: u64 = inputs.iter().map(|i| i.bytes).sum();
    let pb = if o.progress { ProgressBar::new(total_bytes) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("static template"),
    );
    let (mut open_docs, mut tokens, mut published) = ([0u64; 2], 0u64, 0usize);
    loop {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while bytes < BATCH_BYTES {
            let Some(p) = reader.next_piece()? else { break };
            bytes += p.text.len();
            batch.push(p);
        }
        if batch.is_empty() {
            break;
        }
        let ids: Vec<Result<Vec<u32>>> = batch.par_iter().map(|p| encode(&tokenizer, p, &inputs)).collect();
        for (p, ids) in batch.iter().zip(ids) {
            let v = usize::from(router.is_val(p));
            if p.doc < progress.split_mut(v == 1).next_doc {
                continue;
            }
            let ids = ids?;
            let w = &mut writers[v].1;
            if p.first {
                w.push(&[spec.eot_id])?;
                tokens += 1;
            }
            w.push(&ids)?;
            tokens += ids.len() as u64;
            if !p.last {
                continue;
            }
            open_docs[v] += 1;
            if w.open_tokens() >= o.shard_tokens {
                // Both splits close here, so a rerun continues from this document on.
                for (k, (_, w)) in writers.iter_mut().enumerate() {
                    let sp = progress.split_mut(k == 1);
                    if let Some(info) = w.close()? {
                        sp.shards.push(info);
                        sp.documents += std::mem::take(&mut open_docs[k]);
                    }
                    sp.next_doc = p.doc + 1;
                    sp.resume = p.after;
                }
                progress.write(&o.out)?;
                published += 1;
                if o.stop_after_shards == Some(published) {
                    bail!("stopped after {published} shard closes, as asked (stop_after_shards)");
                }
            }
        }
        let done = reader.bytes_done();
        pb.set_position(done);
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!("{tokens} tokens, {:.0} tok/s", tokens as f64 / secs));
    }
    for (val, (_, w)) in writers.iter_mut().enumerate() {
        let sp = progress.split_mut(val == 1);
        if let Some(info) = w.close()? {
            sp.shards.push(info);
            sp.documents += open_docs[val];
        }
    }
    pb.finish_and_clear();
    let names = || inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ");
    if progress.train.shards.is_empty() {
        bail!("empty corpus: the training split has no document ({})", names());
    }
    if progress.val.shards.is_empty() {
        let how = if router.by_source {
            "the --val-source files hold no document".to_string()
        } else {
            format!(
                "--val-fraction {} drew none of the {} documents; raise it or give --val-source",
                o.val_fraction, progress.train.documents
            )
        };
        bail!("the validation split is empty: {how}");
    }
    let manifest = manifest_of(o, &inputs, &progress, &tokenizer)?;
    manifest.write(&o.out)?;
    let progress_path = o.out.join(PROGRESS_FILE);
    std::fs::remove_file(&progress_path).with_context(|| format!("cannot remove {}", progress_path.display()))?;
    let (manifest, manifest_sha256) = Manifest::read(&o.out)?;
    Ok(Summary { manifest, manifest_sha256, resumed, wall_s: t0.elapsed().as_secs_f64(), bytes: total_bytes })
}

/// Token ids of one piece; errors name the source.
fn encode(tokenizer: &Tokenizer, p: &Piece, inputs: &[Input]) -> Result<Vec<u32>> {
    tokenizer
        .encode(&p.text)
        .with_context(|| format!("tokenizing document {} of source {}", p.doc, inputs[p.input].name))
}

fn manifest_of(o: &PrepareOptions, inputs: &[Input], p: &Progress, tokenizer: &Tokenizer) -> Result<Manifest> {
    let how_val = if o.val_sources.is_empty() {
        format!("validation: {} of the documents, drawn by a fixed hash of each document's index", o.val_fraction)
    } else {
        "validation: the documents of the --val-source files".to_string()
    };
    let sample = if o.tokenizer.needs_sample() {
        format!("tokenizer trained on the first {} bytes of training documents", o.sample_bytes)
    } else {
        "tokenizer taken from a file".to_string()
    };
    Ok(Manifest {
        format: FORMAT.into(),
        version: VERSION,
        tokenizer: TokenizerInfo {
            file: TOKENIZER_FILE.into(),
            sha256: p.tokenizer_sha256.clone(),
            kind: kind_name(&tokenizer.kind()).into(),
            vocab_size: tokenizer.vocab_size(),
            eot_id: p.eot_id,
            eot_token: o.eot.clone(),
        },
        token_width: token_width(tokenizer.vocab_size()),
        train: p.train.shards.clone(),
        val: p.val.shards.clone(),
        train_documents: p.train.documents,
        val_documents: p.val.documents,
        sources: inputs
            .iter()
            .map(|i| SourceInfo {
                name: i.name.clone(),
                bytes: i.bytes,
                split: match (i.val, o.val_sources.is_empty()) {
                    (true, _) => "val",
                    (false, false) => "train",
                    (false, true) => "train+val",
                }
                .into(),
            })
            .collect(),
        notes: vec![
            "an end-of-text token precedes every document".into(),
            how_val,
            sample,
            format!(
                "shards close at the first document end at or past {} tokens, the other split's with them",
                o.shard_tokens
            ),
            format!("text sources: documents separated by {:?}, trimmed", o.separator),
        ],
    })
}
