//! NBD wire constants and the fixed-layout structures of the protocol.
//!
//! Everything here is plain data: magic numbers, option/command/reply codes,
//! flag bits, and encoders/decoders for the fixed-size headers. Values follow
//! the NBD protocol document (`doc/proto.md` of the reference implementation,
//! including the extended-headers extension).

use std::fmt;

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// "NBDMAGIC": first 8 bytes sent by the server.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that prefixes every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: server supports fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: server must not send the 124 zero bytes after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes sent by the client during negotiation.
pub mod opt {
    /// Select an export and enter transmission (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn experimental option.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS (not supported by this server).
    pub const STARTTLS: u32 = 5;
    /// Query export details without entering transmission.
    pub const INFO: u32 = 6;
    /// Query export details and enter transmission.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Enable 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// Human readable name of an option code (for logs).
    pub fn name(code: u32) -> &'static str {
        match code {
            EXPORT_NAME => "EXPORT_NAME",
            ABORT => "ABORT",
            LIST => "LIST",
            PEEK_EXPORT => "PEEK_EXPORT",
            STARTTLS => "STARTTLS",
            INFO => "INFO",
            GO => "GO",
            STRUCTURED_REPLY => "STRUCTURED_REPLY",
            LIST_META_CONTEXT => "LIST_META_CONTEXT",
            SET_META_CONTEXT => "SET_META_CONTEXT",
            EXTENDED_HEADERS => "EXTENDED_HEADERS",
            _ => "unknown",
        }
    }
}

/// Option reply types.
pub mod rep {
    /// Option accepted / list finished.
    pub const ACK: u32 = 1;
    /// One export in reply to LIST.
    pub const SERVER: u32 = 2;
    /// One information item in reply to INFO/GO.
    pub const INFO: u32 = 3;
    /// One metadata context in reply to LIST/SET_META_CONTEXT.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Option unknown to the server.
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    /// Client must request block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    /// Extended headers required / already negotiated.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;
}

/// Information types used in `NBD_REP_INFO` and requested by INFO/GO.
pub mod info {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum / preferred / maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (16 bits, sent with the export size).
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium hint.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// NBD_CMD_TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF supported on reads.
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush/FUA effects are visible across all connections.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// Experimental resize.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// NBD_CMD_CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_CMD_FLAG_FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// Block status with a payload filter (not implemented here).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Size of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Command codes.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim / discard.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch hint).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Experimental resize.
    pub const RESIZE: u16 = 8;

    /// Human readable command name (for logs).
    pub fn name(code: u16) -> &'static str {
        match code {
            READ => "READ",
            WRITE => "WRITE",
            DISC => "DISC",
            FLUSH => "FLUSH",
            TRIM => "TRIM",
            CACHE => "CACHE",
            WRITE_ZEROES => "WRITE_ZEROES",
            BLOCK_STATUS => "BLOCK_STATUS",
            RESIZE => "RESIZE",
            _ => "unknown",
        }
    }
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must leave the range allocated.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes must be fast or fail with ENOTSUP.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: length is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured/extended reply chunk types.
pub mod reply_type {
    /// No payload; final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// 32-bit block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// 64-bit block status descriptors (extended headers only).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Generic error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;

    /// True for the error chunk category (bit 15 set).
    pub fn is_error(t: u16) -> bool {
        t & (1 << 15) != 0
    }
}

/// `base:allocation` flag: extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Longest string (export name, description, context name) we accept or send.
pub const MAX_STRING_LEN: usize = 4096;

/// Default and maximum payload size advertised by the server (32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Metadata context name for allocation status.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Metadata context name for qemu's allocation depth.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

// ---------------------------------------------------------------------------
// Newtypes
// ---------------------------------------------------------------------------

/// An NBD error value as carried in replies (a restricted errno set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NbdErrno(pub u32);

impl NbdErrno {
    /// Operation not permitted.
    pub const EPERM: NbdErrno = NbdErrno(1);
    /// Input/output error.
    pub const EIO: NbdErrno = NbdErrno(5);
    /// Cannot allocate memory.
    pub const ENOMEM: NbdErrno = NbdErrno(12);
    /// Invalid argument.
    pub const EINVAL: NbdErrno = NbdErrno(22);
    /// No space left on device.
    pub const ENOSPC: NbdErrno = NbdErrno(28);
    /// Value too large.
    pub const EOVERFLOW: NbdErrno = NbdErrno(75);
    /// Operation not supported.
    pub const ENOTSUP: NbdErrno = NbdErrno(95);
    /// Server is shutting down.
    pub const ESHUTDOWN: NbdErrno = NbdErrno(108);

    /// Map an I/O error from an export to the NBD error set.
    pub fn from_io(e: &std::io::Error) -> NbdErrno {
        if let Some(code) = e.raw_os_error() {
            return match code {
                libc::EPERM | libc::EACCES | libc::EROFS => NbdErrno::EPERM,
                libc::EIO => NbdErrno::EIO,
                libc::ENOMEM => NbdErrno::ENOMEM,
                libc::EINVAL => NbdErrno::EINVAL,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::ENOSPC,
                libc::EOVERFLOW => NbdErrno::EOVERFLOW,
                libc::EOPNOTSUPP => NbdErrno::ENOTSUP,
                libc::ESHUTDOWN => NbdErrno::ESHUTDOWN,
                _ => NbdErrno::EIO,
            };
        }
        use std::io::ErrorKind as K;
        match e.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => NbdErrno::EPERM,
            K::OutOfMemory => NbdErrno::ENOMEM,
            K::InvalidInput => NbdErrno::EINVAL,
            K::Unsupported => NbdErrno::ENOTSUP,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => NbdErrno::ENOSPC,
            _ => NbdErrno::EIO,
        }
    }

    /// The matching `std::io::Error` (used by the client).
    pub fn to_io(self) -> std::io::Error {
        let code = match self {
            NbdErrno::EPERM => libc::EPERM,
            NbdErrno::EIO => libc::EIO,
            NbdErrno::ENOMEM => libc::ENOMEM,
            NbdErrno::EINVAL => libc::EINVAL,
            NbdErrno::ENOSPC => libc::ENOSPC,
            NbdErrno::EOVERFLOW => libc::EOVERFLOW,
            NbdErrno::ENOTSUP => libc::EOPNOTSUPP,
            NbdErrno::ESHUTDOWN => libc::ESHUTDOWN,
            // The spec says unknown values are to be treated as EINVAL.
            _ => libc::EINVAL,
        };
        std::io::Error::from_raw_os_error(code)
    }

    /// Symbolic name.
    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::EPERM => "EPERM",
            NbdErrno::EIO => "EIO",
            NbdErrno::ENOMEM => "ENOMEM",
            NbdErrno::EINVAL => "EINVAL",
            NbdErrno::ENOSPC => "ENOSPC",
            NbdErrno::EOVERFLOW => "EOVERFLOW",
            NbdErrno::ENOTSUP => "ENOTSUP",
            NbdErrno::ESHUTDOWN => "ESHUTDOWN",
            _ => "unknown",
        }
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// The opaque 64-bit cookie (a.k.a. handle) a client attaches to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cookie(pub u64);

/// A metadata context id, assigned by the server in reply to SET_META_CONTEXT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContextId(pub u32);

/// Which reply/request header style was negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies.
    Structured,
    /// Extended (64-bit) requests and replies.
    Extended,
}

impl HeaderMode {
    /// True when structured/extended chunks may be sent.
    pub fn structured(self) -> bool {
        !matches!(self, HeaderMode::Simple)
    }
    /// Size of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Extended => EXTENDED_REQUEST_LEN,
            _ => COMPACT_REQUEST_LEN,
        }
    }
}

// ---------------------------------------------------------------------------
// Wire structs
// ---------------------------------------------------------------------------

/// A decoded request header (compact or extended; `length` widened to u64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`cflag::*`).
    pub flags: u16,
    /// Command code (`cmd::*`).
    pub command: u16,
    /// Client cookie.
    pub cookie: Cookie,
    /// Offset into the export.
    pub offset: u64,
    /// Payload or effect length.
    pub length: u64,
}

/// Errors decoding a request header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The magic did not match the negotiated header style.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl RequestHeader {
    /// Decode a compact request header.
    pub fn decode_compact(b: &[u8; COMPACT_REQUEST_LEN]) -> Result<Self, HeaderError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            cookie: Cookie(be_u64(b, 8)),
            offset: be_u64(b, 16),
            length: u64::from(be_u32(b, 24)),
        })
    }

    /// Decode an extended request header.
    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<Self, HeaderError> {
        let magic = be_u32(b, 0);
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            cookie: Cookie(be_u64(b, 8)),
            offset: be_u64(b, 16),
            length: be_u64(b, 24),
        })
    }

    /// Encode as a compact header. Fails if `length` does not fit in 32 bits.
    pub fn encode_compact(&self) -> Option<[u8; COMPACT_REQUEST_LEN]> {
        let len = u32::try_from(self.length).ok()?;
        let mut b = [0u8; COMPACT_REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.0.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        Some(b)
    }

    /// Encode as an extended header.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.0.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Encode a simple reply header.
pub fn encode_simple_reply(error: NbdErrno, cookie: Cookie) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.0.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.0.to_be_bytes());
    b
}

/// Encode a structured (compact) or extended chunk header into `out`.
///
/// `request_offset` is only used by extended headers. In structured mode the
/// payload length must fit in 32 bits; callers guarantee this by bounding
/// payloads to the maximum payload size.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    flags: u16,
    reply_type: u16,
    cookie: Cookie,
    request_offset: u64,
    payload_len: u64,
) {
    match mode {
        HeaderMode::Extended => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&reply_type.to_be_bytes());
            out.extend_from_slice(&cookie.0.to_be_bytes());
            out.extend_from_slice(&request_offset.to_be_bytes());
            out.extend_from_slice(&payload_len.to_be_bytes());
        }
        HeaderMode::Structured | HeaderMode::Simple => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&reply_type.to_be_bytes());
            out.extend_from_slice(&cookie.0.to_be_bytes());
            // Payloads are bounded well below 4 GiB by construction.
            let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

/// A decoded reply header as seen by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply.
    Simple {
        /// Error value (0 = success).
        error: u32,
        /// Cookie.
        cookie: Cookie,
    },
    /// Structured or extended chunk.
    Chunk {
        /// Reply flags.
        flags: u16,
        /// Chunk type.
        reply_type: u16,
        /// Cookie.
        cookie: Cookie,
        /// Request offset (extended headers only; 0 otherwise).
        offset: u64,
        /// Payload length.
        length: u64,
    },
}

/// Truncate a message to the protocol's string limit on a char boundary.
pub fn truncate_message(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_roundtrip() {
        let h = RequestHeader {
            flags: cflag::FUA,
            command: cmd::WRITE,
            cookie: Cookie(0x1122334455667788),
            offset: 4096,
            length: 512,
        };
        let b = h.encode_compact().unwrap();
        assert_eq!(RequestHeader::decode_compact(&b).unwrap(), h);
        let e = h.encode_extended();
        assert_eq!(RequestHeader::decode_extended(&e).unwrap(), h);
        let mut bad = b;
        bad[0] = 0;
        assert!(RequestHeader::decode_compact(&bad).is_err());
    }

    #[test]
    fn errno_mapping() {
        let e = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(NbdErrno::from_io(&e), NbdErrno::ENOSPC);
        let e = std::io::Error::from_raw_os_error(libc::EOPNOTSUPP);
        assert_eq!(NbdErrno::from_io(&e), NbdErrno::ENOTSUP);
        let e = std::io::Error::other("x");
        assert_eq!(NbdErrno::from_io(&e), NbdErrno::EIO);
        assert_eq!(
            NbdErrno::ESHUTDOWN.to_io().raw_os_error(),
            Some(libc::ESHUTDOWN)
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(3000);
        let t = truncate_message(&s);
        assert!(t.len() <= MAX_STRING_LEN);
        assert!(s.starts_with(t));
    }
}
