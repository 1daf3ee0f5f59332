//! `prepare`: shards that hold exactly the in-memory tokenizer's ids, the same bytes whatever the
//! thread count or an interruption, training on them, and each bad input refused by name.

mod common;
use gumbel_moe::data::prepare::{prepare, PrepareOptions, TokenizerChoice};
use gumbel_moe::data::store::{Manifest, ShardSet};
use gumbel_moe::data::{Prepared, Tokenizer, TokenizerKind};
use gumbel_moe::train::Trainer;
use std::path::{Path, PathBuf};

/// `n` documents of made-up sentences (a fixed pseudo-random walk over a word list).
fn documents(n: usize, seed: u64) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home", "Lily", "found",
        "big", "red", "ball", "in", "park", "happy", "sun", "was", "bright", "café", "naïve", "tree",
    ];
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = |m: usize| {
        s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((s >> 33) % m as u64) as usize
    };
    (0..n)
        .map(|_| {
            let mut d = String::new();
            for _ in 0..3 + next(6) {
                for w in 0..4 + next(8) {
                    d.push_str(if w == 0 { "" } else { " " });
                    d.push_str(WORDS[next(WORDS.len())]);
                }
                d.push_str(if next(3) == 0 { ".\n" } else { ". " });
            }
            d.trim().to_string()
        })
        .collect()
}

/// Writes the documents as one text file separated by `<|endoftext|>` (with newlines around it,
/// as TinyStories).
fn write_text(path: &Path, docs: &[String]) {
    std::fs::write(path, docs.join("\n<|endoftext|>\n")).unwrap();
}

fn options(sources: &[&Path], out: &Path) -> PrepareOptions {
    let mut o = PrepareOptions::new(sources.iter().map(|p| p.display().to_string()).collect(), out);
    o.tokenizer = TokenizerChoice::Bpe { vocab_size: 400 };
    o.val_fraction = 0.1;
    o.shard_tokens = 3000;
    o
}

/// Every file of a folder, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// All tokens of a split, read back through the memory-mapped reader.
fn split_tokens(dir: &Path, split: &str) -> Vec<u32> {
    let (m, _) = Manifest::read(dir).unwrap();
    let set = ShardSet::open(dir, &m, split).unwrap();
    let mut out = Vec::new();
    set.read(0, set.len(), &mut out).unwrap();
    out
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

#[test]
fn shards_hold_the_in_memory_tokenizers_ids_document_by_document() {
    let d = tempfile::tempdir().unwrap();
    let docs = documents(300, 1);
    let src = d.path().join("corpus.txt");
    write_text(&src, &docs);
    let out = d.path().join("out");
    let s = prepare(&options(&[&src], &out)).unwrap();
    assert!(s.manifest.train.len() >= 2, "several shards: {:?}", s.manifest.train);
    assert_eq!(s.manifest.train_documents + s.manifest.val_documents, 300);
    // Independently: the saved tokenizer encodes each document; an end-of-text id precedes each.
    let tok = Tokenizer::load(&out.join("tokenizer.json"), &TokenizerKind::Bpe { vocab_size: 400 }).unwrap();
    let eot = s.manifest.tokenizer.eot_id;
    let (train, val) = (split_tokens(&out, "train"), split_tokens(&out, "val"));
    let (mut want_train, mut want_val) = (Vec::new(), Vec::new());
    let mut per_doc = Vec::new();
    for doc in &docs {
        let mut ids = vec![eot];
        ids.extend(tok.encode(doc).unwrap());
        per_doc.push(ids);
    }
    // Which documents went to validation is read off the val split itself: the val split must be
    // a subsequence of whole documents, and train the rest, both in order.
    let mut vi = 0;
    for ids in &per_doc {
        if val.len() >= vi + ids.len() && val[vi..vi + ids.len()] == ids[..] {
            want_val.extend_from_slice(ids);
            vi += ids.len();
        } else {
            want_train.extend_from_slice(ids);
        }
    }
    assert_eq!(val, want_val);
    assert_eq!(train, want_train);
    assert!(!val.is_empty() && val.len() < train.len());
    assert_eq!(tok.decode(&per_doc[0][1..]).unwrap(), docs[0]);
}

#[test]
fn output_is_byte_identical_whatever_the_thread_count() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("corpus.txt");
    write_text(&src, &documents(400, 2));
    let outs: Vec<PathBuf> = [1, 3].iter().map(|t| d.path().join(format!("out{t}"))).collect();
    for (threads, out) in [1, 3].into_iter().zip(&outs) {
        in_pool(threads, || prepare(&options(&[&src], out)).unwrap());
    }
    assert_eq!(files(&outs[0]), files(&outs[1]));
}

#[test]
fn killed_prepare_continues_to_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("corpus.txt");
    write_text(&src, &documents(400, 3));
    let whole = d.path().join("whole");
    prepare(&options(&[&src], &whole)).unwrap();
    for stop in [1, 2] {
        let out = d.path().join(format!("stopped{stop}"));
        let mut o = options(&[&src], &out);
        o.stop_after_shards = Some(stop);
        let e = prepare(&o).unwrap_err().to_string();
        assert!(e.contains("stopped after"), "{e}");
        assert!(!out.join("manifest.json").exists() && out.join("prepare.progress.json").exists());
        // A reader is refused until the prepare is finished.
        let e = Prepared::open_if_prepared(&out.display().to_string()).err().unwrap().to_string();
        assert!(e.contains("without a manifest.json"), "{e}");
        // What a kill mid-write leaves: a half-written temporary shard.
        std::fs::write(out.join(".tmp-train-000009.bin"), b"half").unwrap();
        let s = prepare(&options(&[&src], &out)).unwrap();
        assert!(s.resumed);
        assert_eq!(files(&out), files(&whole), "stopped after {stop} shard closes");
    }
}

#[test]
fn jsonl_folders_and_validation_sources() {
    let d = tempfile::tempdir().unwrap();
    let docs = documents(120, 4);
    std::fs::create_dir(d.path().join("src")).unwrap();
    let line = |t: &str| serde_json::json!({"id": 1, "body": t}).to_string();
    let lines: Vec<String> = docs[..60].iter().map(|t| line(t)).collect();
    std::fs::write(d.path().join("src/b.jsonl"), lines.join("\n") + "\n\n").unwrap();
    write_text(&d.path().join("src/a.txt"), &docs[60..100]);
    write_text(&d.path().join("val.txt"), &docs[100..]);
    let out = d.path().join("out");
    let mut o = options(&[&d.path().join("src")], &out);
    o.val_sources = vec![d.path().join("val.txt").display().to_string()];
    o.text_field = "body".into();
    o.tokenizer = TokenizerChoice::Char;
    let s = prepare(&o).unwrap();
    assert_eq!((s.manifest.train_documents, s.manifest.val_documents), (100, 20));
    // Folder files in name order: a.txt (docs 60..100), then b.jsonl (docs 0..60).
    let p = Prepared::open(&out).unwrap();
    let eot = s.manifest.tokenizer.eot_id;
    let mut want = Vec::new();
    for doc in docs[60..100].iter().chain(&docs[..60]) {
        want.push(eot);
        want.extend(p.tokenizer.encode(doc).unwrap());
    }
    assert_eq!(split_tokens(&out, "train"), want);
    assert_eq!(p.tokenizer.vocab_size(), s.manifest.tokenizer.vocab_size);
}

#[test]
fn training_reads_prepared_data_and_resume_refuses_another_dataset() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("corpus.txt");
    write_text(&src, &documents(300, 5));
    let data = d.path().join("data");
    let s = prepare(&options(&[&src], &data)).unwrap();
    let source = format!("data.source={:?}", data.display().to_string());
    let run = d.path().join("run");
    let cfg = common::tiny_config("gumbel", &[&source, "train.max_iters=3"]);
    let mut t = Trainer::new(cfg, &run).unwrap();
    t.progress = false;
    assert_eq!(t.cfg.model.vocab_size, s.manifest.tokenizer.vocab_size);
    assert_eq!(t.val.num_tokens() as u64, s.manifest.tokens("val"));
    t.fit().unwrap();
    // The same data again under another manifest: another dataset.
    let other = d.path().join("other");
    let mut o = options(&[&src], &other);
    o.val_fraction = 0.2;
    let s2 = prepare(&o).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&other, &data).unwrap();
    let e = Trainer::resume(&run, &["train.max_iters=6".into()], None).err().unwrap().to_string();
    assert!(e.contains(&s.manifest_sha256) && e.contains(&s2.manifest_sha256), "{e}");
}

#[test]
fn resume_on_prepared_data_is_exact() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("corpus.txt");
    write_text(&src, &documents(300, 6));
    let data = d.path().join("data");
    prepare(&options(&[&src], &data)).unwrap();
    let source = format!("data.source={:?}", data.display().to_string());
    let ((a, _), (b, _)) = common::straight_and_resumed("gumbel", &[&source]);
    assert_eq!(a, b);
}

/// Runs prepare and returns its error text.
fn prepare_err(o: &PrepareOptions) -> String {
    match prepare(o) {
        Ok(_) => panic!("bad input was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn invalid_utf8_is_refused_naming_file_and_offset() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("bad.txt");
    let mut bytes = documents(50, 7).join("<|endoftext|>").into_bytes();
    let at = bytes.len() / 2;
    bytes[at] = 0xff;
    std::fs::write(&src, bytes).unwrap();
    let e = prepare_err(&options(&[&src], &d.path().join("out")));
    assert!(e.contains("bad.txt") && e.contains("not valid UTF-8") && e.contains(&format!("byte offset {at}")), "{e}");
}

#[test]
fn bad_json_line_is_refused_naming_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("bad.jsonl");
    let mut lines: Vec<String> = documents(30, 8).iter().map(|t| serde_json::json!({"text": t}).to_string()).collect();
    lines[6] = "{\"text\": \"unterminated".into();
    std::fs::write(&src, lines.join("\n")).unwrap();
    let e = prepare_err(&options(&[&src], &d.path().join("out")));
    assert!(e.contains("bad.jsonl line 7") && e.contains("not valid JSON"), "{e}");
    lines[6] = serde_json::json!({"story": "x"}).to_string();
    std::fs::write(&src, lines.join("\n")).unwrap();
    let e = prepare_err(&options(&[&src], &d.path().join("out2")));
    assert!(e.contains("bad.jsonl line 7") && e.contains("no string field \"text\""), "{e}");
}

#[test]
fn empty_corpus_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("empty.txt");
    std::fs::write(&src, " \n<|endoftext|>\n\n<|endoftext|>").unwrap();
    let e = prepare_err(&options(&[&src], &d.path().join("out")));
    assert!(e.contains("empty corpus") && e.contains("empty.txt"), "{e}");
}

#[test]
fn tokenizer_with_another_hash_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("corpus.txt");
    write_text(&src, &documents(100, 9));
    let out = d.path().join("out");
    let s = prepare(&options(&[&src], &out)).unwrap();
    // Another tokenizer.json put in its place (here: a char vocabulary of the same corpus).
    let mut o = options(&[&src], &d.path().join("out2"));
    o.tokenizer = TokenizerChoice::Char;
    prepare(&o).unwrap();
    std::fs::copy(d.path().join("out2/tokenizer.json"), out.join("tokenizer.json")).unwrap();
    let e = Prepared::open(&out).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json") && e.contains(&s.manifest.tokenizer.sha256), "{e}");
}

#[test]
fn validation_split_shorter_than_one_window_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let docs = documents(100, 10);
    let (src, val) = (d.path().join("corpus.txt"), d.path().join("val.txt"));
    write_text(&src, &docs);
    std::fs::write(&val, "a b").unwrap();
    let out = d.path().join("out");
    let mut o = options(&[&src], &out);
    o.val_sources = vec![val.display().to_string()];
    prepare(&o).unwrap();
    let source = format!("data.source={:?}", out.display().to_string());
    let e = match Trainer::new(common::tiny_config("gumbel", &[&source]), &d.path().join("run")) {
        Ok(_) => panic!("a validation split shorter than a window was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("validation split") && e.contains("shorter than one window") && e.contains("val-*.bin"), "{e}");
}

#[test]
fn hub_files_with_a_reused_tokenizer_one_document_per_file() {
    let d = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hub = "hf://gumbel-moe-fixtures/shakespeare-head";
    let out = d.path().join("out");
    let mut o = PrepareOptions::new(vec![format!("{hub}/input.txt")], &out);
    o.val_sources = vec![format!("{hub}/parts/scene2.txt")];
    o.hub = gumbel_moe::data::HubOptions { cache_dir: Some(root.join("tests/fixtures/hf-cache/hub")), offline: true };
    o.separator = String::new();
    // A checkpoint-style char tokenizer.json without an end-of-text token: prepare adds one.
    let fixture_tok = root.join("tests/fixtures/hf-tiny-qwen2-moe/tokenizer.json");
    o.tokenizer = TokenizerChoice::File(fixture_tok.clone());
    let s = prepare(&o).unwrap();
    let fixture = Tokenizer::load(&fixture_tok, &TokenizerKind::Hf).unwrap();
    assert_eq!(s.manifest.tokenizer.vocab_size, fixture.vocab_size() + 1);
    assert_eq!(s.manifest.tokenizer.eot_id as usize, fixture.vocab_size());
    assert_eq!((s.manifest.train_documents, s.manifest.val_documents), (1, 1));
    let head = gumbel_moe::data::load_text_with(&format!("{hub}/input.txt"), &o.hub).unwrap();
    let mut want = vec![s.manifest.tokenizer.eot_id];
    want.extend(fixture.encode(head.trim()).unwrap());
    assert_eq!(split_tokens(&out, "train"), want);
}

#[test]
fn a_document_longer_than_a_piece_gives_the_ids_of_the_whole_document() {
    let d = tempfile::tempdir().unwrap();
    // One document of ~9 MB (longer than MAX_PIECE, 8 MB): made-up sentences over many lines.
    let mut text = String::new();
    let mut seed = 0;
    while text.len() < 9 << 20 {
        for doc in documents(2000, seed) {
            text.push_str(&doc);
            text.push('\n');
        }
        seed += 1;
    }
    let text = text.trim().to_string();
    let src = d.path().join("book.txt");
    std::fs::write(&src, &text).unwrap();
    let val = d.path().join("val.txt");
    write_text(&val, &documents(20, 99));
    let out = d.path().join("out");
    let mut o = options(&[&src], &out);
    o.separator = String::new();
    o.val_sources = vec![val.display().to_string()];
    o.shard_tokens = u64::MAX;
    o.sample_bytes = 1 << 20;
    let s = prepare(&o).unwrap();
    assert_eq!(s.manifest.train_documents, 1);
    let tok = Tokenizer::load(&out.join("tokenizer.json"), &TokenizerKind::Bpe { vocab_size: 400 }).unwrap();
    let mut want = vec![s.manifest.tokenizer.eot_id];
    want.extend(tok.encode(&text).unwrap());
    assert_eq!(split_tokens(&out, "train"), want);
}

#[test]
fn hub_globs_expand_to_the_matching_files_in_path_order() {
    use gumbel_moe::data::prepare::inputs::expand;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hub = gumbel_moe::data::HubOptions { cache_dir: Some(root.join("tests/fixtures/hf-cache/hub")), offline: true };
    let repo = "hf://gumbel-moe-fixtures/shakespeare-head";
    let names = |spec: &str| -> Vec<String> {
        expand(&[format!("{repo}/{spec}")], &[], &hub).unwrap().into_iter().map(|i| i.name).collect()
    };
    assert_eq!(names("**/*.txt"), [format!("{repo}/input.txt"), format!("{repo}/parts/scene2.txt")]);
    assert_eq!(names("*.txt"), [format!("{repo}/input.txt")]);
    assert_eq!(names("p*/*"), [format!("{repo}/parts/scene2.txt")]);
    let e = expand(&[format!("{repo}/*.parquet")], &[], &hub).unwrap_err().to_string();
    assert!(e.contains("matches no file") && e.contains("offline"), "{e}");
}
