//! Tests of the data layer: text sources (local and hub cache), tokenizers, split and batches.
//!
//! The corpus is the repo's `data/tinyshakespeare.txt`; the hub tests read the small hub cache in
//! `tests/fixtures/hf-cache` (see its README). Environment variables are process-global, so the
//! only test that sets them (`hub_cache_from_the_environment`) holds `ENV`; the other hub tests
//! pass the cache explicitly.

use gumbel_moe::data::{load_text, load_text_with, split_text, Batcher, HubOptions, Tokenizer, TokenizerKind};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Guards the process environment (HF_HOME, HF_HUB_OFFLINE).
static ENV: Mutex<()> = Mutex::new(());

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn shakespeare() -> String {
    load_text(crate_dir().join("data/tinyshakespeare.txt").to_str().expect("utf-8 path")).expect("tiny shakespeare")
}

/// The fixture hub cache, offline.
fn fixture_hub() -> HubOptions {
    HubOptions { cache_dir: Some(crate_dir().join("tests/fixtures/hf-cache/hub")), offline: true }
}

const FIXTURE: &str = "hf://gumbel-moe-fixtures/shakespeare-head";

/// The first `n` bytes of `s`, cut back to a char boundary.
fn prefix(s: &str, n: usize) -> &str {
    let mut n = n.min(s.len());
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

// ---------- sources ----------

#[test]
fn local_file_loads_with_known_size() {
    let text = shakespeare();
    assert_eq!(text.len(), 1_115_394);
    assert_eq!(text.lines().count(), 40_000);
}

/// The configs name `data/tinyshakespeare.txt`. Cargo runs tests in the crate root, so this finds
/// it from the current directory; `tests/checkpoint_safety.rs` trains from another directory, where
/// only the fallback to the crate folder finds it.
#[test]
fn relative_paths_fall_back_to_the_crate_folder() {
    let p = gumbel_moe::data::source::resolve_local("data/tinyshakespeare.txt");
    assert!(p.is_file(), "{}", p.display());
    assert_eq!(load_text("data/tinyshakespeare.txt").unwrap().len(), 1_115_394);
    // A relative name found nowhere: the error says where it looked.
    let err = format!("{:#}", load_text("data/no-such-corpus.txt").unwrap_err());
    for part in ["data/no-such-corpus.txt", "current directory", "crate directory", env!("CARGO_MANIFEST_DIR")] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
}

#[test]
fn hub_files_load_from_an_explicit_cache() {
    // The cached files are the first bytes of the local corpus, as the fixture README says.
    let text = shakespeare();
    let head = load_text_with(&format!("{FIXTURE}/input.txt"), &fixture_hub()).expect("offline hub load");
    assert_eq!(head.len(), 3005);
    assert!(text.starts_with(&head), "hub file is not the head of data/tinyshakespeare.txt");
    // A file in a folder of the repo: its snapshot link has one more `../`.
    let scene = load_text_with(&format!("{FIXTURE}/parts/scene2.txt"), &fixture_hub()).unwrap();
    assert_eq!(scene.len(), 1040);
    assert!(text[head.len()..].starts_with(&scene));

    // A file the cache lacks fails fast, naming the repo, the file, the cache and that it was offline.
    let t0 = Instant::now();
    let err = load_text_with(&format!("{FIXTURE}/no/such.txt"), &fixture_hub()).unwrap_err().to_string();
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    for part in ["gumbel-moe-fixtures/shakespeare-head", "no/such.txt", "offline", "fixtures/hf-cache"] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
    // So does a repo the cache lacks.
    let err = load_text_with("hf://nobody/nothing/input.txt", &fixture_hub()).unwrap_err().to_string();
    assert!(err.contains("nobody/nothing") && err.contains("offline"), "{err}");
}

/// A checkout without symlink support turns each snapshot link into a small file holding the link
/// text; the loader follows it to the blob.
#[test]
fn hub_cache_with_flattened_links() {
    let src = crate_dir().join("tests/fixtures/hf-cache/hub");
    let dir = tempfile::tempdir().unwrap();
    copy_flattening_links(&src, dir.path());
    let link = dir.path().join(
        "datasets--gumbel-moe-fixtures--shakespeare-head/snapshots/b94639155ce994b894fd935b4effd1baf41fb7bf/input.txt",
    );
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file(), "the copy must hold a plain file");
    let hub = HubOptions { cache_dir: Some(dir.path().to_path_buf()), offline: true };
    let head = load_text_with(&format!("{FIXTURE}/input.txt"), &hub).unwrap();
    assert_eq!(head.len(), 3005);
    assert_eq!(load_text_with(&format!("{FIXTURE}/parts/scene2.txt"), &hub).unwrap().len(), 1040);
}

/// Copies a tree, writing each symlink as a plain file that holds its target.
fn copy_flattening_links(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let meta = std::fs::symlink_metadata(&from).unwrap();
        if meta.file_type().is_symlink() {
            std::fs::write(&to, std::fs::read_link(&from).unwrap().to_str().unwrap()).unwrap();
        } else if meta.is_dir() {
            copy_flattening_links(&from, &to);
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// `load_text` takes the cache from HF_HOME and offline mode from HF_HUB_OFFLINE.
#[test]
fn hub_cache_from_the_environment() {
    let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let _restore = RestoreEnv::save(&["HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"]);
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HUGGINGFACE_HUB_CACHE");
    std::env::set_var("HF_HOME", crate_dir().join("tests/fixtures/hf-cache"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(HubOptions::from_env(), HubOptions { cache_dir: None, offline: true });
    let head = load_text(&format!("{FIXTURE}/input.txt")).expect("offline hub load through HF_HOME");
    assert!(shakespeare().starts_with(&head) && head.len() == 3005);
    let err = load_text(&format!("{FIXTURE}/missing.txt")).unwrap_err().to_string();
    assert!(err.contains("offline") && err.contains("fixtures/hf-cache/hub"), "{err}");

    // "true" works as well as "1"; anything else is online.
    std::env::set_var("HF_HUB_OFFLINE", "true");
    assert!(HubOptions::from_env().offline);
    let t0 = Instant::now();
    assert!(load_text(&format!("{FIXTURE}/missing.txt")).is_err());
    assert!(t0.elapsed() < Duration::from_secs(5));
    std::env::set_var("HF_HUB_OFFLINE", "0");
    assert!(!HubOptions::from_env().offline);
}

/// Puts environment variables back as they were when dropped.
struct RestoreEnv(Vec<(&'static str, Option<std::ffi::OsString>)>);

impl RestoreEnv {
    fn save(names: &[&'static str]) -> Self {
        Self(names.iter().map(|&n| (n, std::env::var_os(n))).collect())
    }
}

impl Drop for RestoreEnv {
    fn drop(&mut self) {
        for (name, value) in &self.0 {
            match value {
                Some(v) => std::env::set_var(name, v),
                None => std::env::remove_var(name),
            }
        }
    }
}

#[test]
fn malformed_hub_spec_names_spec_and_form() {
    for spec in ["hf://SamPIngram/tinyshakespeare", "hf://onlyowner", "hf:/a/b/c", "hf://a//c"] {
        let err = load_text(spec).unwrap_err().to_string();
        assert!(err.contains(spec) && err.contains("hf://OWNER/NAME/FILE"), "{spec}: {err}");
    }
}

#[test]
fn missing_local_file_names_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.txt");
    let err = format!("{:#}", load_text(path.to_str().unwrap()).unwrap_err());
    assert!(err.contains(path.to_str().unwrap()) && err.contains("No such file"), "{err}");
}

#[test]
fn empty_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.txt");
    std::fs::write(&path, b"").unwrap();
    let err = load_text(path.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("is empty") && err.contains("empty.txt"), "{err}");
}

#[test]
fn non_utf8_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.txt");
    // "café" in Latin-1: the é (0xe9) is byte 3 and not valid UTF-8 there.
    std::fs::write(&path, b"caf\xe9 au lait").unwrap();
    let err = load_text(path.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("latin1.txt") && err.contains("byte offset 3") && err.contains("0xe9"), "{err}");
    // Valid multi-byte chars before it count in bytes: "é" is 2 bytes, so the bad byte is at 2.
    std::fs::write(&path, "é".bytes().chain([0xff]).collect::<Vec<u8>>()).unwrap();
    let err = load_text(path.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("byte offset 2"), "{err}");
}

// ---------- char tokenizer ----------

#[test]
fn char_tokenizer_on_shakespeare() {
    let text = shakespeare();
    let tok = Tokenizer::train(&TokenizerKind::Char, &text).unwrap();
    assert_eq!(tok.vocab_size(), 65);
    assert_eq!(tok.kind(), TokenizerKind::Char);
    // nanoGPT's stoi: sorted chars, '\n' = 0, ' ' = 1, 'a' = 39.
    assert_eq!(tok.encode("\n a").unwrap(), vec![0, 1, 39]);

    let t0 = Instant::now();
    let ids = tok.encode(&text).unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "char encode of 1 MB took {took:?}");
    assert_eq!(ids.len(), text.chars().count());
    assert!(tok.decode(&ids).unwrap() == text);

    let err = tok.encode("ab€c").unwrap_err().to_string();
    assert!(err.contains("'€'") && err.contains("position 2"), "{err}");
    let err = tok.decode(&[1, 65]).unwrap_err().to_string();
    assert!(err.contains("65"), "{err}");

    // Save/load round trip, and the Hugging Face library reads the same ids from the file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let back = Tokenizer::load(&path, &TokenizerKind::Char).unwrap();
    assert_eq!(back.vocab_size(), 65);
    let sample = prefix(&text, 5000);
    let ours = tok.encode(sample).unwrap();
    assert_eq!(back.encode(sample).unwrap(), ours);

    let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
    let enc = hf.encode(sample, false).unwrap();
    assert_eq!(enc.get_ids(), &ours[..]);
    assert_eq!(hf.decode(&ours, false).unwrap(), sample);
    assert!(hf.encode("ab€c", false).is_err(), "HF pipeline must reject an unknown char too");
}

#[test]
fn char_tokenizer_non_ascii() {
    let text = "ünïcødé\ntext 😀";
    let tok = Tokenizer::train(&TokenizerKind::Char, text).unwrap();
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), text.chars().count());
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(hf.encode(text, false).unwrap().get_ids(), &ids[..]);
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let err = Tokenizer::load(&missing, &TokenizerKind::Char).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");

    let path = dir.path().join("char.json");
    Tokenizer::train(&TokenizerKind::Char, "abc").unwrap().save(&path).unwrap();
    let err = Tokenizer::load(&path, &TokenizerKind::Bpe { vocab_size: 512 }).unwrap_err().to_string();
    assert!(err.contains("char.json") && err.contains("WordLevel"), "{err}");

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{not json").unwrap();
    let err = Tokenizer::load(&garbage, &TokenizerKind::Char).unwrap_err().to_string();
    assert!(err.contains("garbage.json"), "{err}");
}

// ---------- BPE tokenizer ----------

#[test]
fn bpe_tokenizer_on_shakespeare() {
    let text = shakespeare();
    let slice = prefix(&text, 200_000);
    let kind = TokenizerKind::Bpe { vocab_size: 512 };

    let t0 = Instant::now();
    let tok = Tokenizer::train(&kind, slice).unwrap();
    let train_time = t0.elapsed();
    assert!(tok.vocab_size() <= 512 && tok.vocab_size() > 400, "vocab {}", tok.vocab_size());
    assert_eq!(tok.kind(), kind);

    // Deterministic: a second training gives the same ids.
    let again = Tokenizer::train(&kind, slice).unwrap();
    let sample =
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak!  -- 'tis \"so\"; ok?\n";
    let ids = tok.encode(sample).unwrap();
    assert_eq!(again.encode(sample).unwrap(), ids);
    assert!(ids.len() < sample.len(), "BPE must compress: {} ids for {} bytes", ids.len(), sample.len());
    assert_eq!(tok.decode(&ids).unwrap(), sample);
    // Bytes never seen in training still encode (all 256 byte symbols are in the vocabulary).
    let unseen = "naïve café — 😀\ttab";
    assert_eq!(tok.decode(&tok.encode(unseen).unwrap()).unwrap(), unseen);
    let err = tok.decode(&[0, 100_000]).unwrap_err().to_string();
    assert!(err.contains("100000"), "{err}");

    // The whole text: chunked encoding equals the HF library encoding it in one piece.
    let t0 = Instant::now();
    let all = tok.encode(&text).unwrap();
    let encode_time = t0.elapsed();
    assert!(encode_time < Duration::from_secs(10), "BPE encode of 1 MB took {encode_time:?}");
    assert_eq!(tok.decode(&all).unwrap(), text);
    eprintln!(
        "BPE 512: train on {} bytes {train_time:?}, encode {} bytes -> {} ids {encode_time:?}",
        slice.len(),
        text.len(),
        all.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
    let whole = prefix(&text, 300_000);
    let ours = tok.encode(whole).unwrap();
    assert_eq!(
        hf.encode(whole, false).unwrap().get_ids(),
        &ours[..],
        "chunked encoding differs from whole-text encoding"
    );
    assert_eq!(hf.decode(&ids, false).unwrap(), sample);

    // Whitespace runs around newlines (trailing spaces, indented and blank lines), where cutting
    // a chunk at any newline would change the GPT-2 pre-tokens. Trained on such text, the
    // vocabulary has merges like " \n" that make a changed pre-token change the ids.
    let ragged: String = text
        .lines()
        .take(6000)
        .enumerate()
        .map(|(i, line)| {
            let indent = if i % 5 == 0 { "  " } else { "" };
            let tail = [" ", "", "\t", "  "][i % 4];
            let gap = if i % 7 == 0 { "\n \n" } else { "\n" };
            format!("{indent}{line}{tail}{gap}")
        })
        .collect();
    assert!(ragged.len() > 150_000);
    let rag_tok = Tokenizer::train(&kind, &ragged).unwrap();
    let rag_path = dir.path().join("ragged.json");
    rag_tok.save(&rag_path).unwrap();
    let rag_hf = tokenizers::Tokenizer::from_file(&rag_path).unwrap();
    assert_eq!(
        rag_hf.encode(ragged.as_str(), false).unwrap().get_ids(),
        &rag_tok.encode(&ragged).unwrap()[..],
        "chunked encoding differs from whole-text encoding on ragged whitespace"
    );

    let back = Tokenizer::load(&path, &kind).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.encode(whole).unwrap(), ours);
    let err = Tokenizer::load(&path, &TokenizerKind::Char).unwrap_err().to_string();
    assert!(err.contains("BPE"), "{err}");
    let err = Tokenizer::load(&path, &TokenizerKind::Bpe { vocab_size: 300 }).unwrap_err().to_string();
    assert!(err.contains("300"), "{err}");
}

#[test]
fn bpe_rejects_tiny_vocab_and_empty_text() {
    assert!(Tokenizer::train(&TokenizerKind::Bpe { vocab_size: 100 }, "some text").is_err());
    assert!(Tokenizer::train(&TokenizerKind::Bpe { vocab_size: 512 }, "").is_err());
    assert!(Tokenizer::train(&TokenizerKind::Char, "").is_err());
}

// ---------- split ----------

#[test]
fn split_is_by_chars() {
    // 10 chars, 19 bytes: a byte split at 90% would cut inside a char.
    let text = "ééééééééé!";
    let (train, val) = split_text(text, 0.9);
    assert_eq!((train.chars().count(), val.chars().count()), (9, 1));
    assert_eq!(val, "!");
    let text: String = "αβγδε".repeat(200); // 1000 chars, 2000 bytes
    let (train, val) = split_text(&text, 0.9);
    assert_eq!((train.chars().count(), val.chars().count()), (900, 100));
    assert_eq!(format!("{train}{val}"), text);
    assert_eq!(split_text("abc", 1.0), ("abc", ""));
    assert_eq!(split_text("abc", 0.0), ("", "abc"));
}

#[test]
fn shakespeare_split_matches_nanogpt() {
    let text = shakespeare();
    let (train, val) = split_text(&text, 0.9);
    // nanoGPT: n = 1115394, train = data[:int(n*0.9)] = 1003854 chars.
    assert_eq!((train.len(), val.len()), (1_003_854, 111_540));
}

// ---------- batches ----------

/// A batcher over the tokens 0..len, so every token is its own offset.
fn identity(len: u32, block: usize, batch: usize, seed: u64) -> Batcher {
    Batcher::new((0..len).collect(), block, batch, seed).unwrap()
}

#[test]
fn random_batches_are_deterministic_windows() {
    let (len, block, batch) = (1000u32, 16usize, 8usize);
    let b = identity(len, block, batch, 42);
    let (x, y) = b.random_batch(3, 1);
    assert_eq!((x.len(), y.len()), (batch * block, batch * block));
    assert_eq!(b.random_batch(3, 1), (x.clone(), y.clone()));
    assert_eq!(b.clone().random_batch(3, 1).0, x);
    assert_ne!(b.random_batch(4, 1).0, x, "another step must give another batch");
    assert_ne!(b.random_batch(3, 0).0, x, "another micro-batch must give another batch");
    assert_ne!(identity(len, block, batch, 43).random_batch(3, 1).0, x, "another seed");
    assert_ne!(b.random_batch(3 + (1 << 32), 1).0, x, "steps past 2^32 must not wrap");
    for row in 0..batch {
        let xr = &x[row * block..(row + 1) * block];
        let yr = &y[row * block..(row + 1) * block];
        // Windows of consecutive tokens; y is x shifted by one.
        for i in 0..block {
            assert_eq!(xr[i], xr[0] + i as u32);
            assert_eq!(yr[i], xr[i] + 1);
        }
    }
}

#[test]
fn random_offsets_cover_the_range_uniformly() {
    // len = block + 4: offsets 0..=3, all must appear, none beyond.
    let block = 8;
    let b = identity(block as u32 + 4, block, 4, 7);
    let mut counts = [0usize; 4];
    for step in 0..1000 {
        let (x, y) = b.random_batch(step, 0);
        for row in 0..4 {
            let o = x[row * block] as usize;
            assert!(o + block < b.num_tokens(), "offset {o} out of range");
            assert_eq!(*y.last().unwrap() as usize, x[3 * block] as usize + block);
            counts[o] += 1;
        }
    }
    // 4000 draws over 4 offsets: each near 1000 (6 sigma is about 164).
    assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
}

#[test]
fn sequential_batches_cover_the_split() {
    let (len, block, batch) = (1003u32, 10usize, 8usize);
    let b = identity(len, block, batch, 0);
    let batches = b.sequential_batches();
    let windows = (len as usize - 1) / block; // 100
    assert_eq!(batches.iter().map(|(_, _, r)| r).sum::<usize>(), windows);
    assert_eq!(batches.len(), windows.div_ceil(batch));
    assert_eq!(batches.last().unwrap().2, windows % batch);
    let xs: Vec<u32> = batches.iter().flat_map(|(x, _, _)| x.iter().copied()).collect();
    let ys: Vec<u32> = batches.iter().flat_map(|(_, y, _)| y.iter().copied()).collect();
    assert_eq!(xs, (0..(windows * block) as u32).collect::<Vec<_>>());
    assert_eq!(ys, (1..=(windows * block) as u32).collect::<Vec<_>>());
    for (x, y, rows) in &batches {
        assert_eq!((x.len(), y.len()), (rows * block, rows * block));
    }
    // Exactly one window when len - 1 == block.
    let b = identity(block as u32 + 2, block, batch, 0);
    assert_eq!(b.sequential_batches().len(), 1);
    assert_eq!((b.num_tokens(), b.block_size(), b.batch_size()), (block + 2, block, batch));
}

#[test]
fn too_short_split_is_an_error() {
    let err = Batcher::new((0..65).collect(), 64, 4, 0).unwrap_err().to_string();
    assert!(err.contains("split has 65 tokens") && err.contains("block_size+2 = 66"), "{err}");
    assert!(Batcher::new((0..66).collect(), 64, 4, 0).is_ok());
    assert!(Batcher::new((0..66).collect(), 0, 4, 0).is_err());
    assert!(Batcher::new((0..66).collect(), 8, 0, 0).is_err());
}
