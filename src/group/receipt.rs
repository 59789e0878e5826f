//! Receipt handles: what a receive hands out with each message, and what
//! ack, nack and change-invisible bring back. A handle names the shard that
//! owns the queue (so the request goes straight to that core), the group,
//! the queue, the offset, the delivery attempt and its lease (so a handle
//! from a delivery that has since gone to someone else is refused), and
//! carries a keyed MAC under the owning shard's secret: a forged or altered
//! handle is refused before any state is looked at.
//!
//! 40 bytes, little-endian (`docs/PROTOCOL.md`, "Receipt handle"):
//!
//! | bytes | field |
//! |---|---|
//! | 0 | version, 1 |
//! | 1 | reserved, 0 |
//! | 2..4 | shard u16 |
//! | 4..8 | group id u32 |
//! | 8..12 | queue id u32 |
//! | 12..20 | offset u64 |
//! | 20..28 | lease u64 |
//! | 28..32 | attempt u32 |
//! | 32..40 | MAC: SipHash-1-3 of bytes 0..32 under the shard's handle key |
//!
//! Its text form (CLI, logs) is the 80 lowercase hex digits of the bytes.

use crate::ids::{GroupId, QueueId, QueueOffset, ShardId};

/// Wire width of a receipt handle.
pub const RECEIPT_HANDLE_BYTES: usize = 40;
const VERSION: u8 = 1;
const MAC_AT: usize = 32;

/// A shard's secret for its receipt handles (random at the data dir's
/// creation, kept in its storage, never sent).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HandleKey(pub [u8; 16]);

impl std::fmt::Debug for HandleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandleKey(..)")
    }
}

/// What a handle names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub shard: ShardId,
    pub group: GroupId,
    pub queue: QueueId,
    pub offset: QueueOffset,
    pub lease: u64,
    pub attempt: u32,
}

/// Why a handle was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    #[error("a receipt handle is {RECEIPT_HANDLE_BYTES} bytes, not {0}")]
    Length(usize),
    #[error("receipt handle version {0} is not known")]
    Version(u8),
    #[error("receipt handle reserved byte is {0}, not 0")]
    Reserved(u8),
    #[error("receipt handle is not valid hex")]
    Hex,
    #[error("receipt handle was not issued by this broker (bad MAC)")]
    Forged,
}

impl Receipt {
    /// The handle's bytes, MAC'd under `key`.
    pub fn seal(&self, key: &HandleKey) -> [u8; RECEIPT_HANDLE_BYTES] {
        let mut b = [0u8; RECEIPT_HANDLE_BYTES];
        b[0] = VERSION;
        b[2..4].copy_from_slice(&self.shard.0.to_le_bytes());
        b[4..8].copy_from_slice(&self.group.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.queue.0.to_le_bytes());
        b[12..20].copy_from_slice(&self.offset.0.to_le_bytes());
        b[20..28].copy_from_slice(&self.lease.to_le_bytes());
        b[28..32].copy_from_slice(&self.attempt.to_le_bytes());
        let mac = mac(&b[..MAC_AT], key);
        b[MAC_AT..].copy_from_slice(&mac.to_le_bytes());
        b
    }

    /// The fields of a handle, unverified: enough to route it to the shard
    /// it names, which then [`Receipt::open`]s it under its key.
    pub fn peek(b: &[u8]) -> Result<Receipt, HandleError> {
        if b.len() != RECEIPT_HANDLE_BYTES {
            return Err(HandleError::Length(b.len()));
        }
        if b[0] != VERSION {
            return Err(HandleError::Version(b[0]));
        }
        if b[1] != 0 {
            return Err(HandleError::Reserved(b[1]));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        Ok(Receipt {
            shard: ShardId(u16::from_le_bytes([b[2], b[3]])),
            group: GroupId(u32_at(4)),
            queue: QueueId(u32_at(8)),
            offset: QueueOffset(u64_at(12)),
            lease: u64_at(20),
            attempt: u32_at(28),
        })
    }

    /// The fields of a handle this shard issued under `key`.
    pub fn open(b: &[u8], key: &HandleKey) -> Result<Receipt, HandleError> {
        let r = Receipt::peek(b)?;
        let expected = mac(&b[..MAC_AT], key).to_le_bytes();
        // Constant time: the comparison does not tell how much matched.
        let diff = expected
            .iter()
            .zip(&b[MAC_AT..])
            .fold(0u8, |d, (x, y)| d | (x ^ y));
        if diff != 0 {
            return Err(HandleError::Forged);
        }
        Ok(r)
    }

    /// The text form of sealed bytes.
    pub fn to_hex(b: &[u8; RECEIPT_HANDLE_BYTES]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Bytes from the text form.
    pub fn from_hex(s: &str) -> Result<[u8; RECEIPT_HANDLE_BYTES], HandleError> {
        if s.len() != 2 * RECEIPT_HANDLE_BYTES {
            return Err(HandleError::Length(s.len() / 2));
        }
        let mut b = [0u8; RECEIPT_HANDLE_BYTES];
        for (i, out) in b.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or(HandleError::Hex)?;
            *out = u8::from_str_radix(pair, 16).map_err(|_| HandleError::Hex)?;
        }
        Ok(b)
    }
}

fn mac(b: &[u8], key: &HandleKey) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_key(&key.0);
    h.write(b);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: HandleKey = HandleKey([7; 16]);

    fn receipt() -> Receipt {
        Receipt {
            shard: ShardId(1),
            group: GroupId(9),
            queue: QueueId(42),
            offset: QueueOffset(1 << 40),
            lease: 77,
            attempt: 3,
        }
    }

    #[test]
    fn a_sealed_handle_opens_to_what_it_names_in_bytes_and_text() {
        let b = receipt().seal(&KEY);
        assert_eq!(Receipt::open(&b, &KEY), Ok(receipt()));
        let text = Receipt::to_hex(&b);
        assert_eq!(text.len(), 80);
        assert_eq!(Receipt::from_hex(&text), Ok(b));
        assert_eq!(Receipt::peek(&b).unwrap().shard, ShardId(1));
    }

    #[test]
    fn any_changed_bit_or_another_key_is_refused_as_forged() {
        let b = receipt().seal(&KEY);
        for i in 2..RECEIPT_HANDLE_BYTES {
            for bit in 0..8 {
                let mut f = b;
                f[i] ^= 1 << bit;
                assert_eq!(
                    Receipt::open(&f, &KEY),
                    Err(HandleError::Forged),
                    "byte {i} bit {bit}"
                );
            }
        }
        assert_eq!(
            Receipt::open(&b, &HandleKey([8; 16])),
            Err(HandleError::Forged)
        );
    }

    #[test]
    fn malformed_handles_say_what_is_wrong() {
        let b = receipt().seal(&KEY);
        assert_eq!(Receipt::open(&b[..39], &KEY), Err(HandleError::Length(39)));
        let mut v = b;
        v[0] = 2;
        assert_eq!(Receipt::open(&v, &KEY), Err(HandleError::Version(2)));
        let mut r = b;
        r[1] = 1;
        assert_eq!(Receipt::open(&r, &KEY), Err(HandleError::Reserved(1)));
        assert_eq!(Receipt::from_hex("zz"), Err(HandleError::Length(1)));
        let mut text = Receipt::to_hex(&b);
        text.replace_range(0..2, "g0");
        assert_eq!(Receipt::from_hex(&text), Err(HandleError::Hex));
        assert_eq!(Receipt::from_hex(&"é".repeat(40)), Err(HandleError::Hex));
    }
}
