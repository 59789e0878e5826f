//! Primitive encoding shared by every operation body: little-endian fixed
//! width integers, strings as `u16` length + UTF-8, byte blobs as `u32`
//! length + bytes.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Why a body could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("body truncated while reading {0}")]
    Truncated(&'static str),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("{0} trailing bytes after the body")]
    Trailing(usize),
    #[error("bad value for {field}: {value}")]
    BadValue { field: &'static str, value: u64 },
}

/// Reads fields from a body, slicing blobs out of it without copying.
pub struct Reader {
    buf: Bytes,
    at: usize,
}

impl Reader {
    /// Reads from `buf`.
    pub fn new(buf: Bytes) -> Self {
        Reader { buf, at: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated(what))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A `u16`-length-prefixed UTF-8 string.
    pub fn str(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = self.u16(what)? as usize;
        let s = self.take(n, what)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8(what))
    }
    /// A `u16`-length-prefixed byte string, sliced without copying.
    pub fn bytes16(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u16(what)? as usize;
        self.slice(n, what)
    }
    /// A `u32`-length-prefixed blob, sliced without copying.
    pub fn bytes32(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u32(what)? as usize;
        self.slice(n, what)
    }
    /// Exactly `n` bytes, sliced without copying.
    pub fn fixed(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.slice(n, what)
    }
    /// The next `n` bytes (fewer at the end), not consumed.
    pub fn peek(&self, n: usize) -> &[u8] {
        &self.buf[self.at..(self.at + n).min(self.buf.len())]
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }
    fn slice(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.at;
        self.take(n, what)?;
        Ok(self.buf.slice(start..start + n))
    }
    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Appends fields to a body.
pub struct Writer<'a>(pub &'a mut BytesMut);

impl Writer<'_> {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.put_u8(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.put_u16_le(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.put_u32_le(v);
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.put_u64_le(v);
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.put_i64_le(v);
        self
    }
    /// A string, cut to 65535 bytes at a character boundary if longer.
    pub fn str(&mut self, s: &str) -> &mut Self {
        let mut end = s.len().min(u16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0.put_u16_le(end as u16);
        self.0.put_slice(&s.as_bytes()[..end]);
        self
    }
    /// A byte string of at most 65535 bytes (callers check the length).
    pub fn bytes16(&mut self, b: &[u8]) -> &mut Self {
        assert!(b.len() <= u16::MAX as usize, "bytes16 over 65535 bytes");
        self.0.put_u16_le(b.len() as u16);
        self.0.put_slice(b);
        self
    }
    pub fn bytes32(&mut self, b: &[u8]) -> &mut Self {
        self.0.put_u32_le(b.len() as u32);
        self.0.put_slice(b);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip_and_truncation_is_an_error() {
        let mut b = BytesMut::new();
        Writer(&mut b)
            .u8(7)
            .u16(300)
            .u32(70_000)
            .u64(1 << 40)
            .i64(-5)
            .str("héllo")
            .bytes16(b"key")
            .bytes32(b"blob");
        let bytes = b.freeze();
        let mut r = Reader::new(bytes.clone());
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 300);
        assert_eq!(r.u32("c").unwrap(), 70_000);
        assert_eq!(r.u64("d").unwrap(), 1 << 40);
        assert_eq!(r.i64("e").unwrap(), -5);
        assert_eq!(r.str("f").unwrap(), "héllo");
        assert_eq!(&r.bytes16("g").unwrap()[..], b"key");
        assert_eq!(&r.bytes32("h").unwrap()[..], b"blob");
        r.finish().unwrap();

        let mut short = Reader::new(bytes.slice(..bytes.len() - 1));
        short.u8("a").unwrap();
        short.u16("b").unwrap();
        short.u32("c").unwrap();
        short.u64("d").unwrap();
        short.i64("e").unwrap();
        short.str("f").unwrap();
        short.bytes16("g").unwrap();
        assert_eq!(short.bytes32("h"), Err(DecodeError::Truncated("h")));

        let mut bad = BytesMut::new();
        Writer(&mut bad).u16(2).u8(0xff).u8(0xfe);
        assert_eq!(
            Reader::new(bad.freeze()).str("name"),
            Err(DecodeError::NotUtf8("name"))
        );
    }

    #[test]
    fn long_strings_are_cut_at_a_char_boundary() {
        let s = "é".repeat(40_000);
        let mut b = BytesMut::new();
        Writer(&mut b).str(&s);
        let back = Reader::new(b.freeze()).str("s").unwrap();
        assert!(back.len() <= u16::MAX as usize);
        assert!(s.starts_with(&back));
    }
}
