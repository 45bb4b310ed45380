use core::fmt;

/// Why a frame was rejected. Small and `Copy`: it is counted on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireError {
    /// Shorter than the headers, or than the payload/tag the header announces.
    Truncated,
    /// EtherType is not 0x88B5.
    BadEtherType,
    /// The dmfabric magic does not match.
    BadMagic,
    /// A protocol version this build does not speak.
    BadVersion,
    /// A message kind this build does not know.
    UnknownKind,
    /// A flag bit that is undefined, or not allowed for the kind.
    BadFlags,
    /// Address space (or the kind-specific byte in its place) is invalid.
    BadSpace,
    /// Access size is not one of 1, 2, 4, 8 (PIO: 1, 2, 4), or not 0 where required.
    BadSize,
    /// A status or reason code that is undefined for the kind.
    BadStatus,
    /// Data wider than the access size.
    DataTooWide,
    /// A payload on a kind that carries none.
    UnexpectedPayload,
    /// An output buffer too small for [`crate::FrameRepr::emit`].
    BufferTooSmall,
}

impl WireError {
    /// Every variant, in [`WireError::index`] order (for counter tables).
    pub const ALL: [WireError; 12] = [
        WireError::Truncated,
        WireError::BadEtherType,
        WireError::BadMagic,
        WireError::BadVersion,
        WireError::UnknownKind,
        WireError::BadFlags,
        WireError::BadSpace,
        WireError::BadSize,
        WireError::BadStatus,
        WireError::DataTooWide,
        WireError::UnexpectedPayload,
        WireError::BufferTooSmall,
    ];

    /// A dense index for counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A short snake_case name for counters and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            WireError::Truncated => "truncated",
            WireError::BadEtherType => "bad_ethertype",
            WireError::BadMagic => "bad_magic",
            WireError::BadVersion => "bad_version",
            WireError::UnknownKind => "unknown_kind",
            WireError::BadFlags => "bad_flags",
            WireError::BadSpace => "bad_space",
            WireError::BadSize => "bad_size",
            WireError::BadStatus => "bad_status",
            WireError::DataTooWide => "data_too_wide",
            WireError::UnexpectedPayload => "unexpected_payload",
            WireError::BufferTooSmall => "buffer_too_small",
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            WireError::Truncated => "Frame is truncated",
            WireError::BadEtherType => "Not a dmfabric EtherType",
            WireError::BadMagic => "Bad dmfabric magic",
            WireError::BadVersion => "Unsupported dmfabric version",
            WireError::UnknownKind => "Unknown message kind",
            WireError::BadFlags => "Invalid flags for the message kind",
            WireError::BadSpace => "Invalid address space",
            WireError::BadSize => "Invalid access size",
            WireError::BadStatus => "Invalid status or reason code",
            WireError::DataTooWide => "Data wider than the access size",
            WireError::UnexpectedPayload => "Payload on a message kind that carries none",
            WireError::BufferTooSmall => "Output buffer too small for the frame",
        };
        f.write_str(msg)
    }
}

impl std::error::Error for WireError {}
