//! The crate's own trade and its one Arrow schema, shared by the consumer,
//! the recorder and the replayer: a batch of trades is a `RecordBatch` of
//! this schema.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, BooleanArray, BooleanBuilder, Decimal128Array, Decimal128Builder, DictionaryArray, Int64Array,
    Int64Builder, RecordBatch, StringArray, StringDictionaryBuilder, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};

use crate::decimal;
use crate::error::{Error, Result};

/// One trade (SPEC §1). Prices and quantities are fixed point, 1e-8 units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trade<'a> {
    pub symbol: Cow<'a, str>,
    pub id: i64,
    pub price: i128,
    pub qty: i128,
    /// Trade time `T`, ms since the epoch: the event time of everything.
    pub time_ms: i64,
    /// True when the taker sold.
    pub buyer_is_maker: bool,
    /// Binance's event time `E`, kept only so replays reproduce the event.
    pub event_time_ms: Option<i64>,
}

/// Column names of the trade schema.
pub mod col {
    pub const SYMBOL: &str = "symbol";
    pub const TRADE_ID: &str = "trade_id";
    pub const PRICE: &str = "price";
    pub const QTY: &str = "qty";
    pub const TRADE_TIME: &str = "trade_time";
    pub const BUYER_IS_MAKER: &str = "buyer_is_maker";
    pub const EVENT_TIME: &str = "event_time";
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn decimal_type() -> DataType {
    DataType::Decimal128(decimal::PRECISION, decimal::SCALE)
}

/// The Arrow schema of a trade.
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let symbol = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
            Arc::new(Schema::new(vec![
                Field::new(col::SYMBOL, symbol, false),
                Field::new(col::TRADE_ID, DataType::Int64, false),
                Field::new(col::PRICE, decimal_type(), false),
                Field::new(col::QTY, decimal_type(), false),
                Field::new(col::TRADE_TIME, time_type(), false),
                Field::new(col::BUYER_IS_MAKER, DataType::Boolean, false),
                Field::new(col::EVENT_TIME, time_type(), true),
            ]))
        })
        .clone()
}

/// Appends trades and turns them into a `RecordBatch` of [`schema`].
pub struct TradeBatchBuilder {
    symbol: StringDictionaryBuilder<Int32Type>,
    id: Int64Builder,
    price: Decimal128Builder,
    qty: Decimal128Builder,
    time: TimestampMillisecondBuilder,
    buyer_is_maker: BooleanBuilder,
    event_time: TimestampMillisecondBuilder,
}

impl Default for TradeBatchBuilder {
    fn default() -> Self {
        Self::with_capacity(1024)
    }
}

impl TradeBatchBuilder {
    pub fn with_capacity(rows: usize) -> Self {
        TradeBatchBuilder {
            symbol: StringDictionaryBuilder::new(),
            id: Int64Builder::with_capacity(rows),
            price: Decimal128Builder::with_capacity(rows),
            qty: Decimal128Builder::with_capacity(rows),
            time: TimestampMillisecondBuilder::with_capacity(rows),
            buyer_is_maker: BooleanBuilder::with_capacity(rows),
            event_time: TimestampMillisecondBuilder::with_capacity(rows),
        }
    }

    pub fn push(&mut self, trade: &Trade<'_>) {
        self.symbol.append_value(&trade.symbol);
        self.id.append_value(trade.id);
        self.price.append_value(trade.price);
        self.qty.append_value(trade.qty);
        self.time.append_value(trade.time_ms);
        self.buyer_is_maker.append_value(trade.buyer_is_maker);
        self.event_time.append_option(trade.event_time_ms);
    }

    pub fn len(&self) -> usize {
        self.id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch of everything pushed so far; the builder starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch> {
        let decimal = |b: &mut Decimal128Builder| -> Result<ArrayRef> {
            Ok(Arc::new(b.finish().with_precision_and_scale(decimal::PRECISION, decimal::SCALE)?))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.symbol.finish()),
            Arc::new(self.id.finish()),
            decimal(&mut self.price)?,
            decimal(&mut self.qty)?,
            Arc::new(self.time.finish().with_timezone("UTC")),
            Arc::new(self.buyer_is_maker.finish()),
            Arc::new(self.event_time.finish().with_timezone("UTC")),
        ];
        Ok(RecordBatch::try_new(schema(), columns)?)
    }
}

/// Typed views of a trade batch's columns, for computing over whole slices.
pub struct TradeColumns<'a> {
    pub symbol: &'a DictionaryArray<Int32Type>,
    pub symbol_values: &'a StringArray,
    pub id: &'a Int64Array,
    pub price: &'a Decimal128Array,
    pub qty: &'a Decimal128Array,
    pub time: &'a TimestampMillisecondArray,
    pub buyer_is_maker: &'a BooleanArray,
    pub event_time: &'a TimestampMillisecondArray,
}

impl<'a> TradeColumns<'a> {
    /// Checks that `batch` has the trade schema and borrows its columns.
    pub fn new(batch: &'a RecordBatch) -> Result<Self> {
        if batch.schema().fields() != schema().fields() {
            return Err(Error::invalid_data("a trade batch", format!("schema {:?} is not the trade schema", batch.schema())));
        }
        let symbol = downcast::<DictionaryArray<Int32Type>>(batch, 0)?;
        let symbol_values = symbol
            .values()
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::invalid_data("a trade batch", "symbol dictionary values are not strings"))?;
        Ok(TradeColumns {
            symbol,
            symbol_values,
            id: downcast(batch, 1)?,
            price: downcast(batch, 2)?,
            qty: downcast(batch, 3)?,
            time: downcast(batch, 4)?,
            buyer_is_maker: downcast(batch, 5)?,
            event_time: downcast(batch, 6)?,
        })
    }

    /// The symbol of row `row`.
    pub fn symbol_at(&self, row: usize) -> &'a str {
        self.symbol_values.value(self.symbol.keys().value(row) as usize)
    }

    /// Row `row` as a [`Trade`] (for re-encoding a dead-lettered or replayed row).
    pub fn trade(&self, row: usize) -> Trade<'a> {
        Trade {
            symbol: Cow::Borrowed(self.symbol_at(row)),
            id: self.id.value(row),
            price: self.price.value(row),
            qty: self.qty.value(row),
            time_ms: self.time.value(row),
            buyer_is_maker: self.buyer_is_maker.value(row),
            event_time_ms: self.event_time.is_valid(row).then(|| self.event_time.value(row)),
        }
    }
}

fn downcast<T: 'static>(batch: &RecordBatch, index: usize) -> Result<&T> {
    batch
        .column(index)
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| Error::invalid_data("a trade batch", format!("column {index} has an unexpected type")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_reads_back_a_batch() {
        let trade = Trade {
            symbol: "BTCUSDT".into(),
            id: 7,
            price: 6_183_763_000_000,
            qty: 2_000_000,
            time_ms: 1_723_161_255_342,
            buyer_is_maker: true,
            event_time_ms: None,
        };
        let mut builder = TradeBatchBuilder::default();
        builder.push(&trade);
        builder.push(&Trade { symbol: "ETHUSDT".into(), id: 9, ..trade.clone() });
        let batch = builder.finish().unwrap();
        assert!(builder.is_empty());
        let cols = TradeColumns::new(&batch).unwrap();
        assert_eq!(cols.trade(0), trade);
        assert_eq!(cols.symbol_at(1), "ETHUSDT");
        assert_eq!(batch.num_rows(), 2);
    }
}
