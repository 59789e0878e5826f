//! The record batch: the one layout that travels on the wire, sits in the
//! commit log and is served back to consumers, byte for byte.
//!
//! A producer encodes a batch ([`BatchBuilder`]) with its body CRC. The
//! broker checks it ([`validate_produced`]: lengths, CRC, framing, reserved
//! fields zero), stamps the broker-owned header fields (queue id, base
//! offset, append time, log position) and the header MAC ([`stamp`]), and
//! appends it unchanged otherwise. The broker's readers and recovery check
//! both the MAC and the body CRC ([`check_stored`]); clients, which do not
//! hold the key, check the body CRC ([`check_fetched`]).
//!
//! The header MAC is SipHash-1-3 keyed with the segment's secret
//! [`SegmentKey`] over bytes 4..52 (every stamped field and the body CRC),
//! truncated to 32 bits. A producer can put any bytes in a payload, even a
//! perfect copy of a stored batch, but cannot compute a MAC without the key,
//! so its bytes are never taken for a stored batch (by recovery looking for
//! the next batch after damaged bytes, or by a reader given a forged
//! position). The byte layout is documented in `docs/PROTOCOL.md`; all
//! integers are little-endian.
//!
//! ```text
//! 0   u32 header_mac     SipHash-1-3(segment key, bytes 4..52), low 32 bits
//! 4   u32 batch_len      whole batch, header included
//! 8   u16 magic          0x4B51 ("KQ")
//! 10  u8  version        1
//! 11  u8  reserved       0
//! 12  u32 queue_id       stamped by the broker
//! 16  u64 base_offset    stamped: queue offset of the first record
//! 24  i64 append_time_ms stamped: broker clock at append
//! 32  u64 log_position   stamped: where the batch sits in the shard's log
//! 40  u64 term           replication term (0 until replication)
//! 48  u32 body_crc       CRC32 of bytes 52..batch_len, by the producer
//! 52  u16 attributes     0 in a produced batch; see below
//! 54  u16 reserved       0
//! 56  u32 record_count
//! 60  u32 extra          0, but for a scheduled batch (its target queue
//!                        id), a reference batch (the bytes of the view it
//!                        resolves to) and a view (the record count of its
//!                        source)
//! 64  i64 first_timestamp_ms  producer clock
//! 72  i64 max_timestamp_ms    producer clock
//! 80  records...
//! ```
//!
//! `attributes` (a produced batch has 0; a produce with any bit set is
//! refused):
//! - [`BATCH_ATTR_VIEW`] (bit 0): a *view*, only ever sent to consumers,
//!   never stored: some records of a stored batch (a filter kept only
//!   them) or the messages a reference batch points at. The header is its
//!   source's (stamped fields kept, `header_mac` 0, its own `batch_len`,
//!   `record_count` and `body_crc`, `extra` = the source's record count,
//!   so the view covers queue offsets `base_offset .. base_offset +
//!   extra`), then `record_count` × 16 bytes (u32 offset delta, strictly
//!   increasing; u32 origin index; u64 origin position), then the records.
//!   Record `j` has queue offset `base_offset + delta[j]` and message id
//!   (shard, origin position, origin index).
//! - [`BATCH_ATTR_SCHEDULED`] (bit 1), stored only: a produced batch
//!   holding scheduled records, kept in the shard's timer queue; `extra` is
//!   the queue its records are delivered in (the broker rewrites the body
//!   CRC). Its records keep their places, so their ids are the batch's
//!   position and their index, as for any batch.
//! - [`BATCH_ATTR_CARRIED`] (bit 2), stored only: scheduled records copied
//!   forward in the timer queue (before retention removes the segment of
//!   their batch).
//! - [`BATCH_ATTR_REFERENCE`] (bit 3), stored only: fired scheduled
//!   messages in their queue. Each record's payload is a [`Reference`]
//!   (where the message is stored, and its id); readers serve views.

use bytes::{BufMut, Bytes, BytesMut};
use std::hash::Hasher;
use thiserror::Error;

/// Size of the fixed batch header.
pub const BATCH_HEADER_BYTES: usize = 80;
/// Magic number at byte 8 of every batch.
pub const BATCH_MAGIC: u16 = 0x4B51;
/// Current batch format version.
pub const BATCH_VERSION: u8 = 1;
/// Fixed bytes of a record before its variable fields (length included).
pub const RECORD_FIXED_BYTES: usize = 4 + 1 + 1 + 2 + 8 + 8;

/// `attributes` bit of a view (sent only; see the module docs).
pub const BATCH_ATTR_VIEW: u16 = 1;
/// `attributes` bit of a stored batch of scheduled records.
pub const BATCH_ATTR_SCHEDULED: u16 = 2;
/// `attributes` bit of a stored batch of carried scheduled records.
pub const BATCH_ATTR_CARRIED: u16 = 4;
/// `attributes` bit of a stored batch of references to fired messages.
pub const BATCH_ATTR_REFERENCE: u16 = 8;
/// Bytes of one entry of a view's table.
pub const VIEW_ENTRY_BYTES: usize = 16;
/// Highest record priority.
pub const PRIORITY_MAX: u8 = 9;

/// Bytes the header MAC covers: every stamped field and the body CRC.
const HEADER_MAC_RANGE: std::ops::Range<usize> = 4..52;
const BODY_CRC_START: usize = 52;

/// The secret key of one segment file: stamps and checks the header MAC of
/// every batch stored in it. Kept in the segment's header page, never sent
/// to a client.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SegmentKey(pub [u8; 16]);

impl std::fmt::Debug for SegmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SegmentKey(..)")
    }
}

/// The header MAC of a batch under `key` (bytes 4..52; `b` holds at least
/// 52 bytes).
pub fn header_mac(b: &[u8], key: &SegmentKey) -> u32 {
    let mut h = siphasher::sip::SipHasher13::new_with_key(&key.0);
    h.write(&b[HEADER_MAC_RANGE]);
    h.finish() as u32
}

/// Record flag: a key is present.
pub const RECORD_FLAG_KEY: u8 = 1;
/// Record flag: a tag is present.
pub const RECORD_FLAG_TAG: u8 = 2;
/// Record flag bits with a meaning; the others must be zero.
const RECORD_FLAGS_KNOWN: u8 = RECORD_FLAG_KEY | RECORD_FLAG_TAG;

/// Why a batch was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch shorter than its {BATCH_HEADER_BYTES}-byte header ({0} bytes)")]
    TooShort(usize),
    #[error("batch length field says {declared} bytes but {actual} bytes are present")]
    LengthMismatch { declared: u32, actual: usize },
    #[error("batch of {0} bytes exceeds batch_bytes_max {1}")]
    TooLarge(usize, usize),
    #[error("bad batch magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported batch version {0}")]
    BadVersion(u8),
    #[error("batch body CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BodyCrc { stored: u32, computed: u32 },
    /// The header MAC does not match: damaged bytes, or bytes the broker
    /// never stamped (a producer's payload). The computed value is not
    /// shown, since it would let a caller forge one.
    #[error("batch header MAC does not match")]
    HeaderMac,
    #[error("reserved field {0} is not zero")]
    ReservedNotZero(&'static str),
    #[error("batch has no records")]
    Empty,
    #[error("record {index}: {reason}")]
    BadRecord { index: u32, reason: &'static str },
    #[error("batch declares {declared} records but holds {actual}")]
    CountMismatch { declared: u32, actual: u32 },
}

/// The decoded fixed header of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub header_mac: u32,
    pub batch_len: u32,
    pub queue_id: u32,
    pub base_offset: u64,
    pub append_time_ms: i64,
    pub log_position: u64,
    pub term: u64,
    pub body_crc: u32,
    pub attributes: u16,
    pub record_count: u32,
    /// Bytes 60..64: a scheduled batch's target queue id, a reference
    /// batch's view size, a view's source record count, else 0.
    pub extra: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl BatchHeader {
    /// Parses the header and checks magic and version; no CRC check.
    pub fn parse(b: &[u8]) -> Result<BatchHeader, BatchError> {
        if b.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::TooShort(b.len()));
        }
        let magic = u16_at(b, 8);
        if magic != BATCH_MAGIC {
            return Err(BatchError::BadMagic(magic));
        }
        if b[10] != BATCH_VERSION {
            return Err(BatchError::BadVersion(b[10]));
        }
        Ok(BatchHeader {
            header_mac: u32_at(b, 0),
            batch_len: u32_at(b, 4),
            queue_id: u32_at(b, 12),
            base_offset: u64_at(b, 16),
            append_time_ms: i64_at(b, 24),
            log_position: u64_at(b, 32),
            term: u64_at(b, 40),
            body_crc: u32_at(b, 48),
            attributes: u16_at(b, 52),
            record_count: u32_at(b, 56),
            extra: u32_at(b, 60),
            first_timestamp_ms: i64_at(b, 64),
            max_timestamp_ms: i64_at(b, 72),
        })
    }

    /// Queue offset one past the last record of this batch (of a view:
    /// of its source).
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.offset_count())
    }

    /// Queue offsets the batch covers (a view: its source's).
    pub fn offset_count(&self) -> u32 {
        if self.attributes & BATCH_ATTR_VIEW != 0 {
            self.extra
        } else {
            self.record_count
        }
    }

    /// Whether this is a view ([`BATCH_ATTR_VIEW`]).
    pub fn is_view(&self) -> bool {
        self.attributes & BATCH_ATTR_VIEW != 0
    }

    /// Whether this stored batch holds references to fired messages.
    pub fn is_reference(&self) -> bool {
        self.attributes & BATCH_ATTR_REFERENCE != 0
    }
}

/// Reads `batch_len` from the first 8 bytes of a batch, if present.
pub fn peek_batch_len(b: &[u8]) -> Option<u32> {
    (b.len() >= 8).then(|| u32_at(b, 4))
}

/// Checks a batch as a producer sent it: lengths, magic, version, body CRC
/// and every record's framing. Broker-stamped fields are ignored.
pub fn validate_produced(b: &[u8], batch_bytes_max: usize) -> Result<BatchHeader, BatchError> {
    validate_produced_tags(b, batch_bytes_max).map(|p| p.header)
}

/// What [`validate_produced_tags`] learns of a produced batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Produced {
    pub header: BatchHeader,
    /// Its tag bits and highest priority.
    pub summary: Summary,
    /// Some record has a `deliver_at_ms` (it may be scheduled).
    pub timed: bool,
}

/// What the broker's indexes keep of a batch's records, so readers skip
/// batches unread: the union of [`tag_bloom`] over its records' tags (0:
/// none has a tag) and its highest record priority.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub tags: u32,
    pub max_priority: u8,
}

impl Summary {
    /// A batch of untagged records of priority 0 (the broker's own).
    pub const NONE: Summary = Summary {
        tags: 0,
        max_priority: 0,
    };
}

/// [`validate_produced`], also returning the batch's tag summary and
/// whether a record is timed.
pub fn validate_produced_tags(b: &[u8], batch_bytes_max: usize) -> Result<Produced, BatchError> {
    if b.len() > batch_bytes_max {
        return Err(BatchError::TooLarge(b.len(), batch_bytes_max));
    }
    let header = BatchHeader::parse(b)?;
    check_len_crc(b, &header)?;
    check_reserved(b, 0)?;
    if header.record_count == 0 {
        return Err(BatchError::Empty);
    }
    let mut actual = 0u32;
    let mut tags = 0u32;
    let mut max_priority = 0u8;
    let mut timed = false;
    for record in RecordIter::new(b) {
        let r = record?;
        if r.priority > PRIORITY_MAX {
            return Err(BatchError::BadRecord {
                index: r.index,
                reason: "priority above 9",
            });
        }
        if let Some(t) = r.tag {
            tags |= tag_bloom(t.as_bytes());
        }
        timed |= r.deliver_at_ms != 0;
        max_priority = max_priority.max(r.priority);
        actual += 1;
    }
    if actual != header.record_count {
        return Err(BatchError::CountMismatch {
            declared: header.record_count,
            actual,
        });
    }
    Ok(Produced {
        header,
        summary: Summary { tags, max_priority },
        timed,
    })
}

/// The summary of a stored batch (see [`Summary`]): of a reference batch,
/// the tags its references carry and its records' priorities (the fired
/// messages').
pub fn summary(b: &[u8]) -> Summary {
    let max_priority = RecordIter::new(b)
        .map_while(Result::ok)
        .fold(0, |m, r| m.max(r.priority));
    Summary {
        tags: tag_summary(b),
        max_priority,
    }
}

/// The tag bits of a stored batch (see [`Summary`]): of a reference batch,
/// the union its references carry.
pub fn tag_summary(b: &[u8]) -> u32 {
    let reference = BatchHeader::parse(b).is_ok_and(|h| h.is_reference());
    RecordIter::new(b)
        .map_while(Result::ok)
        .fold(0, |acc, r| match (reference, r.tag) {
            (true, _) => acc | Reference::decode(r.payload).map_or(u32::MAX, |x| x.tags),
            (false, Some(t)) => acc | tag_bloom(t.as_bytes()),
            (false, None) => acc,
        })
}

fn check_body_crc(b: &[u8], header: &BatchHeader) -> Result<(), BatchError> {
    let computed = crc32fast::hash(&b[BODY_CRC_START..]);
    if computed != header.body_crc {
        return Err(BatchError::BodyCrc {
            stored: header.body_crc,
            computed,
        });
    }
    Ok(())
}

/// Reserved header fields must be zero, so a later version can give them a
/// meaning without old data being misread. `attributes` must be one of
/// `allowed` (a produced batch: 0 only); `extra` may be set only on a
/// scheduled batch and a view.
fn check_reserved(b: &[u8], allowed: u16) -> Result<(), BatchError> {
    if b[11] != 0 {
        return Err(BatchError::ReservedNotZero("header byte 11"));
    }
    let attributes = u16_at(b, 52);
    if attributes != 0 && (attributes & !allowed != 0 || !attributes.is_power_of_two()) {
        return Err(BatchError::ReservedNotZero("attributes"));
    }
    if u16_at(b, 54) != 0 {
        return Err(BatchError::ReservedNotZero("header bytes 54..56"));
    }
    if u32_at(b, 60) != 0
        && attributes & (BATCH_ATTR_SCHEDULED | BATCH_ATTR_VIEW | BATCH_ATTR_REFERENCE) == 0
    {
        return Err(BatchError::ReservedNotZero("header bytes 60..64"));
    }
    Ok(())
}

/// Attributes a stored batch may carry.
const STORED_ATTRIBUTES: u16 = BATCH_ATTR_SCHEDULED | BATCH_ATTR_CARRIED | BATCH_ATTR_REFERENCE;

/// Marks a validated produced batch as a scheduled batch for `target`
/// (the queue id its records are delivered in): attributes, `extra` and
/// the body CRC. The broker stores it in the shard's timer queue.
pub fn mark_scheduled(b: &mut [u8], target: u32) {
    b[52..54].copy_from_slice(&BATCH_ATTR_SCHEDULED.to_le_bytes());
    b[60..64].copy_from_slice(&target.to_le_bytes());
    let crc = crc32fast::hash(&b[BODY_CRC_START..]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
}

/// The time a record is due, in ms since the epoch, given the broker's
/// clock at append: `deliver_at_ms` 0 is now, a positive value that
/// instant, a negative one a delay of `-deliver_at_ms` ms from `now_ms`.
pub fn due_ms(deliver_at_ms: i64, now_ms: i64) -> i64 {
    match deliver_at_ms {
        0 => now_ms,
        d if d < 0 => now_ms.saturating_add(d.saturating_neg()),
        d => d,
    }
}

/// Writes the broker-owned fields and the header MAC into a batch that
/// passed [`validate_produced`].
pub fn stamp(
    b: &mut [u8],
    queue_id: u32,
    base_offset: u64,
    append_time_ms: i64,
    log_position: u64,
    key: &SegmentKey,
) {
    assert!(b.len() >= BATCH_HEADER_BYTES, "stamp on a short batch");
    b[12..16].copy_from_slice(&queue_id.to_le_bytes());
    b[16..24].copy_from_slice(&base_offset.to_le_bytes());
    b[24..32].copy_from_slice(&append_time_ms.to_le_bytes());
    b[32..40].copy_from_slice(&log_position.to_le_bytes());
    b[40..48].copy_from_slice(&0u64.to_le_bytes());
    let mac = header_mac(b, key);
    b[0..4].copy_from_slice(&mac.to_le_bytes());
}

/// Checks a stored batch as the broker's readers and recovery do: header
/// MAC under the segment's key, length, body CRC, reserved fields. `b` must
/// hold exactly `batch_len` bytes.
pub fn check_stored(b: &[u8], key: &SegmentKey) -> Result<BatchHeader, BatchError> {
    let header = check_stored_header(b, key)?;
    check_len_crc(b, &header)?;
    check_reserved(b, STORED_ATTRIBUTES)?;
    Ok(header)
}

/// Checks only the header of a stored batch (magic, version, MAC, a sane
/// length). `b` needs only the first [`BATCH_HEADER_BYTES`] bytes.
pub fn check_stored_header(b: &[u8], key: &SegmentKey) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(b)?;
    if header_mac(b, key) != header.header_mac {
        return Err(BatchError::HeaderMac);
    }
    if (header.batch_len as usize) < BATCH_HEADER_BYTES {
        return Err(BatchError::TooShort(header.batch_len as usize));
    }
    Ok(header)
}

/// Checks a batch a client fetched (a stored batch or a view): lengths,
/// magic, version, body CRC, reserved fields and a view's table (a client
/// does not hold the key, so the header MAC is the broker's to check).
pub fn check_fetched(b: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(b)?;
    check_len_crc(b, &header)?;
    check_reserved(b, BATCH_ATTR_VIEW)?;
    if !header.is_view() {
        return Ok(header);
    }
    let table = view_table(b).ok_or(BatchError::BadRecord {
        index: 0,
        reason: "view's table runs past the batch",
    })?;
    let mut last = None;
    for (j, t) in table.chunks_exact(VIEW_ENTRY_BYTES).enumerate() {
        let d = u32_at(t, 0);
        if last.is_some_and(|l| d <= l) || d >= header.extra {
            return Err(BatchError::BadRecord {
                index: j as u32,
                reason: "view's offset deltas do not increase within its source",
            });
        }
        last = Some(d);
    }
    Ok(header)
}

/// A view's table (`None` if it runs past the batch).
fn view_table(b: &[u8]) -> Option<&[u8]> {
    let n = u32_at(b, 56) as usize;
    let end = n
        .checked_mul(VIEW_ENTRY_BYTES)?
        .checked_add(BATCH_HEADER_BYTES)?;
    b.get(BATCH_HEADER_BYTES..end)
}

/// One record of a view being built: its offset delta from the view's
/// base offset, its id (origin position and index) and its bytes as
/// framed in a batch ([`RecordView::raw`]).
#[derive(Clone, Copy, Debug)]
pub struct ViewRecord<'a> {
    pub delta: u32,
    pub origin_position: u64,
    pub origin_index: u32,
    pub raw: &'a [u8],
}

/// Builds a view (see the module docs) with the header of `source` (a
/// stored batch, reference batch or view) covering `source_count` offsets
/// from its base offset, holding `records` (deltas increasing).
pub fn build_view(source: &[u8], source_count: u32, records: &[ViewRecord<'_>]) -> Bytes {
    let n = records.len();
    let body: usize = records.iter().map(|r| r.raw.len()).sum();
    let mut out = BytesMut::with_capacity(BATCH_HEADER_BYTES + n * VIEW_ENTRY_BYTES + body);
    out.extend_from_slice(&source[..BATCH_HEADER_BYTES]);
    for r in records {
        out.put_u32_le(r.delta);
        out.put_u32_le(r.origin_index);
        out.put_u64_le(r.origin_position);
    }
    for r in records {
        out.extend_from_slice(r.raw);
    }
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&0u32.to_le_bytes());
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[52..54].copy_from_slice(&BATCH_ATTR_VIEW.to_le_bytes());
    out[56..60].copy_from_slice(&(n as u32).to_le_bytes());
    out[60..64].copy_from_slice(&source_count.to_le_bytes());
    let crc = crc32fast::hash(&out[BODY_CRC_START..]);
    out[48..52].copy_from_slice(&crc.to_le_bytes());
    out.freeze()
}

/// A view of `batch` (a checked stored batch or a view) holding only its
/// records at the places `keep` lists (increasing positions in iteration
/// order, each below its record count).
pub fn select_records(batch: &[u8], keep: &[u32]) -> Bytes {
    let h = BatchHeader::parse(batch).expect("select_records: a checked batch");
    let records: Vec<RecordView<'_>> = RecordIter::new(batch).map_while(Result::ok).collect();
    assert!(
        keep.iter().all(|&k| (k as usize) < records.len()),
        "select_records: a place past the batch"
    );
    let chosen: Vec<ViewRecord<'_>> = keep
        .iter()
        .map(|&k| {
            let r = &records[k as usize];
            ViewRecord {
                delta: r.index,
                origin_position: r.origin_position,
                origin_index: r.origin_index,
                raw: r.raw,
            }
        })
        .collect();
    build_view(batch, h.offset_count(), &chosen)
}

/// Where a fired scheduled message is stored and what it is: the payload
/// of one record of a reference batch ([`BATCH_ATTR_REFERENCE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Its id: the position and index it was scheduled at.
    pub origin_position: u64,
    pub origin_index: u32,
    /// Where its record is now (its origin, or where it was carried): the
    /// batch's position, the record's index in it and its byte offset.
    pub location_position: u64,
    pub location_index: u32,
    pub location_offset: u32,
    /// The record's bytes as framed (length included) and their CRC-32,
    /// so a reader takes exactly them, checked, without the whole batch.
    pub len: u32,
    pub crc: u32,
    /// Its tag's bits ([`tag_bloom`]; 0 without a tag).
    pub tags: u32,
}

/// Bytes of an encoded [`Reference`].
pub const REFERENCE_BYTES: usize = 40;

impl Reference {
    pub fn encode(&self) -> [u8; REFERENCE_BYTES] {
        let mut b = [0u8; REFERENCE_BYTES];
        b[0..8].copy_from_slice(&self.origin_position.to_le_bytes());
        b[8..12].copy_from_slice(&self.origin_index.to_le_bytes());
        b[12..20].copy_from_slice(&self.location_position.to_le_bytes());
        b[20..24].copy_from_slice(&self.location_index.to_le_bytes());
        b[24..28].copy_from_slice(&self.location_offset.to_le_bytes());
        b[28..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..36].copy_from_slice(&self.crc.to_le_bytes());
        b[36..40].copy_from_slice(&self.tags.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Option<Reference> {
        (b.len() == REFERENCE_BYTES).then(|| Reference {
            origin_position: u64_at(b, 0),
            origin_index: u32_at(b, 8),
            location_position: u64_at(b, 12),
            location_index: u32_at(b, 20),
            location_offset: u32_at(b, 24),
            len: u32_at(b, 28),
            crc: u32_at(b, 32),
            tags: u32_at(b, 36),
        })
    }
}

/// The bits a tag sets in a batch's tag summary: a 32-bit Bloom filter of
/// the tags of its records (two bits per tag, from its CRC-32), kept in the
/// consume index so a tag filter skips batches without reading them.
pub fn tag_bloom(tag: &[u8]) -> u32 {
    let h = crc32fast::hash(tag);
    (1 << (h & 31)) | (1 << ((h >> 5) & 31))
}

/// The declared length is the bytes present and the body CRC holds.
fn check_len_crc(b: &[u8], header: &BatchHeader) -> Result<(), BatchError> {
    if header.batch_len as usize != b.len() {
        return Err(BatchError::LengthMismatch {
            declared: header.batch_len,
            actual: b.len(),
        });
    }
    check_body_crc(b, header)
}

/// One record inside a batch, borrowed from the batch bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// Its queue offset's delta from the batch's base offset: in a stored
    /// batch its place, in a view from the view's table.
    pub index: u32,
    /// Its id's log position and index: in a stored batch the batch's
    /// position and its place, in a view from the view's table.
    pub origin_position: u64,
    pub origin_index: u32,
    pub priority: u8,
    pub timestamp_ms: i64,
    pub deliver_at_ms: i64,
    pub key: Option<&'a [u8]>,
    pub tag: Option<&'a str>,
    pub properties: Vec<(&'a str, &'a str)>,
    pub payload: &'a [u8],
    /// Byte range of the payload inside the batch (for zero-copy slicing).
    pub payload_range: std::ops::Range<usize>,
    /// The record as framed in the batch (its length included).
    pub raw: &'a [u8],
    /// Where `raw` starts in the batch, in bytes.
    pub at: usize,
}

/// Iterates the records of a batch, checking their framing.
pub struct RecordIter<'a> {
    batch: &'a [u8],
    at: usize,
    index: u32,
    /// A view's table (empty for a stored batch).
    table: &'a [u8],
    /// The batch's log position (a stored batch's records' ids).
    position: u64,
    failed: bool,
}

impl<'a> RecordIter<'a> {
    /// Iterates records of `batch` (the whole batch, header included; a
    /// stored batch or a view).
    pub fn new(batch: &'a [u8]) -> Self {
        let mut it = RecordIter {
            batch,
            at: BATCH_HEADER_BYTES.min(batch.len()),
            index: 0,
            table: &[],
            position: 0,
            failed: false,
        };
        if batch.len() >= BATCH_HEADER_BYTES {
            it.position = u64_at(batch, 32);
            if u16_at(batch, 52) & BATCH_ATTR_VIEW != 0 {
                match view_table(batch) {
                    Some(t) => {
                        it.table = t;
                        it.at = BATCH_HEADER_BYTES + t.len();
                    }
                    None => it.failed = true,
                }
            }
        }
        it
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|s| i64::from_le_bytes(s.try_into().unwrap()))
    }
    fn str16(&mut self) -> Result<&'a str, &'static str> {
        let n = self.u16().ok_or("truncated string length")?;
        let s = self.take(n as usize).ok_or("truncated string")?;
        std::str::from_utf8(s).map_err(|_| "string is not UTF-8")
    }
}

/// Parses the record `rec` (its body, after the length) found at byte
/// `base` of its batch; `raw` is the record with its length.
fn parse_record<'a>(
    rec: &'a [u8],
    raw: &'a [u8],
    base: usize,
    (index, origin_position, origin_index): (u32, u64, u32),
) -> Result<RecordView<'a>, &'static str> {
    let mut c = Cursor { b: rec, at: 0 };
    let flags = c.take(1).ok_or("truncated")?[0];
    if flags & !RECORD_FLAGS_KNOWN != 0 {
        return Err("reserved record flag bits are set");
    }
    let priority = c.take(1).ok_or("truncated")?[0];
    let n_props = c.u16().ok_or("truncated")?;
    let timestamp_ms = c.i64().ok_or("truncated")?;
    let deliver_at_ms = c.i64().ok_or("truncated")?;
    let key = if flags & RECORD_FLAG_KEY != 0 {
        let n = c.u16().ok_or("truncated key length")?;
        Some(c.take(n as usize).ok_or("truncated key")?)
    } else {
        None
    };
    let tag = if flags & RECORD_FLAG_TAG != 0 {
        Some(c.str16()?)
    } else {
        None
    };
    let mut properties = Vec::with_capacity(n_props as usize);
    for _ in 0..n_props {
        let k = c.str16()?;
        let v = c.str16()?;
        properties.push((k, v));
    }
    let n = c.u32().ok_or("truncated payload length")?;
    let start = c.at;
    let payload = c.take(n as usize).ok_or("truncated payload")?;
    if c.at != rec.len() {
        return Err("record length does not match its fields");
    }
    Ok(RecordView {
        index,
        origin_position,
        origin_index,
        priority,
        timestamp_ms,
        deliver_at_ms,
        key,
        tag,
        properties,
        payload,
        payload_range: base + start..base + start + n as usize,
        raw,
        at: base - 4,
    })
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordView<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.batch.len() {
            return None;
        }
        let index = self.index;
        let fail = |s: &mut Self, reason| {
            s.failed = true;
            Some(Err(BatchError::BadRecord { index, reason }))
        };
        let Some(len) = self.batch.get(self.at..self.at + 4) else {
            return fail(self, "truncated record length");
        };
        let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
        let start = self.at + 4;
        let Some(end) = start.checked_add(len).filter(|&e| e <= self.batch.len()) else {
            return fail(self, "record runs past the batch");
        };
        let place = if self.table.is_empty() {
            (index, self.position, index)
        } else {
            let at = index as usize * VIEW_ENTRY_BYTES;
            match self.table.get(at..at + VIEW_ENTRY_BYTES) {
                Some(t) => (u32_at(t, 0), u64_at(t, 8), u32_at(t, 4)),
                None => return fail(self, "more records than the view's table"),
            }
        };
        match parse_record(
            &self.batch[start..end],
            &self.batch[self.at..end],
            start,
            place,
        ) {
            Ok(view) => {
                self.at = end;
                self.index += 1;
                Some(Ok(view))
            }
            Err(reason) => fail(self, reason),
        }
    }
}

/// A message as a producer gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Bytes>,
    pub tag: Option<String>,
    pub properties: Vec<(String, String)>,
    pub payload: Bytes,
    /// Producer clock, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// 0 (the default, lowest) to 9 (highest): group consumers in message
    /// delivery and push get higher priorities first.
    pub priority: u8,
    /// When the message becomes visible: 0 now, a positive value that
    /// instant (ms since the epoch, the broker's clock), a negative one a
    /// delay of that many ms from when the broker takes it.
    pub deliver_at_ms: i64,
}

impl Record {
    /// Bytes this record takes inside a batch.
    pub fn encoded_len(&self) -> usize {
        RECORD_FIXED_BYTES
            + self.key.as_ref().map_or(0, |k| 2 + k.len())
            + self.tag.as_ref().map_or(0, |t| 2 + t.len())
            + self
                .properties
                .iter()
                .map(|(k, v)| 4 + k.len() + v.len())
                .sum::<usize>()
            + 4
            + self.payload.len()
    }

    /// Checks the limits the format imposes on one record.
    pub fn check(&self) -> Result<(), &'static str> {
        let short = |n: usize| n <= u16::MAX as usize;
        if !self.key.as_ref().is_none_or(|k| short(k.len())) {
            return Err("key longer than 65535 bytes");
        }
        if !self.tag.as_ref().is_none_or(|t| short(t.len())) {
            return Err("tag longer than 65535 bytes");
        }
        if !short(self.properties.len()) {
            return Err("more than 65535 properties");
        }
        if !self
            .properties
            .iter()
            .all(|(k, v)| short(k.len()) && short(v.len()))
        {
            return Err("property key or value longer than 65535 bytes");
        }
        if self.payload.len() > u32::MAX as usize / 2 {
            return Err("payload too large");
        }
        if self.priority > PRIORITY_MAX {
            return Err("priority above 9");
        }
        Ok(())
    }
}

/// Encodes records into one batch (client side).
#[derive(Default)]
pub struct BatchBuilder {
    buf: BytesMut,
    count: u32,
    first_ts: i64,
    max_ts: i64,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(4096);
        buf.resize(BATCH_HEADER_BYTES, 0);
        BatchBuilder {
            buf,
            count: 0,
            first_ts: 0,
            max_ts: 0,
        }
    }

    /// Records added so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch would take if finished now.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends one record. The caller checks it with [`Record::check`].
    pub fn push(&mut self, r: &Record) {
        self.push_at(r, r.timestamp_ms);
    }

    /// Appends a record as framed in another batch (`RecordView::raw`),
    /// byte for byte; `timestamp_ms` is its timestamp.
    pub fn push_raw(&mut self, raw: &[u8], timestamp_ms: i64) {
        self.buf.extend_from_slice(raw);
        if self.count == 0 {
            self.first_ts = timestamp_ms;
            self.max_ts = timestamp_ms;
        }
        self.max_ts = self.max_ts.max(timestamp_ms);
        self.count += 1;
    }

    /// Appends a record of only a payload (no key, tag or properties),
    /// without building a [`Record`].
    pub fn push_payload(&mut self, priority: u8, timestamp_ms: i64, payload: &[u8]) {
        let b = &mut self.buf;
        b.reserve(RECORD_FIXED_BYTES + 4 + payload.len());
        b.put_u32_le((RECORD_FIXED_BYTES + payload.len()) as u32);
        b.put_u8(0);
        b.put_u8(priority);
        b.put_u16_le(0);
        b.put_i64_le(timestamp_ms);
        b.put_i64_le(0);
        b.put_u32_le(payload.len() as u32);
        b.put_slice(payload);
        if self.count == 0 {
            self.first_ts = timestamp_ms;
            self.max_ts = timestamp_ms;
        }
        self.max_ts = self.max_ts.max(timestamp_ms);
        self.count += 1;
    }

    /// Appends one record with `timestamp_ms` in place of its own (a
    /// producer stamping records at send time without copying them).
    pub fn push_at(&mut self, r: &Record, timestamp_ms: i64) {
        let len = r.encoded_len() - 4;
        let b = &mut self.buf;
        b.reserve(len + 4);
        b.put_u32_le(len as u32);
        let flags = if r.key.is_some() { RECORD_FLAG_KEY } else { 0 }
            | if r.tag.is_some() { RECORD_FLAG_TAG } else { 0 };
        b.put_u8(flags);
        b.put_u8(r.priority);
        b.put_u16_le(r.properties.len() as u16);
        b.put_i64_le(timestamp_ms);
        b.put_i64_le(r.deliver_at_ms);
        if let Some(k) = &r.key {
            b.put_u16_le(k.len() as u16);
            b.put_slice(k);
        }
        if let Some(t) = &r.tag {
            b.put_u16_le(t.len() as u16);
            b.put_slice(t.as_bytes());
        }
        for (k, v) in &r.properties {
            b.put_u16_le(k.len() as u16);
            b.put_slice(k.as_bytes());
            b.put_u16_le(v.len() as u16);
            b.put_slice(v.as_bytes());
        }
        b.put_u32_le(r.payload.len() as u32);
        b.put_slice(&r.payload);
        if self.count == 0 {
            self.first_ts = timestamp_ms;
            self.max_ts = timestamp_ms;
        }
        self.max_ts = self.max_ts.max(timestamp_ms);
        self.count += 1;
    }

    /// Writes the header and the body CRC and returns the batch bytes.
    pub fn finish(mut self) -> Bytes {
        let len = self.buf.len() as u32;
        let b = &mut self.buf[..];
        b[4..8].copy_from_slice(&len.to_le_bytes());
        b[8..10].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        b[10] = BATCH_VERSION;
        b[56..60].copy_from_slice(&self.count.to_le_bytes());
        b[64..72].copy_from_slice(&self.first_ts.to_le_bytes());
        b[72..80].copy_from_slice(&self.max_ts.to_le_bytes());
        let crc = crc32fast::hash(&b[BODY_CRC_START..]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        self.buf.freeze()
    }
}

/// Building a record (the client's side).
impl Record {
    /// A record with this payload and nothing else.
    pub fn new(payload: impl Into<Bytes>) -> Record {
        Record {
            payload: payload.into(),
            ..Record::default()
        }
    }
    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Record {
        self.key = Some(key.into());
        self
    }
    /// Sets the tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Record {
        self.tag = Some(tag.into());
        self
    }
    /// Adds a property.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Record {
        self.properties.push((key.into(), value.into()));
        self
    }
    /// Sets the priority (0 to 9, 9 highest).
    pub fn with_priority(mut self, priority: u8) -> Record {
        self.priority = priority;
        self
    }
    /// Delivers the message `delay` after the broker takes it (by the
    /// broker's clock, so the producer's clock does not matter); a zero
    /// delay is now.
    pub fn deliver_after(mut self, delay: std::time::Duration) -> Record {
        let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        self.deliver_at_ms = ms.saturating_neg();
        self
    }
    /// Delivers the message at `at_ms` (ms since the Unix epoch, the
    /// broker's clock); a time already past is now.
    pub fn deliver_at(mut self, at_ms: i64) -> Record {
        self.deliver_at_ms = at_ms.max(1);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(payload: &str) -> Record {
        Record {
            key: Some(Bytes::from_static(b"k1")),
            tag: Some("TagA".into()),
            properties: vec![("a".into(), "1".into()), ("b".into(), "".into())],
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            timestamp_ms: 1_700_000_000_000,
            priority: 3,
            deliver_at_ms: 0,
        }
    }

    fn build(records: &[Record]) -> Bytes {
        let mut b = BatchBuilder::new();
        for r in records {
            b.push(r);
        }
        b.finish()
    }

    const KEY: SegmentKey = SegmentKey([7; 16]);

    #[test]
    fn a_view_keeps_the_chosen_records_with_their_offsets_and_ids() {
        let records: Vec<Record> = (0..5)
            .map(|i| Record {
                tag: Some(format!("T{i}")),
                ..record(&format!("m{i}"))
            })
            .collect();
        let mut stored = BytesMut::from(&build(&records)[..]);
        stamp(&mut stored, 3, 100, 42, 8192, &KEY);
        // Each record knows where it starts in its batch.
        for r in RecordIter::new(&stored).map(|r| r.unwrap()) {
            assert_eq!(&stored[r.at..r.at + r.raw.len()], r.raw);
        }
        let copy = select_records(&stored, &[1, 3]);
        let h = check_fetched(&copy).unwrap();
        assert_eq!(
            (h.record_count, h.base_offset, h.log_position),
            (2, 100, 8192)
        );
        assert_eq!(h.attributes, BATCH_ATTR_VIEW);
        assert_eq!(h.next_offset(), 105, "a view covers its source's offsets");
        let got: Vec<(u32, u64, u32, Vec<u8>)> = RecordIter::new(&copy)
            .map(|r| r.unwrap())
            .map(|r| {
                (
                    r.index,
                    r.origin_position,
                    r.origin_index,
                    r.payload.to_vec(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![(1, 8192, 1, b"m1".to_vec()), (3, 8192, 3, b"m3".to_vec())]
        );
        // A view of a view keeps the first one's offsets and ids.
        let again = select_records(&copy, &[1]);
        let got: Vec<(u32, u32)> = RecordIter::new(&again)
            .map(|r| r.unwrap())
            .map(|r| (r.index, r.origin_index))
            .collect();
        assert_eq!(got, vec![(3, 3)]);
        assert_eq!(check_fetched(&again).unwrap().next_offset(), 105);
        // A view is never taken as a produced or a stored batch.
        assert!(matches!(
            validate_produced(&copy, 1 << 20),
            Err(BatchError::ReservedNotZero(_))
        ));
        assert!(check_stored(&copy, &KEY).is_err());
        // Deltas that do not increase are refused.
        let mut bad = BytesMut::from(&copy[..]);
        bad[96..100].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&bad[52..]);
        bad[48..52].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            check_fetched(&bad),
            Err(BatchError::BadRecord { index: 1, .. })
        ));
        // A table longer than the batch is refused, not read past.
        let mut long = BytesMut::from(&copy[..]);
        long[56..60].copy_from_slice(&1000u32.to_le_bytes());
        let crc = crc32fast::hash(&long[52..]);
        long[48..52].copy_from_slice(&crc.to_le_bytes());
        assert!(check_fetched(&long).is_err());
        assert!(RecordIter::new(&long).next().is_none());
        // An empty view (every record dropped) still covers its offsets.
        let none = select_records(&stored, &[]);
        let h = check_fetched(&none).unwrap();
        assert_eq!((h.record_count, h.next_offset()), (0, 105));
    }

    #[test]
    fn stored_attributes_are_the_brokers_alone() {
        let b = build(&[record("a")]);
        for attr in [
            BATCH_ATTR_VIEW,
            BATCH_ATTR_SCHEDULED,
            BATCH_ATTR_CARRIED,
            BATCH_ATTR_REFERENCE,
        ] {
            let mut x = BytesMut::from(&b[..]);
            x[52..54].copy_from_slice(&attr.to_le_bytes());
            let crc = crc32fast::hash(&x[52..]);
            x[48..52].copy_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(
                    validate_produced(&x, 1 << 20),
                    Err(BatchError::ReservedNotZero(_))
                ),
                "a produce with attributes {attr} is refused"
            );
        }
        // A scheduled batch carries its target; stored, it checks.
        let mut s = BytesMut::from(&b[..]);
        mark_scheduled(&mut s, 77);
        stamp(&mut s, 9, 0, 1, 4096, &KEY);
        let h = check_stored(&s, &KEY).unwrap();
        assert_eq!((h.attributes, h.extra), (BATCH_ATTR_SCHEDULED, 77));
        // Two bits at once, or `extra` on another kind, are not stored.
        let mut two = BytesMut::from(&s[..]);
        two[52..54].copy_from_slice(&(BATCH_ATTR_SCHEDULED | BATCH_ATTR_CARRIED).to_le_bytes());
        let crc = crc32fast::hash(&two[52..]);
        two[48..52].copy_from_slice(&crc.to_le_bytes());
        stamp(&mut two, 9, 0, 1, 4096, &KEY);
        assert!(check_stored(&two, &KEY).is_err());
        let mut carried = BytesMut::from(&s[..]);
        carried[52..54].copy_from_slice(&BATCH_ATTR_CARRIED.to_le_bytes());
        let crc = crc32fast::hash(&carried[52..]);
        carried[48..52].copy_from_slice(&crc.to_le_bytes());
        stamp(&mut carried, 9, 0, 1, 4096, &KEY);
        assert!(check_stored(&carried, &KEY).is_err());
    }

    #[test]
    fn priorities_above_nine_are_refused_and_delays_resolve_on_the_brokers_clock() {
        let b = build(&[Record {
            priority: 10,
            ..record("x")
        }]);
        assert!(matches!(
            validate_produced(&b, 1 << 20),
            Err(BatchError::BadRecord { index: 0, reason }) if reason.contains("priority")
        ));
        assert!(Record::new("x").with_priority(10).check().is_err());
        let r = Record::new("x").deliver_after(std::time::Duration::from_millis(250));
        assert_eq!(r.deliver_at_ms, -250);
        assert_eq!(due_ms(r.deliver_at_ms, 1_000), 1_250);
        assert_eq!(due_ms(0, 1_000), 1_000);
        assert_eq!(due_ms(5_000, 1_000), 5_000);
        assert_eq!(due_ms(i64::MIN, 1_000), i64::MAX);
        assert_eq!(Record::new("x").deliver_at(0).deliver_at_ms, 1);
    }

    #[test]
    fn a_payload_only_record_encodes_as_a_record_does() {
        let mut a = BatchBuilder::new();
        a.push_payload(7, 123, b"xyz");
        let mut b = BatchBuilder::new();
        b.push(&Record {
            priority: 7,
            timestamp_ms: 123,
            ..Record::new(&b"xyz"[..])
        });
        assert_eq!(a.finish(), b.finish());
        // A record copied as framed is the same bytes.
        let src = build(&[record("x"), record("yy")]);
        let mut c = BatchBuilder::new();
        for r in RecordIter::new(&src).map(|r| r.unwrap()) {
            c.push_raw(r.raw, r.timestamp_ms);
        }
        assert_eq!(c.finish(), src);
    }

    #[test]
    fn references_round_trip_and_give_their_tags_to_the_summary() {
        let r = Reference {
            origin_position: 1 << 40,
            origin_index: 3,
            location_position: 1 << 41,
            location_index: 7,
            location_offset: 4321,
            len: 77,
            crc: 0xABCD_1234,
            tags: tag_bloom(b"A"),
        };
        assert_eq!(Reference::decode(&r.encode()), Some(r));
        assert_eq!(Reference::decode(&r.encode()[1..]), None);
        let mut b = BatchBuilder::new();
        b.push(&Record::new(Bytes::copy_from_slice(&r.encode())));
        let mut x = BytesMut::from(&b.finish()[..]);
        x[52..54].copy_from_slice(&BATCH_ATTR_REFERENCE.to_le_bytes());
        let crc = crc32fast::hash(&x[52..]);
        x[48..52].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(tag_summary(&x), tag_bloom(b"A"));
    }

    #[test]
    fn the_tag_summary_covers_every_tag_of_the_batch() {
        let records: Vec<Record> = ["A", "B", "C"]
            .iter()
            .map(|t| Record {
                tag: Some(t.to_string()),
                ..record("x")
            })
            .chain([Record {
                tag: None,
                ..record("y")
            }])
            .collect();
        let b = build(&records);
        let tags = validate_produced_tags(&b, 1 << 20).unwrap().summary.tags;
        assert_eq!(tags, tag_summary(&b));
        for t in ["A", "B", "C"] {
            let bits = tag_bloom(t.as_bytes());
            assert_eq!(bits.count_ones().clamp(1, 2), bits.count_ones());
            assert_eq!(tags & bits, bits, "{t}");
        }
        let untagged = build(&[Record {
            tag: None,
            ..record("z")
        }]);
        assert_eq!(tag_summary(&untagged), 0);
    }

    #[test]
    fn encode_validate_stamp_check_round_trip() {
        let batch = build(&[record("hello"), record("world!")]);
        let header = validate_produced(&batch, 1 << 20).unwrap();
        assert_eq!(header.record_count, 2);
        assert_eq!(header.batch_len as usize, batch.len());
        let mut stored = batch.to_vec();
        stamp(&mut stored, 9, 100, 42, 8192, &KEY);
        let h = check_stored(&stored, &KEY).unwrap();
        assert_eq!(
            (h.queue_id, h.base_offset, h.append_time_ms, h.log_position),
            (9, 100, 42, 8192)
        );
        assert_eq!(check_fetched(&stored).unwrap(), h);
        assert_eq!(h.next_offset(), 102);
        let recs: Vec<_> = RecordIter::new(&stored).map(|r| r.unwrap()).collect();
        assert_eq!(recs[0].payload, b"hello");
        assert_eq!(recs[1].payload, b"world!");
        assert_eq!(recs[1].tag, Some("TagA"));
        assert_eq!(recs[1].key, Some(&b"k1"[..]));
        assert_eq!(recs[0].properties, vec![("a", "1"), ("b", "")]);
        assert_eq!(recs[0].priority, 3);
        assert_eq!(&stored[recs[1].payload_range.clone()], b"world!");
    }

    #[test]
    fn unstamped_batch_fails_the_stored_header_check() {
        let batch = build(&[record("x")]);
        // A produced batch carries no MAC; only a stamp makes it valid.
        assert_eq!(check_stored(&batch, &KEY), Err(BatchError::HeaderMac));
    }

    #[test]
    fn a_batch_stamped_under_another_key_is_not_stored_here() {
        // A perfect batch inside a producer's payload, even one the broker
        // once stamped for another segment, fails under this segment's key.
        let mut stored = build(&[record("x")]).to_vec();
        stamp(&mut stored, 1, 0, 5, 4096, &SegmentKey([8; 16]));
        assert!(check_stored(&stored, &SegmentKey([8; 16])).is_ok());
        assert_eq!(check_stored(&stored, &KEY), Err(BatchError::HeaderMac));
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let batch = build(&[record("payload bytes here")]);
        let mut stored = batch.to_vec();
        stamp(&mut stored, 1, 0, 5, 0, &KEY);
        for byte in 0..stored.len() {
            for bit in [0x01, 0x10, 0x80] {
                let mut bad = stored.clone();
                bad[byte] ^= bit;
                assert!(
                    check_stored(&bad, &KEY).is_err(),
                    "flip {bit:#x} at byte {byte} undetected"
                );
            }
        }
    }

    #[test]
    fn reserved_fields_must_be_zero() {
        let batch = build(&[record("x")]);
        for (at, what) in [
            (11, "header byte 11"),
            (52, "attributes"),
            (54, "header bytes 54..56"),
            (61, "header bytes 60..64"),
        ] {
            let mut bad = batch.to_vec();
            bad[at] = 1;
            let crc = crc32fast::hash(&bad[52..]);
            bad[48..52].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(
                validate_produced(&bad, 1 << 20),
                Err(BatchError::ReservedNotZero(what))
            );
        }
        // Record flag bits beyond key and tag.
        let mut bad = batch.to_vec();
        bad[BATCH_HEADER_BYTES + 4] |= 0x80;
        let crc = crc32fast::hash(&bad[52..]);
        bad[48..52].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            validate_produced(&bad, 1 << 20),
            Err(BatchError::BadRecord { index: 0, .. })
        ));
    }

    #[test]
    fn produced_batch_rejections() {
        let batch = build(&[record("x")]);
        assert_eq!(
            validate_produced(&batch, 10),
            Err(BatchError::TooLarge(batch.len(), 10))
        );
        assert_eq!(
            validate_produced(&batch[..40], 1 << 20),
            Err(BatchError::TooShort(40))
        );
        let mut bad = batch.to_vec();
        bad[8] = 0;
        assert!(matches!(
            validate_produced(&bad, 1 << 20),
            Err(BatchError::BadMagic(_))
        ));
        let mut bad = batch.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            validate_produced(&bad, 1 << 20),
            Err(BatchError::BodyCrc { .. })
        ));
        let empty = BatchBuilder::new().finish();
        assert_eq!(validate_produced(&empty, 1 << 20), Err(BatchError::Empty));
    }

    #[test]
    fn record_count_must_match() {
        let batch = build(&[record("a"), record("b")]);
        let mut bad = batch.to_vec();
        bad[56..60].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32fast::hash(&bad[52..]);
        bad[48..52].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            validate_produced(&bad, 1 << 20),
            Err(BatchError::CountMismatch {
                declared: 3,
                actual: 2
            })
        );
    }

    proptest! {
        #[test]
        fn arbitrary_records_round_trip(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20),
            tag in proptest::option::of("[a-zA-Z0-9]{0,12}"),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ) {
            let records: Vec<Record> = payloads.iter().enumerate().map(|(i, p)| Record {
                key: key.clone().map(Bytes::from),
                tag: tag.clone(),
                properties: vec![(format!("i{i}"), "v".into())],
                payload: Bytes::from(p.clone()),
                timestamp_ms: i as i64,
                ..Record::default()
            }).collect();
            let batch = build(&records);
            let expected_len = BATCH_HEADER_BYTES + records.iter().map(Record::encoded_len).sum::<usize>();
            prop_assert_eq!(batch.len(), expected_len);
            validate_produced(&batch, usize::MAX).unwrap();
            let back: Vec<_> = RecordIter::new(&batch).map(|r| r.unwrap()).collect();
            prop_assert_eq!(back.len(), records.len());
            for (r, v) in records.iter().zip(back) {
                prop_assert_eq!(&r.payload[..], v.payload);
                prop_assert_eq!(r.tag.as_deref(), v.tag);
                prop_assert_eq!(r.key.as_deref(), v.key);
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = validate_produced(&data, 1 << 20);
            let _ = check_stored(&data, &KEY);
            let _ = check_fetched(&data);
            for r in RecordIter::new(&data) { let _ = r; }
        }
    }
}
