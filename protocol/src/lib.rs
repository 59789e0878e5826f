//! KeelMQ's wire protocol, shared by the broker and the client: frames,
//! operation bodies, error codes, the record batch (one layout on the wire
//! and on disk) and the typed ids. No I/O here: everything takes and
//! returns bytes, so it tests in microseconds. The byte layout is
//! documented in `docs/PROTOCOL.md`.

pub mod batch;
pub mod codec;
pub mod error_code;
pub mod frame;
pub mod ids;
pub mod ops;

pub use codec::{DecodeError, Reader, Writer};
pub use error_code::ErrorCode;
pub use frame::{FrameDecoder, FrameError, RequestHeader, ResponseHeader, FRAME_HEADER_BYTES};
pub use ops::*;
