//! The wire protocol: frames, operation bodies and error codes. No I/O here:
//! everything takes and returns bytes, so it tests in microseconds. The
//! byte layout is documented in `docs/PROTOCOL.md`.

pub mod codec;
pub mod error_code;
pub mod frame;
pub mod ops;

pub use codec::{DecodeError, Reader, Writer};
pub use error_code::ErrorCode;
pub use frame::{FrameDecoder, FrameError, RequestHeader, ResponseHeader, FRAME_HEADER_BYTES};
pub use ops::*;
