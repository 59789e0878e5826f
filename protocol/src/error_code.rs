//! Wire error codes: the one place where failures become numbers.

/// A response's status. `Ok` is 0; every other code carries a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    Ok = 0,
    /// The request body could not be decoded.
    Malformed = 1,
    /// The operation code is not known to this broker.
    UnknownOperation = 2,
    /// The operation is known but not at the requested version.
    UnsupportedVersion = 3,
    /// A frame exceeded `frame_bytes_max`.
    FrameTooLarge = 4,
    /// A produced batch failed validation (CRC, framing, count).
    InvalidBatch = 5,
    /// A produced batch exceeded `batch_bytes_max`.
    BatchTooLarge = 6,
    UnknownTopic = 7,
    UnknownQueue = 8,
    TopicExists = 9,
    /// The fetch offset is outside `[earliest, latest]`.
    OffsetOutOfRange = 10,
    MessageNotFound = 11,
    /// A field had a value outside its allowed range.
    InvalidArgument = 12,
    /// The shard's storage failed (I/O error): it takes no writes until
    /// restart; nothing unacknowledged was promised.
    StorageError = 13,
    /// The broker is stopping.
    ShuttingDown = 14,
    /// The broker could not take the request in time (the disk is behind
    /// the producers); nothing was stored. Retriable.
    Busy = 15,
    /// An unexpected broker-side failure.
    Internal = 16,
    /// The shard's disk is full: nothing was stored. Retriable; writes
    /// resume by themselves once space is freed.
    StorageFull = 17,
    /// No consumer group of that name (or id) exists.
    UnknownGroup = 18,
    /// A consumer group of that name exists already.
    GroupExists = 19,
    /// A receipt handle that this broker did not issue (bad MAC), that is
    /// malformed, or that names another shard.
    InvalidReceipt = 20,
    /// A receipt handle from a delivery that is over: the message was
    /// delivered again since, its invisible time passed, or it was nacked.
    /// Nothing changed; the message is (or will be) redelivered.
    StaleReceipt = 21,
    /// The message is already acknowledged (or dead-lettered).
    AlreadyAcked = 22,
    /// A membership request carried an old generation or a lost member id:
    /// rejoin.
    StaleGeneration = 23,
    /// A filter expression that does not parse (the message names the byte
    /// position and what was expected), is over 4096 bytes, or is empty.
    InvalidFilter = 24,
}

impl ErrorCode {
    /// Maps a wire value back; unknown values become `Internal`.
    pub fn from_u16(v: u16) -> ErrorCode {
        use ErrorCode::*;
        match v {
            0 => Ok,
            1 => Malformed,
            2 => UnknownOperation,
            3 => UnsupportedVersion,
            4 => FrameTooLarge,
            5 => InvalidBatch,
            6 => BatchTooLarge,
            7 => UnknownTopic,
            8 => UnknownQueue,
            9 => TopicExists,
            10 => OffsetOutOfRange,
            11 => MessageNotFound,
            12 => InvalidArgument,
            13 => StorageError,
            14 => ShuttingDown,
            15 => Busy,
            17 => StorageFull,
            18 => UnknownGroup,
            19 => GroupExists,
            20 => InvalidReceipt,
            21 => StaleReceipt,
            22 => AlreadyAcked,
            23 => StaleGeneration,
            24 => InvalidFilter,
            _ => Internal,
        }
    }

    /// Whether a client may send the same request again later and expect
    /// it to succeed (nothing was stored).
    pub fn is_retriable(self) -> bool {
        matches!(self, ErrorCode::Busy | ErrorCode::StorageFull)
    }

    /// A short lowercase name for messages and logs.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Ok => "ok",
            Malformed => "malformed",
            UnknownOperation => "unknown_operation",
            UnsupportedVersion => "unsupported_version",
            FrameTooLarge => "frame_too_large",
            InvalidBatch => "invalid_batch",
            BatchTooLarge => "batch_too_large",
            UnknownTopic => "unknown_topic",
            UnknownQueue => "unknown_queue",
            TopicExists => "topic_exists",
            OffsetOutOfRange => "offset_out_of_range",
            MessageNotFound => "message_not_found",
            InvalidArgument => "invalid_argument",
            StorageError => "storage_error",
            ShuttingDown => "shutting_down",
            Busy => "busy",
            Internal => "internal",
            StorageFull => "storage_full",
            UnknownGroup => "unknown_group",
            GroupExists => "group_exists",
            InvalidReceipt => "invalid_receipt",
            StaleReceipt => "stale_receipt",
            AlreadyAcked => "already_acked",
            StaleGeneration => "stale_generation",
            InvalidFilter => "invalid_filter",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for v in 0..=24u16 {
            assert_eq!(ErrorCode::from_u16(v) as u16, v);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Internal);
    }
}
