//! Length-prefixed frames.
//!
//! ```text
//! request:  u32 frame_len | u16 op    | u16 version    | u64 request_id | body
//! response: u32 frame_len | u16 op    | u16 error_code | u64 request_id | body
//! ```
//! `frame_len` counts the bytes after itself (12 + body), little-endian.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Bytes of the fixed part of every frame, length prefix included.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Smallest legal `frame_len`: op + version/code + request id.
pub const FRAME_LEN_MIN: u32 = 12;

/// Fixed fields of a request frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: u16,
    pub version: u16,
    pub request_id: u64,
}

/// Fixed fields of a response frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub op: u16,
    pub error_code: u16,
    pub request_id: u64,
}

/// A frame that cannot be read; the connection cannot continue.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds frame_bytes_max {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("frame length {0} is below the minimum {FRAME_LEN_MIN}")]
    TooShort(u32),
}

/// Splits frames off a read buffer. Header fields share the request and
/// response layout: (u16, u16, u64).
pub struct FrameDecoder {
    frame_bytes_max: u32,
}

impl FrameDecoder {
    /// A decoder that rejects frames whose `frame_len` exceeds `frame_bytes_max`.
    pub fn new(frame_bytes_max: u32) -> Self {
        FrameDecoder { frame_bytes_max }
    }

    /// Takes one whole frame from `buf` if present: `((a, b, id), body)`.
    /// On error, the peek at the partial header (if any) is returned so the
    /// caller can answer the request id before closing.
    #[allow(clippy::type_complexity)]
    pub fn decode(
        &self,
        buf: &mut BytesMut,
    ) -> Result<Option<((u16, u16, u64), Bytes)>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(buf[0..4].try_into().unwrap());
        if len < FRAME_LEN_MIN {
            return Err(FrameError::TooShort(len));
        }
        if len > self.frame_bytes_max {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: u64::from(self.frame_bytes_max),
            });
        }
        let total = 4 + len as usize;
        if buf.len() < total {
            // Nothing reserved for the claimed length: the reader grows the
            // buffer as bytes arrive, so a frame that claims 8 MiB and
            // sends 4 bytes costs 4 bytes.
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        frame.advance(4);
        let a = frame.get_u16_le();
        let b = frame.get_u16_le();
        let id = frame.get_u64_le();
        Ok(Some(((a, b, id), frame.freeze())))
    }

    /// Reads the (op, request id) of a frame whose header is buffered, for
    /// answering a frame that is refused before it is read whole.
    pub fn peek_header(buf: &[u8]) -> Option<(u16, u64)> {
        (buf.len() >= FRAME_HEADER_BYTES).then(|| {
            (
                u16::from_le_bytes([buf[4], buf[5]]),
                u64::from_le_bytes(buf[8..16].try_into().unwrap()),
            )
        })
    }
}

/// Appends a frame with the given fixed fields and body.
pub fn encode_frame(out: &mut BytesMut, a: u16, b: u16, request_id: u64, body: &[u8]) {
    out.reserve(FRAME_HEADER_BYTES + body.len());
    out.put_u32_le((12 + body.len()) as u32);
    out.put_u16_le(a);
    out.put_u16_le(b);
    out.put_u64_le(request_id);
    out.put_slice(body);
}

/// Writes only the 16-byte header of a frame whose body follows separately
/// (lets a writer send a large body without copying it).
pub fn frame_header(a: u16, b: u16, request_id: u64, body_len: usize) -> [u8; FRAME_HEADER_BYTES] {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&((12 + body_len) as u32).to_le_bytes());
    h[4..6].copy_from_slice(&a.to_le_bytes());
    h[6..8].copy_from_slice(&b.to_le_bytes());
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_and_back_to_back() {
        let mut wire = BytesMut::new();
        encode_frame(&mut wire, 7, 1, 42, b"hello");
        encode_frame(&mut wire, 8, 2, 43, b"");
        let d = FrameDecoder::new(1024);
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, (7, 1, 42));
        assert_eq!(&got[0].1[..], b"hello");
        assert_eq!(got[1].0, (8, 2, 43));
        assert!(got[1].1.is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_undersized_frames_are_refused_before_buffering() {
        let d = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: u32::MAX as u64,
                max: 1024
            })
        );
        let mut buf = BytesMut::from(&3u32.to_le_bytes()[..]);
        assert_eq!(d.decode(&mut buf), Err(FrameError::TooShort(3)));
    }

    #[test]
    fn a_frame_claiming_megabytes_costs_nothing_until_they_arrive() {
        let d = FrameDecoder::new(8 << 20);
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&(8u32 << 20).to_le_bytes());
        buf.extend_from_slice(&[6, 0, 1, 0]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert!(buf.capacity() < 1024, "reserved {} bytes", buf.capacity());
    }

    #[test]
    fn header_helper_matches_encode_frame() {
        let mut a = BytesMut::new();
        encode_frame(&mut a, 1, 2, 3, b"xyz");
        let h = frame_header(1, 2, 3, 3);
        assert_eq!(&a[..16], &h[..]);
        assert_eq!(FrameDecoder::peek_header(&a), Some((1, 3)));
    }
}
