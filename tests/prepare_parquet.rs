//! `prepare` on parquet sources (feature `parquet`): the text column's rows are the documents,
//! read one row group at a time; an interrupted run continues from a row to the same bytes.
#![cfg(feature = "parquet")]

use gumbel_moe::data::prepare::{prepare, PrepareOptions, TokenizerChoice};
use gumbel_moe::data::store::{Manifest, ShardSet};
use gumbel_moe::data::Prepared;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::path::Path;
use std::sync::Arc;

/// Row `i`'s text: made-up sentences (a fixed pseudo-random walk over a word list).
fn text(i: usize) -> String {
    const WORDS: &[&str] = &["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "Lily", "café", "tree"];
    let mut s = (i as u64 + 1).wrapping_mul(6_364_136_223_846_793_005);
    (0..20 + i % 30)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            WORDS[((s >> 33) % WORDS.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A snappy parquet file of `groups` row groups of `rows` rows: `id` (INT32) and an optional `text`
/// column, null at every 7th row.
fn write_parquet(path: &Path, groups: usize, rows: usize) {
    let schema =
        Arc::new(parse_message_type("message doc { REQUIRED INT32 id; OPTIONAL BYTE_ARRAY text (UTF8); }").unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for g in 0..groups {
        let ids: Vec<i32> = (0..rows).map(|r| (g * rows + r) as i32).collect();
        let def: Vec<i16> = ids.iter().map(|&i| i16::from(i % 7 != 3)).collect();
        let texts: Vec<ByteArray> =
            ids.iter().filter(|&&i| i % 7 != 3).map(|&i| text(i as usize).as_str().into()).collect();
        let mut rg = w.next_row_group().unwrap();
        let mut c = rg.next_column().unwrap().unwrap();
        c.typed::<Int32Type>().write_batch(&ids, None, None).unwrap();
        c.close().unwrap();
        let mut c = rg.next_column().unwrap().unwrap();
        c.typed::<ByteArrayType>().write_batch(&texts, Some(&def), None).unwrap();
        c.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

fn options(src: &Path, out: &Path) -> PrepareOptions {
    let mut o = PrepareOptions::new(vec![src.display().to_string()], out);
    o.tokenizer = TokenizerChoice::Bpe { vocab_size: 300 };
    o.val_fraction = 0.1;
    o.shard_tokens = 700;
    o
}

#[test]
fn parquet_rows_are_documents_and_an_interrupted_run_continues() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("docs.parquet");
    write_parquet(&src, 3, 40);
    let out = d.path().join("out");
    let s = prepare(&options(&src, &out)).unwrap();
    let nulls = (0..120).filter(|i| i % 7 == 3).count() as u64;
    assert_eq!(s.manifest.train_documents + s.manifest.val_documents, 120 - nulls);
    // Train + val, merged back in document order, are each row's ids after an end-of-text token.
    let p = Prepared::open(&out).unwrap();
    let eot = s.manifest.tokenizer.eot_id;
    let (m, _) = Manifest::read(&out).unwrap();
    let mut all = Vec::new();
    for split in ["train", "val"] {
        let set = ShardSet::open(&out, &m, split).unwrap();
        let mut t = Vec::new();
        set.read(0, set.len(), &mut t).unwrap();
        all.push(t);
    }
    let mut docs: Vec<Vec<u32>> = Vec::new();
    for i in (0..120).filter(|i| i % 7 != 3) {
        let mut ids = vec![eot];
        ids.extend(p.tokenizer.encode(&text(i)).unwrap());
        docs.push(ids);
    }
    let total: usize = docs.iter().map(Vec::len).sum();
    assert_eq!(all[0].len() + all[1].len(), total);
    // Each split is the in-order concatenation of its documents.
    let (mut ti, mut vi) = (0, 0);
    for ids in &docs {
        if all[1].len() >= vi + ids.len() && all[1][vi..vi + ids.len()] == ids[..] {
            vi += ids.len();
        } else {
            assert_eq!(&all[0][ti..ti + ids.len()], &ids[..]);
            ti += ids.len();
        }
    }
    assert_eq!((ti, vi), (all[0].len(), all[1].len()));
    // Stopped after the first shards close, then run again: the same files.
    let again = d.path().join("again");
    let mut o = options(&src, &again);
    o.stop_after_shards = Some(2);
    assert!(prepare(&o).is_err());
    prepare(&options(&src, &again)).unwrap();
    for f in std::fs::read_dir(&out).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), std::fs::read(again.join(name)).unwrap(), "{name:?}");
    }
}

#[test]
fn a_missing_text_column_is_refused_naming_the_columns() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("docs.parquet");
    write_parquet(&src, 1, 10);
    let mut o = options(&src, &d.path().join("out"));
    o.text_field = "body".into();
    let e = format!("{:#}", prepare(&o).unwrap_err());
    assert!(e.contains("docs.parquet") && e.contains("no column \"body\"") && e.contains("id, text"), "{e}");
}
