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

/// Rows in a Parquet file: a trade archive's or any other's (see [`open`]).
pub fn row_count(path: &Path) -> Result<u64> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| parquet_err(path, e))?;
    Ok(u64::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0))
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
    let read = if builder.schema().fields() == schema().fields() {
        Read::AsIs
    } else if builder.schema().fields() == narrow_schema().fields() {
        Read::Widened
    } else {
        Read::Cast(cast_plan(builder.schema(), path)?)
    };
    let reader = builder.with_batch_size(batch_rows).build().map_err(|e| parquet_err(path, e))?;
    Ok(reader.map(move |batch| match &read {
        Read::AsIs => batch,
        Read::Widened => batch.and_then(|b| widened(&b)),
        Read::Cast(plan) => batch.and_then(|b| cast(&b, plan)),
    }))
}

/// How the batches of a Parquet file become trade batches.
enum Read {
    /// A trade archive of today's schema.
    AsIs,
    /// A trade archive from before the decimals were widened.
    Widened,
    /// Any other Parquet: per field of the trade schema, the column it is
    /// cast from (none: the optional event time, left empty).
    Cast(Vec<Option<usize>>),
}

/// Which column of `found` each field of the trade schema is cast from,
/// by name: an error names a missing column or one that cannot be cast.
fn cast_plan(found: &Schema, path: &Path) -> Result<Vec<Option<usize>>> {
    let bad = |detail: String| Error::invalid_data(path.display().to_string(), detail);
    let trades = schema();
    let needed: Vec<&str> = trades.fields().iter().filter(|f| !f.is_nullable()).map(|f| f.name().as_str()).collect();
    trades
        .fields()
        .iter()
        .map(|field| match found.index_of(field.name()) {
            Ok(at) if arrow::compute::can_cast_types(found.field(at).data_type(), field.data_type()) => Ok(Some(at)),
            Ok(at) => Err(bad(format!(
                "column {:?} is {}, which does not cast to the trade schema's {}",
                field.name(),
                found.field(at).data_type(),
                field.data_type()
            ))),
            Err(_) if field.is_nullable() => Ok(None),
            Err(_) => Err(bad(format!(
                "no column {:?}: a trade archive needs the columns {needed:?} (event_time optional); this file has {:?}",
                field.name(),
                found.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
            ))),
        })
        .collect()
}

/// A batch of another Parquet in the trade schema: each column cast, with
/// an error (not a null) for a value that does not fit; a null in a column
/// the schema requires is an error too.
fn cast(batch: &RecordBatch, plan: &[Option<usize>]) -> Result<RecordBatch, ArrowError> {
    let options = arrow::compute::CastOptions { safe: false, ..Default::default() };
    let columns = schema()
        .fields()
        .iter()
        .zip(plan)
        .map(|(field, from)| match from {
            Some(at) => arrow::compute::cast_with_options(batch.column(*at), field.data_type(), &options),
            None => Ok(arrow::array::new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    RecordBatch::try_new(schema(), columns)
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
    fn any_parquet_whose_columns_cast_reads_as_trades_and_a_missing_column_is_named() {
        use arrow::array::{BooleanArray, Int64Array, StringArray};
        let dir = tempfile::tempdir().unwrap();
        // Another tool's file: other types, another order, an extra column,
        // no event time.
        let foreign = Arc::new(Schema::new(vec![
            Field::new("trade_time", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
            Field::new("price", DataType::Utf8, false),
            Field::new("qty", DataType::Utf8, false),
            Field::new("symbol", DataType::Utf8, false),
            Field::new("trade_id", DataType::Int64, false),
            Field::new("buyer_is_maker", DataType::Boolean, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![1_723_161_255_100, 1_723_161_255_900])),
            Arc::new(StringArray::from(vec![Some("x"), None])),
            Arc::new(StringArray::from(vec!["61828.02", "0.00000123"])),
            Arc::new(StringArray::from(vec!["0.5", "25000000000.5"])),
            Arc::new(StringArray::from(vec!["BTCUSDT", "BTCUSDT"])),
            Arc::new(Int64Array::from(vec![7, 8])),
            Arc::new(BooleanArray::from(vec![true, false])),
        ];
        let write = |name: &str, schema: Arc<Schema>, columns: Vec<ArrayRef>| {
            let path = dir.path().join(name);
            let mut writer = ArrowWriter::try_new(File::create(&path).unwrap(), schema.clone(), None).unwrap();
            writer.write(&RecordBatch::try_new(schema, columns).unwrap()).unwrap();
            writer.close().unwrap();
            path
        };
        let path = write("foreign.parquet", foreign.clone(), columns.clone());
        let batches: Vec<RecordBatch> = open(&path, 100).unwrap().map(|b| b.unwrap()).collect();
        let cols = TradeColumns::new(&batches[0]).unwrap();
        let (first, second) = (cols.trade(0), cols.trade(1));
        assert_eq!((first.symbol.as_ref(), first.id, first.price, first.qty), ("BTCUSDT", 7, 6_182_802_000_000, 50_000_000));
        assert_eq!((first.time_ms, first.buyer_is_maker, first.event_time_ms), (1_723_161_255_100, true, None));
        assert_eq!((second.price, second.qty), (123, 2_500_000_000_050_000_000));

        // Without the quantity: an error naming it, and what the file has.
        let no_qty = Arc::new(Schema::new(foreign.fields().iter().filter(|f| f.name() != "qty").cloned().collect::<Vec<_>>()));
        let mut without = columns.clone();
        without.remove(3);
        let err = open(&write("no-qty.parquet", no_qty, without), 100).err().unwrap().to_string();
        assert!(err.contains("no column \"qty\"") && err.contains("\"note\""), "{err}");
        // A value that does not fit is an error, not a null.
        let mut bad = columns;
        bad[2] = Arc::new(StringArray::from(vec!["61828.02", "not a price"]));
        let read: Vec<_> = open(&write("bad.parquet", foreign, bad), 100).unwrap().collect();
        assert!(read[0].is_err());
    }

    #[test]
    fn summarizes_ids_and_gaps() {
        let mut ids = vec![5, 3, 4, 9, 9, 12];
        assert_eq!(summarize(&mut ids), SymbolIds { first: 3, last: 12, count: 5, missing: vec![[6, 8], [10, 11]] });
    }
}
