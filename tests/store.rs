//! The token store: shards written and read back, windows over them equal to windows over the
//! same tokens in memory, and every damaged shard refused with an error naming the file.

use gumbel_moe::data::store::format::{hex, sha256, HEADER_BYTES};
use gumbel_moe::data::store::{Manifest, ShardSet, ShardSpec, ShardWriter, TokenizerInfo};
use gumbel_moe::data::Batcher;
use std::path::Path;

const VOCAB: u32 = 300;

/// Tokens 0..n in a deterministic scramble below `vocab`.
fn tokens(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u64).map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % u64::from(vocab)) as u32).collect()
}

/// Writes `parts` as the train split (one shard per part) and `val` as the validation split,
/// with a manifest; returns the manifest.
fn write_set(dir: &Path, parts: &[&[u32]], val: &[u32], vocab: u32) -> Manifest {
    let sha = sha256(b"a tokenizer");
    let spec = ShardSpec { vocab_size: vocab, eot_id: 0, tokenizer_sha256: sha };
    let mut w = ShardWriter::new(dir, "train", spec.clone(), 0);
    let mut train = Vec::new();
    for p in parts {
        w.push(p).unwrap();
        train.push(w.close().unwrap().unwrap());
    }
    let mut v = ShardWriter::new(dir, "val", spec, 0);
    v.push(val).unwrap();
    let m = Manifest {
        format: "gumbel-moe-token-shards".into(),
        version: 1,
        tokenizer: TokenizerInfo {
            file: "tokenizer.json".into(),
            sha256: hex(&sha),
            kind: "bpe".into(),
            vocab_size: vocab as usize,
            eot_id: 0,
            eot_token: "<|endoftext|>".into(),
        },
        token_width: if vocab <= 65_536 { 2 } else { 4 },
        train,
        val: vec![v.close().unwrap().unwrap()],
        train_documents: 1,
        val_documents: 1,
        sources: vec![],
        notes: vec![],
    };
    m.write(dir).unwrap();
    m
}

#[test]
fn windows_over_shards_equal_windows_over_memory() {
    let d = tempfile::tempdir().unwrap();
    for vocab in [VOCAB, 70_000] {
        let all = tokens(1000, vocab);
        let (a, rest) = all.split_at(333);
        let (b, c) = rest.split_at(5);
        let m = write_set(d.path(), &[a, b, c], &all[..100], vocab);
        let (read, _) = Manifest::read(d.path()).unwrap();
        assert_eq!(read, m);
        let set = ShardSet::open(d.path(), &m, "train").unwrap();
        assert_eq!(set.len(), all.len());
        // Every window, including those across the two shard boundaries, reads back exactly.
        for off in [0, 300, 330, 334, 337, 338, 900, 990] {
            let mut out = Vec::new();
            set.read(off, 10, &mut out).unwrap();
            assert_eq!(out, &all[off..off + 10], "vocab {vocab} offset {off}");
        }
        let mem = Batcher::new(all.clone(), 16, 4, 7).unwrap();
        let mapped = Batcher::from_shards(set, 16, 4, 7).unwrap();
        for step in 0..20 {
            assert_eq!(mem.random_batch(step, 1), mapped.try_random_batch(step, 1).unwrap());
        }
        assert_eq!(mem.sequential_batches(), mapped.try_sequential_batches().unwrap());
        let width = std::fs::metadata(d.path().join("train-000000.bin")).unwrap().len() - HEADER_BYTES as u64;
        assert_eq!(width, 333 * if vocab <= 65_536 { 2 } else { 4 });
    }
}

/// Opens the train split and returns the error text.
fn open_err(dir: &Path, m: &Manifest) -> String {
    match ShardSet::open(dir, m, "train") {
        Ok(_) => panic!("a damaged shard was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn truncated_shard_is_refused_naming_file_and_sizes() {
    let d = tempfile::tempdir().unwrap();
    let all = tokens(500, VOCAB);
    let m = write_set(d.path(), &[&all], &all[..50], VOCAB);
    let path = d.path().join("train-000000.bin");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(HEADER_BYTES as u64 + 999).unwrap();
    let e = open_err(d.path(), &m);
    assert!(e.contains("train-000000.bin") && e.contains("truncated") && e.contains("2023 bytes"), "{e}");
    f.set_len(100).unwrap();
    let e = open_err(d.path(), &m);
    assert!(e.contains("train-000000.bin") && e.contains("shorter than its 1024-byte header"), "{e}");
}

#[test]
fn foreign_shard_is_refused_naming_its_magic() {
    let d = tempfile::tempdir().unwrap();
    let all = tokens(500, VOCAB);
    let m = write_set(d.path(), &[&all], &all[..50], VOCAB);
    let path = d.path().join("train-000000.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(b"LLMC\0\0\0\0");
    std::fs::write(&path, bytes).unwrap();
    let e = open_err(d.path(), &m);
    assert!(e.contains("train-000000.bin") && e.contains("not a gumbel-moe token shard") && e.contains("LLMC"), "{e}");
}

#[test]
fn header_disagreeing_with_the_manifest_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let all = tokens(500, VOCAB);
    let m = write_set(d.path(), &[&all[..200], &all[200..]], &all[..50], VOCAB);
    let mut lying = m.clone();
    lying.train[1].tokens += 1;
    let e = open_err(d.path(), &lying);
    assert!(
        e.contains("train-000001.bin") && e.contains("token count 300") && e.contains("manifest.json says 301"),
        "{e}"
    );
    let mut other_tok = m.clone();
    other_tok.tokenizer.sha256 = hex(&sha256(b"another tokenizer"));
    let e = open_err(d.path(), &other_tok);
    assert!(e.contains("train-000000.bin") && e.contains("tokenizer sha256"), "{e}");
    let mut other_vocab = m;
    other_vocab.tokenizer.vocab_size = 301;
    let e = open_err(d.path(), &other_vocab);
    assert!(e.contains("vocabulary size 300") && e.contains("says 301"), "{e}");
}

#[test]
fn token_id_at_or_above_the_vocabulary_is_refused_with_its_position() {
    let d = tempfile::tempdir().unwrap();
    let all = tokens(500, VOCAB);
    let m = write_set(d.path(), &[&all], &all[..50], VOCAB);
    // The writer refuses such an id outright.
    let spec = ShardSpec { vocab_size: VOCAB, eot_id: 0, tokenizer_sha256: [0; 32] };
    let e = ShardWriter::new(d.path(), "x", spec, 0).push(&[1, VOCAB]).unwrap_err().to_string();
    assert!(e.contains(&format!("token id {VOCAB}")), "{e}");
    // A shard damaged after it was written: token 123 becomes 300.
    let path = d.path().join("train-000000.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = HEADER_BYTES + 123 * 2;
    bytes[at..at + 2].copy_from_slice(&(VOCAB as u16).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let set = ShardSet::open(d.path(), &m, "train").unwrap();
    let mut out = Vec::new();
    set.read(0, 100, &mut out).unwrap();
    let e = set.read(120, 10, &mut out).unwrap_err().to_string();
    assert!(e.contains("train-000000.bin") && e.contains("token id 300 at token position 123"), "{e}");
    assert!(e.contains(&format!("byte offset {at}")), "{e}");
    // Through a batcher: the sequential (full validation) pass meets it.
    let b = Batcher::from_shards(ShardSet::open(d.path(), &m, "train").unwrap(), 16, 4, 0).unwrap();
    let e = b.try_sequential_batches().unwrap_err().to_string();
    assert!(e.contains("token position 123"), "{e}");
}
