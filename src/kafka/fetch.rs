//! Records from the broker in batches. rdkafka's `poll` hands out one
//! message per call through librdkafka's event API: a queue lock, three
//! clock reads and an `Arc` per message, which made the polling thread the
//! bottleneck of the no-op ceiling (benches/HISTORY.md, item 17). Here the
//! assigned partitions' fetch queues are forwarded to a queue of our own,
//! served with `rd_kafka_consume_batch_queue`.
//!
//! Only records and per-partition errors (end of partition, offset out of
//! range) take this path. Statistics, logs and client errors stay on the
//! consumer's own queue, which the caller still polls once per round
//! ([`FetchQueue::serve_events`]). A consumer whose partitions change (a
//! group rebalance) forwards each newly assigned partition before it starts
//! fetching ([`Forwarding::add`]), as [`FetchQueue::assign`] does for a
//! static assignment.
//!
//! The only `unsafe` of the crate, confined to this module: each call is
//! librdkafka's documented queue and message API, and every message is
//! destroyed exactly once, when the [`Fetched`] holding it is dropped.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

use crate::error::{Error, Result};

/// Records taken from librdkafka per call, at most.
pub const MAX_BATCH: usize = 1024;

/// Our queue, and the partition queues forwarded to it, of a consumer with
/// context `C`.
pub struct FetchQueue<C: ConsumerContext + 'static> {
    /// Dropped before `consumer`: its handles point into the client.
    forwarding: Arc<Forwarding>,
    /// Room for the message pointers of one batch, allocated once.
    slots: Vec<*mut rd::rd_kafka_message_t>,
    /// Held so the client outlives every queue handle of it.
    consumer: Arc<BaseConsumer<C>>,
}

// SAFETY: librdkafka's queue handles may be used from any thread (its
// queues lock internally); a FetchQueue is used by one thread at a time
// (`&mut self`), and the client it points into is kept alive by `consumer`.
unsafe impl<C: ConsumerContext + 'static> Send for FetchQueue<C> {}

/// Our queue and which partitions' fetch queues are forwarded to it. A
/// group member's rebalance callback adds and removes partitions through
/// it (holding it weakly: the [`FetchQueue`] owns it).
pub struct Forwarding {
    rk: NonNull<rd::rd_kafka_t>,
    queue: NonNull<rd::rd_kafka_queue_t>,
    partitions: Mutex<BTreeMap<(String, i32), NonNull<rd::rd_kafka_queue_t>>>,
}

// SAFETY: as for FetchQueue; the partition handles are behind a mutex, and
// the client `rk` points to outlives the Forwarding (its FetchQueue holds
// the client and drops the Forwarding first).
unsafe impl Send for Forwarding {}
// SAFETY: see Send; every method takes the mutex or only reads the handles.
unsafe impl Sync for Forwarding {}

impl Forwarding {
    /// Forwards the fetch queues of `list`'s partitions to ours; call it
    /// before they are assigned: a record fetched before the forward would
    /// go to the consumer's own queue.
    pub fn add(&self, list: &TopicPartitionList) -> Result<()> {
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for element in list.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if partitions.contains_key(&key) {
                continue;
            }
            let topic_c = CString::new(key.0.as_str()).map_err(|_| Error::Config(format!("topic {:?} has a NUL byte", key.0)))?;
            // SAFETY: rk is a live client handle; topic_c outlives the call.
            let handle = unsafe { rd::rd_kafka_queue_get_partition(self.rk.as_ptr(), topic_c.as_ptr(), key.1) };
            let handle =
                NonNull::new(handle).ok_or_else(|| Error::Invariant(format!("librdkafka has no fetch queue for {}/{}", key.0, key.1)))?;
            // SAFETY: both handles are live; forwarding keeps a reference to
            // our queue until it is undone in `remove` or Drop.
            unsafe { rd::rd_kafka_queue_forward(handle.as_ptr(), self.queue.as_ptr()) };
            partitions.insert(key, handle);
        }
        Ok(())
    }

    /// Undoes the forward of `list`'s partitions, once they are unassigned.
    pub fn remove(&self, list: &TopicPartitionList) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for element in list.elements() {
            if let Some(handle) = partitions.remove(&(element.topic().to_owned(), element.partition())) {
                unforward(handle);
            }
        }
    }
}

/// Undoes one forward and releases the partition's queue handle.
fn unforward(handle: NonNull<rd::rd_kafka_queue_t>) {
    // SAFETY: the handle is live and released once (its owner removed it);
    // undoing the forward releases its reference to our queue.
    unsafe {
        rd::rd_kafka_queue_forward(handle.as_ptr(), std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(handle.as_ptr());
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let partitions = std::mem::take(self.partitions.get_mut().unwrap_or_else(|e| e.into_inner()));
        partitions.into_values().for_each(unforward);
        // SAFETY: the last handle of our queue; records still in it are
        // destroyed with it.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

impl<C: ConsumerContext + 'static> FetchQueue<C> {
    /// A queue of `consumer` with nothing forwarded to it yet.
    pub fn new(consumer: Arc<BaseConsumer<C>>) -> Result<Self> {
        let rk =
            NonNull::new(consumer.client().native_ptr()).ok_or_else(|| Error::Invariant("librdkafka client without a handle".into()))?;
        // SAFETY: rk is a live client handle (held by `consumer`).
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(rk.as_ptr()) })
            .ok_or_else(|| Error::Invariant("librdkafka could not make a queue".into()))?;
        let forwarding = Arc::new(Forwarding { rk, queue, partitions: Mutex::new(BTreeMap::new()) });
        Ok(FetchQueue { forwarding, slots: vec![std::ptr::null_mut(); MAX_BATCH], consumer })
    }

    /// Assigns `consumer` the partitions of `list`, their fetch queues
    /// forwarded to a new queue first.
    pub fn assign(consumer: Arc<BaseConsumer<C>>, list: &TopicPartitionList) -> Result<Self> {
        let fetch = FetchQueue::new(consumer)?;
        fetch.forwarding.add(list)?;
        fetch.consumer.assign(list).map_err(|e| Error::kafka("assign", e))?;
        Ok(fetch)
    }

    /// The forwarding a rebalance callback updates; held weakly there, so
    /// it goes when this queue does.
    pub fn forwarding(&self) -> std::sync::Weak<Forwarding> {
        Arc::downgrade(&self.forwarding)
    }

    /// The client this queue reads for.
    pub fn consumer(&self) -> &BaseConsumer<C> {
        &self.consumer
    }

    /// Up to `max` records (at most [`MAX_BATCH`]): the first within
    /// `timeout` (none if it passes), then only what is already queued,
    /// without waiting for more.
    pub fn fetch(&mut self, timeout: Duration, max: usize) -> Fetched<'_> {
        let max = max.clamp(1, MAX_BATCH);
        // librdkafka fills a batch until it is full or the timeout passes:
        // wait for one record, then take the rest without waiting.
        let mut got = self.consume(timeout, 0, 1);
        if got == 1 && max > 1 {
            got += self.consume(Duration::ZERO, 1, max - 1);
        }
        Fetched { slots: &mut self.slots[..got] }
    }

    fn consume(&mut self, timeout: Duration, at: usize, count: usize) -> usize {
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the queue is live and `slots[at..at + count]` is ours to fill.
        let got =
            unsafe { rd::rd_kafka_consume_batch_queue(self.forwarding.queue.as_ptr(), timeout_ms, self.slots.as_mut_ptr().add(at), count) };
        // -1 only for a queue handle that is not a consumer's, which ours is.
        usize::try_from(got).unwrap_or(0)
    }

    /// Serves the consumer's own queue: statistics (the lag gauge), logs
    /// and client errors. Returns an error it hands out, if any.
    pub fn serve_events(&self) -> Option<KafkaError> {
        match self.consumer.poll(Duration::ZERO) {
            Some(Err(e)) => Some(e),
            // Records are forwarded to our queue before assignment and never
            // reach this one; if one did, it would be read twice or skipped
            // without a word.
            Some(Ok(message)) => Some(KafkaError::MessageConsumption(unexpected(message.partition(), message.offset()))),
            None => None,
        }
    }
}

fn unexpected(partition: i32, offset: i64) -> RDKafkaErrorCode {
    tracing::error!(partition, offset, "a record came through the consumer queue instead of the fetch queue");
    RDKafkaErrorCode::Fatal
}

/// A batch of records, destroyed when dropped.
pub struct Fetched<'a> {
    slots: &'a mut [*mut rd::rd_kafka_message_t],
}

/// One record of a batch, or a partition's error.
pub struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
    pub key: Option<&'a [u8]>,
    /// `PartitionEOF` at the end of a partition; otherwise librdkafka's error.
    pub error: Option<KafkaError>,
    /// The value of its [`CLOCK_HEADER`](super::CLOCK_HEADER), looked up
    /// only in records without a key (a trade always has one).
    pub clock: Option<&'a [u8]>,
}

impl Fetched<'_> {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The records in the order librdkafka handed them out (offset order
    /// within a partition), borrowed from the batch.
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        self.slots.iter().map(|&message| self.record(message))
    }

    fn record(&self, message: *mut rd::rd_kafka_message_t) -> Record<'_> {
        // SAFETY: librdkafka filled the slots with messages it hands over to
        // us; they stay valid until destroyed when this batch drops, and the
        // record borrows the batch.
        let m = unsafe { &*message };
        let bytes = |ptr: *mut std::ffi::c_void, len: usize| {
            // SAFETY: a non-null payload or key points to `len` bytes owned
            // by the message.
            (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
        };
        // `err` is read as rdkafka-sys's enum, generated from the header of
        // the librdkafka it builds and links: every code it sets is a variant.
        let error = match m.err {
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => None,
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF => Some(KafkaError::PartitionEOF(m.partition)),
            code => Some(KafkaError::MessageConsumption(RDKafkaErrorCode::from(code))),
        };
        let key = bytes(m.key, m.key_len);
        let clock = if key.is_none() && error.is_none() { clock_header(message) } else { None };
        Record {
            partition: m.partition,
            offset: m.offset,
            payload: if error.is_some() { &[] } else { bytes(m.payload, m.len).unwrap_or_default() },
            key,
            error,
            clock,
        }
    }
}

/// The NUL-terminated name librdkafka looks headers up by.
const CLOCK_HEADER_C: &std::ffi::CStr = c"cryptopulse.clock";
const _: () = assert!(CLOCK_HEADER_C.to_bytes().len() == super::CLOCK_HEADER.len());

/// The value of a message's clock header, if it has one.
fn clock_header<'a>(message: *mut rd::rd_kafka_message_t) -> Option<&'a [u8]> {
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message is live (see `record`); librdkafka parses its
    // headers once and keeps them with the message, which outlives 'a.
    if unsafe { rd::rd_kafka_message_headers(message, &mut headers) } != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return None;
    }
    let (mut value, mut size): (*const std::ffi::c_void, usize) = (std::ptr::null(), 0);
    // SAFETY: `headers` belongs to the live message, the name is NUL-terminated.
    let found = unsafe { rd::rd_kafka_header_get_last(headers, CLOCK_HEADER_C.as_ptr(), &mut value, &mut size) };
    if found != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || value.is_null() {
        return None;
    }
    // SAFETY: librdkafka points `value` at `size` bytes held by the message's headers.
    Some(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
}

impl Drop for Fetched<'_> {
    fn drop(&mut self) {
        for slot in self.slots.iter_mut() {
            // SAFETY: each message is ours and destroyed once (the slot is
            // nulled after).
            unsafe { rd::rd_kafka_message_destroy(*slot) };
            *slot = std::ptr::null_mut();
        }
    }
}
