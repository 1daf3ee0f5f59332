//! Documents from a parquet file (feature `parquet`): each row's text column, one row group in
//! memory at a time (bounded by the file's row-group size). Null and empty texts are skipped; a
//! missing or non-string column is refused, naming the file and the columns it has.

use super::inputs::Input;
use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;
use parquet::schema::types::Type;
use std::collections::VecDeque;
use std::sync::Arc;

pub(super) struct ParquetReader {
    name: String,
    reader: SerializedFileReader<std::fs::File>,
    projection: Type,
    /// The next row group to read.
    group: usize,
    /// Texts of the current row group, with their row index in the file.
    pending: VecDeque<(u64, Option<String>)>,
    /// Rows before `group`.
    rows_before: u64,
    /// The first row to hand out (a resume point).
    skip_to: u64,
}

impl ParquetReader {
    /// Opens `input`, reading from row `row` on.
    pub fn open(input: &Input, row: u64, column: &str) -> Result<Self> {
        let file = std::fs::File::open(&input.path).with_context(|| format!("cannot open source {}", input.name))?;
        let reader = SerializedFileReader::new(file)
            .with_context(|| format!("source {} is not a readable parquet file", input.name))?;
        let root = reader.metadata().file_metadata().schema_descr().root_schema().clone();
        let fields = root.get_fields();
        let Some(field) = fields.iter().find(|f| f.name() == column) else {
            let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
            bail!(
                "source {} has no column {column:?} (its columns: {}); choose one with --text-field",
                input.name,
                names.join(", ")
            );
        };
        let projection = Type::group_type_builder(root.name())
            .with_fields(vec![Arc::clone(field)])
            .build()
            .map_err(|e| anyhow!("source {}: cannot select column {column:?}: {e}", input.name))?;
        Ok(Self {
            name: input.name.clone(),
            reader,
            projection,
            group: 0,
            pending: VecDeque::new(),
            rows_before: 0,
            skip_to: row,
        })
    }

    /// The next document: (text, first, last, row index after it).
    pub fn next(&mut self) -> Result<Option<(String, bool, bool, u64)>> {
        loop {
            if let Some((row, text)) = self.pending.pop_front() {
                match text {
                    Some(t) if !t.is_empty() => return Ok(Some((t, true, true, row + 1))),
                    _ => continue,
                }
            }
            if self.group >= self.reader.num_row_groups() {
                return Ok(None);
            }
            let rg = self.reader.get_row_group(self.group).with_context(|| format!("source {}", self.name))?;
            let n = rg.metadata().num_rows() as u64;
            let first = self.rows_before;
            self.group += 1;
            self.rows_before += n;
            if first + n <= self.skip_to {
                continue;
            }
            let rows = RowIter::from_row_group(Some(self.projection.clone()), rg.as_ref())
                .with_context(|| format!("source {}: row group {}", self.name, self.group - 1))?;
            for (i, row) in rows.enumerate() {
                let at = first + i as u64;
                let row = row.with_context(|| format!("source {}: row {at}", self.name))?;
                if at < self.skip_to {
                    continue;
                }
                let text = match row.get_column_iter().next().map(|(_, f)| f) {
                    Some(Field::Str(s)) => Some(s.clone()),
                    Some(Field::Null) | None => None,
                    Some(other) => bail!("source {} row {at}: the text column holds {other}, not a string", self.name),
                };
                self.pending.push_back((at, text));
            }
        }
    }

    /// Rows read so far (the progress bar counts a parquet file's bytes by its rows).
    pub fn fraction_done(&self) -> f64 {
        let total = self.reader.metadata().file_metadata().num_rows().max(1) as f64;
        (self.rows_before as f64 - self.pending.len() as f64) / total
    }
}
