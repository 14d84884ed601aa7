//! The consumer's checkpoint store (SPEC §7): per partition, its window
//! state and the next offset to read, written together in one synced
//! RocksDB `WriteBatch`. Offsets live here, not in the consumer group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::window::PartitionState;

/// Bumped whenever the stored layout changes; older stores are refused.
pub const FORMAT_VERSION: u32 = 1;
const CF_META: &str = "meta";
const CF_PARTITIONS: &str = "partitions";
const KEY_FORMAT: &[u8] = b"format_version";
const KEY_TOPIC: &[u8] = b"topic";
const KEY_IDENTITY: &[u8] = b"identity";
const KEY_MEMBER: &[u8] = b"member";

/// Memtable size of a column family. Every checkpoint rewrites the state
/// of its partitions, so a memtable fills with versions of the same keys:
/// RocksDB's default (64 MiB, two of them) made the consumer's memory grow
/// over a long run (benches/HISTORY.md, item 13). At this size it flushes
/// every few checkpoints, in the background.
const MEMTABLE_BYTES: usize = 4 << 20;
/// Write-ahead log kept before the memtables are flushed.
const WAL_BYTES: u64 = 16 << 20;

fn family_options() -> Options {
    let mut options = Options::default();
    options.set_write_buffer_size(MEMTABLE_BYTES);
    options.set_max_write_buffer_number(2);
    options
}

/// What is stored for one partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionCheckpoint {
    /// The next offset to read: everything before it is in `state`.
    pub next_offset: i64,
    pub state: PartitionState,
}

impl PartitionCheckpoint {
    /// Serialized, into a buffer of `capacity` bytes to begin with (give
    /// the previous size and it is not regrown). The consumer hands this to
    /// its writer instead of a copy of the state: at 10,000 symbols the copy
    /// cost more than the serialization.
    pub fn encode(&self, partition: i32, capacity: usize) -> Result<Encoded> {
        let bytes = postcard::to_extend(self, Vec::with_capacity(capacity))
            .map_err(|e| Error::Invariant(format!("partition {partition}: state not serializable: {e}")))?;
        Ok(Encoded { partition, next_offset: self.next_offset, bytes })
    }

    /// What [`encode`](Self::encode) made, read back.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }
}

/// One partition's checkpoint as it is stored.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub partition: i32,
    pub next_offset: i64,
    bytes: Vec<u8>,
}

impl Encoded {
    /// Serialized size in bytes.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// The serialized checkpoint.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// What the state in a store depends on (SPEC §7): the topic, its partition
/// count, the window widths and the RSI period. A consumer with other values
/// refuses the store rather than mix two configurations in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub topic: String,
    pub partitions: usize,
    pub bar_ms: i64,
    pub vwap_ms: i64,
    pub rsi_period: u32,
}

impl Identity {
    /// Each value by the name of the flag that sets it.
    fn fields(&self) -> [(&'static str, String); 5] {
        [
            ("topic", self.topic.clone()),
            ("partitions", self.partitions.to_string()),
            ("bar-ms", self.bar_ms.to_string()),
            ("vwap-ms", self.vwap_ms.to_string()),
            ("rsi-period", self.rsi_period.to_string()),
        ]
    }

    pub fn encode(&self) -> String {
        self.fields().iter().map(|(name, value)| format!("{name}={value}\n")).collect()
    }

    /// What differs from a stored identity, one `name: stored X, given Y` each.
    fn differences(&self, stored: &str) -> Vec<String> {
        let stored: BTreeMap<&str, &str> = stored.lines().filter_map(|line| line.split_once('=')).collect();
        self.fields()
            .into_iter()
            .filter_map(|(name, value)| {
                let was = stored.get(name).copied().unwrap_or("(none)");
                (was != value).then(|| format!("{name}: stored {was}, given {value}"))
            })
            .collect()
    }
}

/// A checkpoint built by [`CheckpointStore::prepare`], written by
/// [`CheckpointStore::commit`].
pub struct Prepared(WriteBatch);

/// An open checkpoint store, owned by one consumer at a time.
pub struct CheckpointStore {
    db: DB,
    path: PathBuf,
}

impl CheckpointStore {
    /// Opens (or creates) the store for `topic` in `path`. Refuses a store
    /// of another format or topic, and one another process holds open.
    pub fn open(path: &Path, topic: &str) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Bounded memory and disk: reaching this much write-ahead log
        // flushes the memtables (a dozen checkpoints at 10,000 symbols),
        // see `family_options`.
        options.set_max_total_wal_size(WAL_BYTES);
        let families = [CF_META, CF_PARTITIONS].map(|name| ColumnFamilyDescriptor::new(name, family_options()));
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|source| {
            if source.to_string().contains("lock") {
                Error::CheckpointFormat {
                    path: path.to_owned(),
                    reason: "in use by another consumer (its RocksDB LOCK is held); give each consumer its own --state-dir".into(),
                }
            } else {
                Error::Checkpoint { path: path.to_owned(), source }
            }
        })?;
        let store = CheckpointStore { db, path: path.to_owned() };
        store.check_format(topic)?;
        Ok(store)
    }

    fn check_format(&self, topic: &str) -> Result<()> {
        let meta = self.cf(CF_META)?;
        let refuse = |reason: String| Err(Error::CheckpointFormat { path: self.path.clone(), reason });
        match self.db.get_cf(meta, KEY_FORMAT).map_err(|e| self.err(e))? {
            None => {
                let mut batch = WriteBatch::default();
                batch.put_cf(meta, KEY_FORMAT, FORMAT_VERSION.to_be_bytes());
                batch.put_cf(meta, KEY_TOPIC, topic.as_bytes());
                return self.write(batch);
            }
            Some(v) if v.as_slice() != FORMAT_VERSION.to_be_bytes() => {
                return refuse(format!("format version {v:?}, this build reads {FORMAT_VERSION}"));
            }
            Some(_) => {}
        }
        let stored = self.db.get_cf(meta, KEY_TOPIC).map_err(|e| self.err(e))?.unwrap_or_default();
        if stored != topic.as_bytes() {
            return refuse(format!("holds state of topic {:?}, not {topic:?}", String::from_utf8_lossy(&stored)));
        }
        Ok(())
    }

    /// Refuses a store whose state was made with another [`Identity`], naming
    /// each value that differs; a store without one (new, or written before
    /// identities were kept) takes this one.
    pub fn check_identity(&self, identity: &Identity) -> Result<()> {
        let meta = self.cf(CF_META)?;
        let Some(stored) = self.db.get_cf(meta, KEY_IDENTITY).map_err(|e| self.err(e))? else {
            let mut batch = WriteBatch::default();
            batch.put_cf(meta, KEY_IDENTITY, identity.encode().as_bytes());
            return self.write(batch);
        };
        let differences = identity.differences(&String::from_utf8_lossy(&stored));
        if differences.is_empty() {
            return Ok(());
        }
        Err(Error::CheckpointFormat {
            path: self.path.clone(),
            reason: format!(
                "its state was made with other settings ({}); the output depends on them, so it cannot go on with these: \
                 run with the stored values, or start from a fresh --state-dir (the topic is then read from its start)",
                differences.join("; ")
            ),
        })
    }

    /// Every partition checkpointed so far.
    pub fn load(&self) -> Result<Vec<(i32, PartitionCheckpoint)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_PARTITIONS)?, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let partition = <[u8; 4]>::try_from(key.as_ref()).map(i32::from_be_bytes).map_err(|_| self.corrupt("partition key"))?;
            let checkpoint = postcard::from_bytes(&value).map_err(|_| self.corrupt("partition state"))?;
            out.push((partition, checkpoint));
        }
        Ok(out)
    }

    /// One partition's checkpoint, if it has one.
    pub fn load_partition(&self, partition: i32) -> Result<Option<PartitionCheckpoint>> {
        let value = self.db.get_cf(self.cf(CF_PARTITIONS)?, partition.to_be_bytes()).map_err(|e| self.err(e))?;
        value.map(|v| postcard::from_bytes(&v).map_err(|_| self.corrupt("partition state"))).transpose()
    }

    /// The name this store's consumer goes by in its group, made once and
    /// kept: the same state dir is the same member (Kafka's static
    /// membership, `group.instance.id`), so a restart takes over its own
    /// partitions at once, and another state dir is another member.
    pub fn member_id(&self) -> Result<String> {
        let meta = self.cf(CF_META)?;
        if let Some(stored) = self.db.get_cf(meta, KEY_MEMBER).map_err(|e| self.err(e))? {
            return String::from_utf8(stored).map_err(|_| self.corrupt("member id"));
        }
        use std::hash::BuildHasher;
        let seed = (std::time::SystemTime::now(), std::process::id(), &self.path);
        let made = format!("cryptopulse-{:016x}", std::collections::hash_map::RandomState::new().hash_one(seed));
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, KEY_MEMBER, made.as_bytes());
        self.write(batch)?;
        Ok(made)
    }

    /// Writes the given partitions' state and offsets in one synced batch.
    /// Blocking: call it off the async runtime.
    pub fn save<'a>(&self, partitions: impl IntoIterator<Item = (i32, &'a PartitionCheckpoint)>) -> Result<()> {
        let encoded = partitions.into_iter().map(|(partition, checkpoint)| checkpoint.encode(partition, 0)).collect::<Result<Vec<_>>>()?;
        self.save_encoded(&encoded)
    }

    /// [`save`](Self::save) of partitions already serialized.
    pub fn save_encoded(&self, partitions: &[Encoded]) -> Result<()> {
        self.commit(self.prepare(partitions)?)
    }

    /// The batch that saves `partitions`, not yet written.
    pub fn prepare(&self, partitions: &[Encoded]) -> Result<Prepared> {
        let cf = self.cf(CF_PARTITIONS)?;
        let mut batch = WriteBatch::default();
        for encoded in partitions {
            batch.put_cf(cf, encoded.partition.to_be_bytes(), &encoded.bytes);
        }
        Ok(Prepared(batch))
    }

    /// Writes a prepared batch, synced: all of it or, after a crash, none.
    pub fn commit(&self, prepared: Prepared) -> Result<()> {
        let started = std::time::Instant::now();
        self.write(prepared.0)?;
        metrics::histogram!(crate::telemetry::CHECKPOINT_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options).map_err(|e| self.err(e))
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| self.corrupt("column family missing"))
    }

    fn err(&self, source: rocksdb::Error) -> Error {
        Error::Checkpoint { path: self.path.clone(), source }
    }

    fn corrupt(&self, what: &str) -> Error {
        Error::CheckpointFormat { path: self.path.clone(), reason: format!("unreadable: {what}") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_partitions_and_refuses_a_second_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), "trades.raw").unwrap();
        let mut checkpoint = PartitionCheckpoint { next_offset: 42, ..Default::default() };
        checkpoint.state.counts.applied = 7;
        store.save([(3, &checkpoint), (0, &PartitionCheckpoint::default())]).unwrap();
        assert_eq!(store.load().unwrap(), vec![(0, PartitionCheckpoint::default()), (3, checkpoint.clone())]);
        assert_eq!(store.load_partition(3).unwrap(), Some(checkpoint.clone()));
        assert_eq!(store.load_partition(5).unwrap(), None);
        let member = store.member_id().unwrap();
        assert!(member.starts_with("cryptopulse-") && member.len() > 20, "{member}");

        let second = CheckpointStore::open(dir.path(), "trades.raw").err().unwrap();
        assert!(second.to_string().contains("in use by another consumer"), "{second}");
        drop(store);
        // The same state dir is the same group member after a restart.
        assert_eq!(CheckpointStore::open(dir.path(), "trades.raw").unwrap().member_id().unwrap(), member);

        let other_topic = CheckpointStore::open(dir.path(), "other").err().unwrap();
        assert!(other_topic.to_string().contains("not \"other\""), "{other_topic}");
        assert_eq!(CheckpointStore::open(dir.path(), "trades.raw").unwrap().load().unwrap()[1].1, checkpoint);
    }

    /// Each checkpoint rewrites whole partitions; over a long run the
    /// memtables and the write-ahead log must stay a few checkpoints big.
    #[test]
    fn a_store_refuses_other_settings_naming_each_and_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity { topic: "trades.raw".into(), partitions: 6, bar_ms: 1000, vwap_ms: 5000, rsi_period: 14 };
        let store = CheckpointStore::open(dir.path(), "trades.raw").unwrap();
        store.check_identity(&identity).unwrap();
        store.check_identity(&identity).unwrap();
        let changed = Identity { partitions: 12, rsi_period: 7, ..identity.clone() };
        let err = store.check_identity(&changed).unwrap_err().to_string();
        assert!(err.contains("partitions: stored 6, given 12") && err.contains("rsi-period: stored 14, given 7"), "{err}");
        assert!(!err.contains("bar-ms"), "{err}");
        // The refusal wrote nothing: the stored identity still stands.
        store.check_identity(&identity).unwrap();
        let err = store.check_identity(&Identity { bar_ms: 2000, vwap_ms: 10_000, ..identity }).unwrap_err().to_string();
        assert!(err.contains("bar-ms: stored 1000, given 2000") && err.contains("vwap-ms: stored 5000, given 10000"), "{err}");
    }

    #[test]
    fn memory_and_log_stay_bounded_over_many_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), "trades.raw").unwrap();
        let mut checkpoint = PartitionCheckpoint::default();
        for i in 0..10_000 {
            checkpoint.state.symbols.insert(format!("SYMBOL{i:06}USDT"), Default::default());
        }
        let size = checkpoint.encode(0, 0).unwrap().size();
        let rounds = (48 << 20) / size + 1;
        for round in 0..rounds {
            checkpoint.next_offset = round as i64;
            store.save([(0, &checkpoint)]).unwrap();
        }
        let cf = store.cf(CF_PARTITIONS).unwrap();
        let memtables = store.db.property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables").unwrap().unwrap();
        let log: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        // 48 MiB written, in checkpoints of `size` bytes.
        assert!(memtables <= 2 * MEMTABLE_BYTES as u64 + 2 * size as u64, "memtables hold {memtables} bytes (checkpoint {size})");
        assert!(log <= WAL_BYTES + 2 * MEMTABLE_BYTES as u64, "write-ahead log is {log} bytes");
        assert_eq!(store.load().unwrap()[0].1.next_offset, rounds as i64 - 1);
    }
}
