//! Parquet archives of trades in the shared trade schema: zstd-compressed,
//! with key-value metadata saying which symbols and trade ids they hold and
//! which ids are missing. A file appears under its final name only once it
//! is complete, so a killed recorder never leaves half a file behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Decimal128Type, Field, Schema};
use arrow::error::ArrowError;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::{Deserialize, Serialize};

use crate::decimal;
use crate::error::{Error, Result};
use crate::trade::{schema, TradeColumns};

const META_FORMAT: &str = "cryptopulse.format";
const META_ROWS: &str = "cryptopulse.rows";
const META_SYMBOLS: &str = "cryptopulse.symbols";
const META_IDS: &str = "cryptopulse.ids";

/// The trade ids of one symbol in an archive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolIds {
    pub first: i64,
    pub last: i64,
    pub count: u64,
    /// Inclusive ranges of ids between `first` and `last` not in the file.
    pub missing: Vec<[i64; 2]>,
}

/// What an archive holds, as written into its metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub rows: u64,
    pub symbols: BTreeMap<String, SymbolIds>,
}

impl ArchiveSummary {
    /// Reads the summary from an archive's metadata.
    pub fn read(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(file).map_err(|e| parquet_err(path, e))?;
        let kv: BTreeMap<&str, &str> = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .into_iter()
            .flatten()
            .filter_map(|kv| Some((kv.key.as_str(), kv.value.as_deref()?)))
            .collect();
        let bad = |what: &str| Error::invalid_data(path.display().to_string(), format!("not a cryptopulse archive ({what})"));
        let rows = kv.get(META_ROWS).and_then(|v| v.parse().ok()).ok_or_else(|| bad("rows"))?;
        let symbols = kv.get(META_IDS).and_then(|v| serde_json::from_str(v).ok()).ok_or_else(|| bad("ids"))?;
        Ok(ArchiveSummary { rows, symbols })
    }
}

/// Writes one archive: batches in, a complete file out on [`finish`](Self::finish).
pub struct ArchiveWriter {
    path: PathBuf,
    tmp: PathBuf,
    writer: ArrowWriter<File>,
    ids: BTreeMap<String, Vec<i64>>,
    rows: u64,
}

impl ArchiveWriter {
    /// Starts `path`; until finished the data sits in a hidden `.tmp` beside it.
    pub fn create(path: &Path) -> Result<Self> {
        let name = path.file_name().ok_or_else(|| Error::Config(format!("{}: not a file name", path.display())))?;
        let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(|e| parquet_err(path, e))?))
            .build();
        let writer = ArrowWriter::try_new(file, schema(), Some(properties)).map_err(|e| parquet_err(path, e))?;
        Ok(ArchiveWriter { path: path.to_owned(), tmp, writer, ids: BTreeMap::new(), rows: 0 })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let cols = TradeColumns::new(batch)?;
        for row in 0..batch.num_rows() {
            let symbol = cols.symbol_at(row);
            match self.ids.get_mut(symbol) {
                Some(ids) => ids.push(cols.id.value(row)),
                None => {
                    self.ids.insert(symbol.to_owned(), vec![cols.id.value(row)]);
                }
            }
        }
        self.rows += batch.num_rows() as u64;
        self.writer.write(batch).map_err(|e| parquet_err(&self.path, e))
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The final name of the archive.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the file holds so far, counting the row group still in memory
    /// at its estimated encoded size.
    pub fn bytes(&self) -> u64 {
        (self.writer.bytes_written() + self.writer.in_progress_size()) as u64
    }

    /// Writes the metadata, syncs and moves the file to its final name.
    pub fn finish(mut self) -> Result<ArchiveSummary> {
        let summary =
            ArchiveSummary { rows: self.rows, symbols: self.ids.iter_mut().map(|(s, ids)| (s.clone(), summarize(ids))).collect() };
        let symbols: Vec<&str> = summary.symbols.keys().map(String::as_str).collect();
        let ids = serde_json::to_string(&summary.symbols).map_err(|e| Error::Invariant(format!("symbol ids not serializable: {e}")))?;
        for (key, value) in
            [(META_FORMAT, "1".to_owned()), (META_ROWS, self.rows.to_string()), (META_SYMBOLS, symbols.join(",")), (META_IDS, ids)]
        {
            self.writer.append_key_value_metadata(KeyValue::new(key.to_owned(), value));
        }
        let file = self.writer.into_inner().map_err(|e| parquet_err(&self.path, e))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))?;
        }
        Ok(summary)
    }
}

fn summarize(ids: &mut Vec<i64>) -> SymbolIds {
    ids.sort_unstable();
    ids.dedup();
    let missing = ids.windows(2).filter(|w| w[1] > w[0] + 1).map(|w| [w[0] + 1, w[1] - 1]).collect();
    SymbolIds { first: ids[0], last: ids[ids.len() - 1], count: ids.len() as u64, missing }
}

/// Reads an archive's batches, checking they are trades. Archives written
/// before prices and quantities were widened to 38 digits (18 then) are
/// handed out in today's schema: their values are the same units.
pub fn open(path: &Path, batch_rows: usize) -> Result<impl Iterator<Item = Result<RecordBatch, ArrowError>> + Send> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
    let widen = if builder.schema().fields() == schema().fields() {
        false
    } else if builder.schema().fields() == narrow_schema().fields() {
        true
    } else {
        return Err(Error::invalid_data(path.display().to_string(), format!("not a trade archive (schema {:?})", builder.schema())));
    };
    let reader = builder.with_batch_size(batch_rows).build().map_err(|e| parquet_err(path, e))?;
    Ok(reader.map(move |batch| if widen { batch.and_then(|b| widened(&b)) } else { batch }))
}

/// The trade schema with the decimals of archives before the widening.
fn narrow_schema() -> Schema {
    let fields: Vec<Field> = schema()
        .fields()
        .iter()
        .map(|field| match field.data_type() {
            DataType::Decimal128(_, scale) => {
                field.as_ref().clone().with_data_type(DataType::Decimal128(decimal::PRECISION_BEFORE_2026_12, *scale))
            }
            _ => field.as_ref().clone(),
        })
        .collect();
    Schema::new(fields)
}

/// A batch of a narrow archive in today's schema: the same values, wider.
fn widened(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let columns = batch
        .columns()
        .iter()
        .map(|column| match column.data_type() {
            DataType::Decimal128(_, scale) => {
                let values = column.as_primitive::<Decimal128Type>().clone().with_precision_and_scale(decimal::PRECISION, *scale)?;
                Ok(Arc::new(values) as ArrayRef)
            }
            _ => Ok(column.clone()),
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    RecordBatch::try_new(schema(), columns)
}

fn parquet_err(path: &Path, source: parquet::errors::ParquetError) -> Error {
    Error::Parquet { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_ids_and_gaps() {
        let mut ids = vec![5, 3, 4, 9, 9, 12];
        assert_eq!(summarize(&mut ids), SymbolIds { first: 3, last: 12, count: 5, missing: vec![[6, 8], [10, 11]] });
    }
}
