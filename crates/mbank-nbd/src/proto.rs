//! The NBD wire protocol as pure functions over bytes: no I/O, no allocation beyond the
//! returned buffers, no panics on any input. Every parser takes `&[u8]`, checks the
//! length it needs first, and returns a [`CodecError`] for anything malformed, so the
//! parsers can be fuzzed directly.
//!
//! Constants and layouts are those of the protocol's own `doc/proto.md` (NetworkBlockDevice
//! project); the names here are the document's names without the `NBD_` prefix. All
//! integers are big-endian ("network byte order").
//!
//! Both directions are here: the server side uses `parse_*` for what the client sends and
//! `encode_*` for what it answers; tests and tools use the opposite pair to play the client.
//!
//! # Layouts
//!
//! | message | bytes |
//! | --- | --- |
//! | greeting (S) | `NBDMAGIC` u64, `IHAVEOPT` u64, handshake flags u16 |
//! | client flags (C) | u32 |
//! | option (C) | `IHAVEOPT` u64, option u32, length u32, data |
//! | option reply (S) | `0x3e889045565a9` u64, option u32, reply type u32, length u32, data |
//! | `EXPORT_NAME` reply (S) | size u64, transmission flags u16, 124 zero bytes unless `NO_ZEROES` |
//! | request (C) | `0x25609513` u32, command flags u16, type u16, handle u64, offset u64, length u32, (`WRITE`: data) |
//! | simple reply (S) | `0x67446698` u32, error u32, handle u64, (`READ` success: data) |
//! | structured chunk (S) | `0x668e33ef` u32, flags u16, type u16, handle u64, length u32, payload |

use std::num::NonZeroU32;

use thiserror::Error;

// ---- magics -------------------------------------------------------------------------

/// `NBDMAGIC`, first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the greeting and first word of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- handshake flags ----------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- transmission flags -------------------------------------------------------------

/// Transmission flag bit 0: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `CMD_FLAG_DF` is supported on reads (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flushes and FUA on one connection are visible on all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `CMD_RESIZE` (experimental) is supported.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- options ------------------------------------------------------------------------

/// Choose an export and enter transmission (cannot return an error).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

// ---- option reply types -------------------------------------------------------------

/// Option accepted / end of a list of replies.
pub const REP_ACK: u32 = 1;
/// One export, in reply to `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One item of export information, in reply to `OPT_INFO` / `OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks every error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Server policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// The option is syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// The option is not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The requested export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must ask for block size constraints first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request or reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---- info types ---------------------------------------------------------------------

/// Export size and transmission flags (mandatory before a successful `INFO`/`GO`).
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands -----------------------------------------------------------------------

/// Read.
pub const CMD_READ: u16 = 0;
/// Write (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Flush to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Discard.
pub const CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata (block status).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`WRITE_ZEROES`): do not create a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`READ`): do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`BLOCK_STATUS`): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`WRITE_ZEROES`): fail fast unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- structured replies -------------------------------------------------------------

/// Structured reply flag: this is the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload; final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: offset + length of a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: metadata context id + block descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks every error chunk.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Chunk type: error + message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Chunk type: error + message + offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---- error values -------------------------------------------------------------------

/// Operation not permitted.
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left on device.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---- metadata contexts --------------------------------------------------------------

/// The one metadata context this crate serves.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---- sizes and bounds ---------------------------------------------------------------

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of the reply to `EXPORT_NAME` when zeroes are not omitted.
pub const EXPORT_NAME_REPLY_LEN: usize = 8 + 2 + 124;
/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Longest option data this codec accepts: room for a name and a handful of
/// maximum-length queries. Longer options are treated as a denial of service.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest `READ`/`WRITE` payload (2^25 bytes): the size the protocol says no peer
/// should consider abusive, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Most queries one metadata-context option may carry.
pub const MAX_META_QUERIES: u32 = 16;

/// Why some bytes are not a valid NBD message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The buffer is shorter than the message needs.
    #[error("parsing {what}: need {need} bytes, have {got}")]
    Truncated {
        /// The message being parsed.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A magic number is wrong: the peer does not speak this protocol (or is out of sync).
    #[error("parsing {what}: bad magic {found:#x}")]
    BadMagic {
        /// The message being parsed.
        what: &'static str,
        /// The magic found.
        found: u64,
    },
    /// The client set handshake flags this server does not know.
    #[error("parsing the client flags: unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option announced more data than [`MAX_OPTION_LEN`].
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// Its announced length.
        len: u32,
    },
    /// A `WRITE` request announced more payload than [`MAX_PAYLOAD`].
    #[error("a WRITE of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge {
        /// The announced payload length.
        len: u32,
    },
    /// A field is well framed but its content is not valid.
    #[error("parsing {what}: {reason}")]
    Malformed {
        /// The message or field being parsed.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A message to encode does not fit the protocol's length fields.
    #[error("encoding {what}: {reason}")]
    Unencodable {
        /// The message being encoded.
        what: &'static str,
        /// Why it cannot be encoded.
        reason: String,
    },
}

// ---- byte helpers -------------------------------------------------------------------

/// A bounds-checked reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated {
                what: self.what,
                need: n,
                got: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string whose length is given by a preceding u32.
    fn string_u32(&mut self) -> Result<String, CodecError> {
        let len = self.u32()?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_STRING_LEN {
            return Err(self.malformed(format!(
                "a string of {len} bytes is longer than {MAX_STRING_LEN}"
            )));
        }
        let bytes = self.take(len)?;
        check_string(bytes, self.what)
    }

    /// All remaining bytes as a string.
    fn rest_string(&mut self) -> Result<String, CodecError> {
        let bytes = self.take(self.buf.len())?;
        if bytes.len() > MAX_STRING_LEN {
            return Err(self.malformed(format!(
                "a string of {} bytes is longer than {MAX_STRING_LEN}",
                bytes.len()
            )));
        }
        check_string(bytes, self.what)
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn malformed(&self, reason: String) -> CodecError {
        CodecError::Malformed {
            what: self.what,
            reason,
        }
    }

    fn finish(self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} unexpected trailing bytes", self.buf.len())))
        }
    }
}

fn check_string(bytes: &[u8], what: &'static str) -> Result<String, CodecError> {
    let s = std::str::from_utf8(bytes).map_err(|e| CodecError::Malformed {
        what,
        reason: format!("a string is not UTF-8: {e}"),
    })?;
    if s.contains('\0') {
        return Err(CodecError::Malformed {
            what,
            reason: "a string contains NUL".into(),
        });
    }
    Ok(s.to_owned())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn len_u32(len: usize, what: &'static str) -> Result<u32, CodecError> {
    u32::try_from(len).map_err(|_| CodecError::Unencodable {
        what,
        reason: format!("{len} bytes do not fit a 32-bit length"),
    })
}

fn put_string_u32(out: &mut Vec<u8>, s: &str) {
    let s = truncate_str(s, MAX_STRING_LEN);
    // A truncated string is at most 4096 bytes, so the cast is exact.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---- greeting and client flags ------------------------------------------------------

/// The server's first message: magics and handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Parses the server greeting (client side); returns the handshake flags.
pub fn parse_greeting(buf: &[u8]) -> Result<u16, CodecError> {
    let mut c = Cursor::new(buf, "the server greeting");
    let magic = c.u64()?;
    if magic != NBDMAGIC {
        return Err(CodecError::BadMagic {
            what: "the server greeting",
            found: magic,
        });
    }
    let opt = c.u64()?;
    if opt != IHAVEOPT {
        return Err(CodecError::BadMagic {
            what: "the server greeting (oldstyle servers are not supported)",
            found: opt,
        });
    }
    c.u16()
}

/// The client flags a fixed-newstyle client sends after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// The wire form.
    pub fn encode(self) -> [u8; 4] {
        let mut bits = 0;
        if self.fixed_newstyle {
            bits |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            bits |= FLAG_C_NO_ZEROES;
        }
        u32::to_be_bytes(bits)
    }
}

/// Parses the client flags, refusing bits this server did not advertise (the protocol
/// requires the server to drop such a client).
pub fn parse_client_flags(buf: &[u8]) -> Result<ClientFlags, CodecError> {
    let bits = Cursor::new(buf, "the client flags").u32()?;
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if bits & !known != 0 {
        return Err(CodecError::UnknownClientFlags(bits & !known));
    }
    Ok(ClientFlags {
        fixed_newstyle: bits & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: bits & FLAG_C_NO_ZEROES != 0,
    })
}

// ---- options (client to server) -----------------------------------------------------

/// The fixed part of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Parses an option header, checking the magic and the [`MAX_OPTION_LEN`] bound.
pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader, CodecError> {
    let mut c = Cursor::new(buf, "an option header");
    let magic = c.u64()?;
    if magic != IHAVEOPT {
        return Err(CodecError::BadMagic {
            what: "an option header",
            found: magic,
        });
    }
    let option = c.u32()?;
    let len = c.u32()?;
    if len > MAX_OPTION_LEN {
        return Err(CodecError::OptionTooLong { option, len });
    }
    Ok(OptionHeader { option, len })
}

/// The data of `OPT_INFO` and `OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// Export name; empty means the default export.
    pub export: String,
    /// Information items requested (`INFO_*`).
    pub requests: Vec<u16>,
}

/// The data of `OPT_LIST_META_CONTEXT` and `OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaContextRequest {
    /// Export name; empty means the default export.
    pub export: String,
    /// Queries such as `base:allocation` or `base:`.
    pub queries: Vec<String>,
}

/// One option as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `OPT_EXPORT_NAME`: choose an export and enter transmission.
    ExportName(String),
    /// `OPT_ABORT` (any data is ignored, as the protocol asks).
    Abort,
    /// `OPT_LIST`.
    List,
    /// `OPT_STARTTLS`.
    StartTls,
    /// `OPT_INFO`.
    Info(InfoRequest),
    /// `OPT_GO`.
    Go(InfoRequest),
    /// `OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any option this codec does not know; its data is skipped.
    Unknown(u32),
}

impl ClientOption {
    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            Self::ExportName(_) => OPT_EXPORT_NAME,
            Self::Abort => OPT_ABORT,
            Self::List => OPT_LIST,
            Self::StartTls => OPT_STARTTLS,
            Self::Info(_) => OPT_INFO,
            Self::Go(_) => OPT_GO,
            Self::StructuredReply => OPT_STRUCTURED_REPLY,
            Self::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            Self::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            Self::Unknown(code) => *code,
        }
    }

    /// The whole option on the wire: header and data (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        match self {
            Self::ExportName(name) => {
                data.extend_from_slice(truncate_str(name, MAX_STRING_LEN).as_bytes())
            }
            Self::Info(req) | Self::Go(req) => {
                put_string_u32(&mut data, &req.export);
                let n = req.requests.len().min(usize::from(u16::MAX));
                data.extend_from_slice(&(n as u16).to_be_bytes());
                for r in &req.requests[..n] {
                    data.extend_from_slice(&r.to_be_bytes());
                }
            }
            Self::ListMetaContext(req) | Self::SetMetaContext(req) => {
                put_string_u32(&mut data, &req.export);
                let n = req.queries.len().min(MAX_META_QUERIES as usize);
                data.extend_from_slice(&(n as u32).to_be_bytes());
                for q in &req.queries[..n] {
                    put_string_u32(&mut data, q);
                }
            }
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::Unknown(_) => {}
        }
        encode_option(self.code(), &data)
    }
}

/// An option with arbitrary data (client side; used to send unknown options too).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    // Option data is bounded by MAX_OPTION_LEN on the receiving side; a longer slice
    // saturates, which the receiver then rejects.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Parses the data of option `option`. An error means the option is malformed; the
/// server answers it with `REP_ERR_INVALID` (or, for `EXPORT_NAME`, which cannot carry an
/// error, ends the session).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, CodecError> {
    let no_data = |what: &'static str, opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(CodecError::Malformed {
                what,
                reason: format!("the option must carry no data, it carries {}", data.len()),
            })
        }
    };
    match option {
        OPT_EXPORT_NAME => {
            let mut c = Cursor::new(data, "the EXPORT_NAME option");
            Ok(ClientOption::ExportName(c.rest_string()?))
        }
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data("the LIST option", ClientOption::List),
        OPT_STARTTLS => no_data("the STARTTLS option", ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => {
            no_data("the STRUCTURED_REPLY option", ClientOption::StructuredReply)
        }
        OPT_INFO | OPT_GO => {
            let what = if option == OPT_INFO {
                "the INFO option"
            } else {
                "the GO option"
            };
            let mut c = Cursor::new(data, what);
            let export = c.string_u32()?;
            let n = c.u16()?;
            if c.remaining() != usize::from(n) * 2 {
                return Err(c.malformed(format!(
                    "{n} information requests need {} bytes, {} remain",
                    usize::from(n) * 2,
                    c.remaining()
                )));
            }
            let mut requests = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                requests.push(c.u16()?);
            }
            c.finish()?;
            let req = InfoRequest { export, requests };
            Ok(if option == OPT_INFO {
                ClientOption::Info(req)
            } else {
                ClientOption::Go(req)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let what = if option == OPT_LIST_META_CONTEXT {
                "the LIST_META_CONTEXT option"
            } else {
                "the SET_META_CONTEXT option"
            };
            let mut c = Cursor::new(data, what);
            let export = c.string_u32()?;
            let n = c.u32()?;
            if n > MAX_META_QUERIES {
                return Err(c.malformed(format!(
                    "{n} queries are more than the {MAX_META_QUERIES} this server accepts"
                )));
            }
            let mut queries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                queries.push(c.string_u32()?);
            }
            c.finish()?;
            let req = MetaContextRequest { export, queries };
            Ok(if option == OPT_LIST_META_CONTEXT {
                ClientOption::ListMetaContext(req)
            } else {
                ClientOption::SetMetaContext(req)
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

// ---- option replies (server to client) ----------------------------------------------

/// An option error reply type (`REP_ERR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepError {
    /// `REP_ERR_UNSUP`.
    Unsup,
    /// `REP_ERR_POLICY`.
    Policy,
    /// `REP_ERR_INVALID`.
    Invalid,
    /// `REP_ERR_PLATFORM`.
    Platform,
    /// `REP_ERR_TLS_REQD`.
    TlsReqd,
    /// `REP_ERR_UNKNOWN`.
    Unknown,
    /// `REP_ERR_SHUTDOWN`.
    Shutdown,
    /// `REP_ERR_BLOCK_SIZE_REQD`.
    BlockSizeReqd,
    /// `REP_ERR_TOO_BIG`.
    TooBig,
    /// Any other value with bit 31 set.
    Other(u32),
}

impl RepError {
    /// The reply type on the wire.
    pub fn code(self) -> u32 {
        match self {
            Self::Unsup => REP_ERR_UNSUP,
            Self::Policy => REP_ERR_POLICY,
            Self::Invalid => REP_ERR_INVALID,
            Self::Platform => REP_ERR_PLATFORM,
            Self::TlsReqd => REP_ERR_TLS_REQD,
            Self::Unknown => REP_ERR_UNKNOWN,
            Self::Shutdown => REP_ERR_SHUTDOWN,
            Self::BlockSizeReqd => REP_ERR_BLOCK_SIZE_REQD,
            Self::TooBig => REP_ERR_TOO_BIG,
            Self::Other(code) => code | REP_FLAG_ERROR,
        }
    }

    fn from_code(code: u32) -> Self {
        match code {
            REP_ERR_UNSUP => Self::Unsup,
            REP_ERR_POLICY => Self::Policy,
            REP_ERR_INVALID => Self::Invalid,
            REP_ERR_PLATFORM => Self::Platform,
            REP_ERR_TLS_REQD => Self::TlsReqd,
            REP_ERR_UNKNOWN => Self::Unknown,
            REP_ERR_SHUTDOWN => Self::Shutdown,
            REP_ERR_BLOCK_SIZE_REQD => Self::BlockSizeReqd,
            REP_ERR_TOO_BIG => Self::TooBig,
            other => Self::Other(other),
        }
    }
}

/// One `REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags (`FLAG_*`).
        flags: u16,
    },
    /// `INFO_NAME`.
    Name(String),
    /// `INFO_DESCRIPTION`.
    Description(String),
    /// `INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        max: u32,
    },
    /// An information type this codec does not know (client side).
    Unknown {
        /// The information type.
        kind: u16,
        /// Its payload.
        data: Vec<u8>,
    },
}

/// One fixed-newstyle option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    /// `REP_ACK`.
    Ack,
    /// `REP_SERVER`: one export and optional details for humans.
    Server {
        /// Export name.
        name: String,
        /// Free-form details (may be empty).
        details: String,
    },
    /// `REP_INFO`.
    Info(Info),
    /// `REP_META_CONTEXT`.
    MetaContext {
        /// Context id (zero in replies to `LIST_META_CONTEXT`).
        id: u32,
        /// Context name.
        name: String,
    },
    /// An error reply with a message for humans.
    Error {
        /// Which error.
        kind: RepError,
        /// Message (cut to [`MAX_STRING_LEN`] when encoded).
        message: String,
    },
}

impl OptionReply {
    /// An error reply.
    pub fn error(kind: RepError, message: impl Into<String>) -> Self {
        Self::Error {
            kind,
            message: message.into(),
        }
    }

    /// The reply type on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            Self::Ack => REP_ACK,
            Self::Server { .. } => REP_SERVER,
            Self::Info(_) => REP_INFO,
            Self::MetaContext { .. } => REP_META_CONTEXT,
            Self::Error { kind, .. } => kind.code(),
        }
    }
}

/// The whole reply to `option` on the wire. Strings longer than [`MAX_STRING_LEN`] are
/// cut on a character boundary, so encoding cannot fail.
pub fn encode_option_reply(option: u32, reply: &OptionReply) -> Vec<u8> {
    let mut data = Vec::new();
    match reply {
        OptionReply::Ack => {}
        OptionReply::Server { name, details } => {
            put_string_u32(&mut data, name);
            data.extend_from_slice(truncate_str(details, MAX_STRING_LEN).as_bytes());
        }
        OptionReply::Info(info) => match info {
            Info::Export { size, flags } => {
                data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                data.extend_from_slice(&size.to_be_bytes());
                data.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(name) => {
                data.extend_from_slice(&INFO_NAME.to_be_bytes());
                data.extend_from_slice(truncate_str(name, MAX_STRING_LEN).as_bytes());
            }
            Info::Description(text) => {
                data.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                data.extend_from_slice(truncate_str(text, MAX_STRING_LEN).as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                data.extend_from_slice(&min.to_be_bytes());
                data.extend_from_slice(&preferred.to_be_bytes());
                data.extend_from_slice(&max.to_be_bytes());
            }
            Info::Unknown { kind, data: d } => {
                data.extend_from_slice(&kind.to_be_bytes());
                data.extend_from_slice(&d[..d.len().min(MAX_OPTION_LEN as usize)]);
            }
        },
        OptionReply::MetaContext { id, name } => {
            data.extend_from_slice(&id.to_be_bytes());
            data.extend_from_slice(truncate_str(name, MAX_STRING_LEN).as_bytes());
        }
        OptionReply::Error { message, .. } => {
            data.extend_from_slice(truncate_str(message, MAX_STRING_LEN).as_bytes());
        }
    }
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.reply_type().to_be_bytes());
    // data is bounded above by a few string maxima, far below 4 GiB.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&data);
    out
}

/// The fixed part of an option reply (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Parses an option reply header (client side), bounding its length by [`MAX_OPTION_LEN`].
pub fn parse_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, CodecError> {
    let mut c = Cursor::new(buf, "an option reply header");
    let magic = c.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(CodecError::BadMagic {
            what: "an option reply header",
            found: magic,
        });
    }
    let option = c.u32()?;
    let reply_type = c.u32()?;
    let len = c.u32()?;
    if len > MAX_OPTION_LEN {
        return Err(CodecError::OptionTooLong { option, len });
    }
    Ok(OptionReplyHeader {
        option,
        reply_type,
        len,
    })
}

/// Parses the data of an option reply of type `reply_type` (client side).
pub fn parse_option_reply(reply_type: u32, data: &[u8]) -> Result<OptionReply, CodecError> {
    if reply_type & REP_FLAG_ERROR != 0 {
        let mut c = Cursor::new(data, "an option error reply");
        return Ok(OptionReply::Error {
            kind: RepError::from_code(reply_type),
            message: c.rest_string()?,
        });
    }
    match reply_type {
        REP_ACK => {
            Cursor::new(data, "an ACK reply").finish()?;
            Ok(OptionReply::Ack)
        }
        REP_SERVER => {
            let mut c = Cursor::new(data, "a SERVER reply");
            let name = c.string_u32()?;
            let details = c.rest_string()?;
            Ok(OptionReply::Server { name, details })
        }
        REP_INFO => {
            let mut c = Cursor::new(data, "an INFO reply");
            let kind = c.u16()?;
            let info = match kind {
                INFO_EXPORT => {
                    let size = c.u64()?;
                    let flags = c.u16()?;
                    c.finish()?;
                    Info::Export { size, flags }
                }
                INFO_NAME => Info::Name(c.rest_string()?),
                INFO_DESCRIPTION => Info::Description(c.rest_string()?),
                INFO_BLOCK_SIZE => {
                    let min = c.u32()?;
                    let preferred = c.u32()?;
                    let max = c.u32()?;
                    c.finish()?;
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    }
                }
                other => Info::Unknown {
                    kind: other,
                    data: c.take(c.remaining())?.to_vec(),
                },
            };
            Ok(OptionReply::Info(info))
        }
        REP_META_CONTEXT => {
            let mut c = Cursor::new(data, "a META_CONTEXT reply");
            let id = c.u32()?;
            let name = c.rest_string()?;
            Ok(OptionReply::MetaContext { id, name })
        }
        other => Err(CodecError::Malformed {
            what: "an option reply",
            reason: format!("unknown reply type {other:#x}"),
        }),
    }
}

/// The reply to `OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless
/// the client negotiated `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXPORT_NAME_REPLY_LEN);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(EXPORT_NAME_REPLY_LEN, 0);
    }
    out
}

/// Parses the first 10 bytes of the reply to `OPT_EXPORT_NAME` (client side).
pub fn parse_export_name_reply(buf: &[u8]) -> Result<(u64, u16), CodecError> {
    let mut c = Cursor::new(buf, "the EXPORT_NAME reply");
    Ok((c.u64()?, c.u16()?))
}

// ---- transmission requests ----------------------------------------------------------

/// A transmission command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `CMD_READ`.
    Read,
    /// `CMD_WRITE`.
    Write,
    /// `CMD_DISC`.
    Disc,
    /// `CMD_FLUSH`.
    Flush,
    /// `CMD_TRIM`.
    Trim,
    /// `CMD_CACHE`.
    Cache,
    /// `CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// From the wire value.
    pub fn from_code(code: u16) -> Self {
        match code {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disc,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_CACHE => Self::Cache,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disc => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::Cache => CMD_CACHE,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::BlockStatus => CMD_BLOCK_STATUS,
            Self::Unknown(code) => code,
        }
    }

    /// The protocol's name for it, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "READ",
            Self::Write => "WRITE",
            Self::Disc => "DISC",
            Self::Flush => "FLUSH",
            Self::Trim => "TRIM",
            Self::Cache => "CACHE",
            Self::WriteZeroes => "WRITE_ZEROES",
            Self::BlockStatus => "BLOCK_STATUS",
            Self::Unknown(_) => "an unknown command",
        }
    }
}

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type.
    pub command: Command,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }

    /// The header on the wire (client side).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Parses a request header. A `WRITE` announcing more than [`MAX_PAYLOAD`] bytes is an
/// error: its payload cannot be skipped safely, so the server ends the connection.
pub fn parse_request(buf: &[u8]) -> Result<Request, CodecError> {
    let mut c = Cursor::new(buf, "a request header");
    let magic = c.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(CodecError::BadMagic {
            what: "a request header",
            found: u64::from(magic),
        });
    }
    let flags = c.u16()?;
    let command = Command::from_code(c.u16()?);
    let handle = c.u64()?;
    let offset = c.u64()?;
    let len = c.u32()?;
    let req = Request {
        flags,
        command,
        handle,
        offset,
        len,
    };
    if req.payload_len() > MAX_PAYLOAD {
        return Err(CodecError::PayloadTooLarge { len });
    }
    Ok(req)
}

// ---- simple replies -----------------------------------------------------------------

/// A simple reply header; for a successful `READ` the data follows it.
pub fn encode_simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// The magic that starts a reply, to tell simple from structured (client side).
pub fn reply_magic(buf: &[u8]) -> Result<u32, CodecError> {
    Cursor::new(buf, "a reply").u32()
}

/// Parses a simple reply header (client side); returns `(handle, error)`.
pub fn parse_simple_reply(buf: &[u8]) -> Result<(u64, u32), CodecError> {
    let mut c = Cursor::new(buf, "a simple reply");
    let magic = c.u32()?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(CodecError::BadMagic {
            what: "a simple reply",
            found: u64::from(magic),
        });
    }
    let error = c.u32()?;
    let handle = c.u64()?;
    Ok((handle, error))
}

// ---- structured replies -------------------------------------------------------------

/// One `base:allocation` (or other context) descriptor in a block status chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Extent length (nonzero).
    pub len: u32,
    /// Status flags (`STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// The fixed part of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// Handle of the request this answers.
    pub handle: u64,
    /// Length of the payload that follows.
    pub len: u32,
}

impl ChunkHeader {
    /// True if this is the final chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// One structured reply chunk's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `REPLY_TYPE_NONE`: success, nothing more (always final).
    None,
    /// `REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Absolute offset of the data.
        offset: u64,
        /// The data (at least one byte).
        data: Vec<u8>,
    },
    /// `REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Absolute offset of the zero range.
        offset: u64,
        /// Its length (nonzero).
        len: u32,
    },
    /// `REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Metadata context id.
        context: u32,
        /// At least one descriptor.
        extents: Vec<BlockDescriptor>,
    },
    /// `REPLY_TYPE_ERROR`.
    Error {
        /// NBD error value (nonzero).
        error: u32,
        /// Message for humans.
        message: String,
    },
    /// `REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// NBD error value (nonzero).
        error: u32,
        /// Message for humans.
        message: String,
        /// Where the error happened.
        offset: u64,
    },
    /// Any other chunk type (client side).
    Unknown {
        /// The chunk type.
        kind: u16,
        /// Its payload.
        payload: Vec<u8>,
    },
}

impl Chunk {
    /// The chunk type on the wire.
    pub fn kind(&self) -> u16 {
        match self {
            Self::None => REPLY_TYPE_NONE,
            Self::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            Self::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            Self::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
            Self::Error { .. } => REPLY_TYPE_ERROR,
            Self::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
            Self::Unknown { kind, .. } => *kind,
        }
    }
}

fn chunk_header(handle: u64, flags: u16, kind: u16, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// The header of an `OFFSET_DATA` chunk carrying `data_len` bytes, with the offset
/// field: 28 bytes after which the data itself is sent. This lets the server send a large
/// read without copying it into a new buffer.
pub fn encode_offset_data_header(
    handle: u64,
    done: bool,
    offset: u64,
    data_len: usize,
) -> Result<[u8; CHUNK_HEADER_LEN + 8], CodecError> {
    if data_len == 0 {
        return Err(CodecError::Unencodable {
            what: "an OFFSET_DATA chunk",
            reason: "it must carry at least one byte".into(),
        });
    }
    let len = len_u32(data_len, "an OFFSET_DATA chunk")?
        .checked_add(8)
        .ok_or_else(|| CodecError::Unencodable {
            what: "an OFFSET_DATA chunk",
            reason: format!("{data_len} bytes and an offset do not fit a 32-bit length"),
        })?;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = [0u8; CHUNK_HEADER_LEN + 8];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        handle,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        len,
    ));
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    Ok(out)
}

fn put_error_payload(payload: &mut Vec<u8>, error: NonZeroU32, message: &str) {
    let message = truncate_str(message, MAX_STRING_LEN);
    payload.extend_from_slice(&error.get().to_be_bytes());
    // At most 4096 bytes after truncation.
    payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
    payload.extend_from_slice(message.as_bytes());
}

/// A whole `REPLY_TYPE_ERROR` chunk; infallible, the message is cut to
/// [`MAX_STRING_LEN`] bytes.
pub fn encode_error_chunk(handle: u64, done: bool, error: NonZeroU32, message: &str) -> Vec<u8> {
    let mut payload = Vec::new();
    put_error_payload(&mut payload, error, message);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    // The payload is at most 6 + 4096 bytes.
    let mut out = chunk_header(handle, flags, REPLY_TYPE_ERROR, payload.len() as u32).to_vec();
    out.extend_from_slice(&payload);
    out
}

/// A whole structured reply chunk. `NONE` chunks are always marked final. Fails for
/// chunks the protocol forbids (empty data or descriptor list, zero-length hole, error
/// value zero, data too large for the length field); messages are cut to
/// [`MAX_STRING_LEN`] bytes.
pub fn encode_chunk(handle: u64, done: bool, chunk: &Chunk) -> Result<Vec<u8>, CodecError> {
    let mut payload = Vec::new();
    let mut done = done;
    match chunk {
        Chunk::None => done = true,
        Chunk::OffsetData { offset, data } => {
            let header = encode_offset_data_header(handle, done, *offset, data.len())?;
            let mut out = Vec::with_capacity(header.len() + data.len());
            out.extend_from_slice(&header);
            out.extend_from_slice(data);
            return Ok(out);
        }
        Chunk::OffsetHole { offset, len } => {
            if *len == 0 {
                return Err(CodecError::Unencodable {
                    what: "an OFFSET_HOLE chunk",
                    reason: "the hole size must be nonzero".into(),
                });
            }
            payload.extend_from_slice(&offset.to_be_bytes());
            payload.extend_from_slice(&len.to_be_bytes());
        }
        Chunk::BlockStatus { context, extents } => {
            if extents.is_empty() {
                return Err(CodecError::Unencodable {
                    what: "a BLOCK_STATUS chunk",
                    reason: "it must carry at least one descriptor".into(),
                });
            }
            if extents.iter().any(|e| e.len == 0) {
                return Err(CodecError::Unencodable {
                    what: "a BLOCK_STATUS chunk",
                    reason: "descriptor lengths must be nonzero".into(),
                });
            }
            len_u32(4 + extents.len().saturating_mul(8), "a BLOCK_STATUS chunk")?;
            payload.extend_from_slice(&context.to_be_bytes());
            for e in extents {
                payload.extend_from_slice(&e.len.to_be_bytes());
                payload.extend_from_slice(&e.flags.to_be_bytes());
            }
        }
        Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
            let Some(error) = NonZeroU32::new(*error) else {
                return Err(CodecError::Unencodable {
                    what: "an error chunk",
                    reason: "the error value must be nonzero".into(),
                });
            };
            put_error_payload(&mut payload, error, message);
            if let Chunk::ErrorOffset { offset, .. } = chunk {
                payload.extend_from_slice(&offset.to_be_bytes());
            }
        }
        Chunk::Unknown { payload: p, .. } => payload.extend_from_slice(p),
    }
    let len = len_u32(payload.len(), "a structured reply chunk")?;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&chunk_header(handle, flags, chunk.kind(), len));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Parses a structured reply chunk header (client side). `max_payload` bounds the
/// announced length before the caller allocates for it.
pub fn parse_chunk_header(buf: &[u8], max_payload: u32) -> Result<ChunkHeader, CodecError> {
    let mut c = Cursor::new(buf, "a structured reply chunk header");
    let magic = c.u32()?;
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(CodecError::BadMagic {
            what: "a structured reply chunk header",
            found: u64::from(magic),
        });
    }
    let flags = c.u16()?;
    let kind = c.u16()?;
    let handle = c.u64()?;
    let len = c.u32()?;
    if len > max_payload {
        return Err(CodecError::Malformed {
            what: "a structured reply chunk header",
            reason: format!("a payload of {len} bytes exceeds the {max_payload}-byte limit"),
        });
    }
    Ok(ChunkHeader {
        flags,
        kind,
        handle,
        len,
    })
}

/// Parses a structured reply chunk payload of type `kind` (client side), checking the
/// constraints the protocol puts on each type.
pub fn parse_chunk(kind: u16, payload: &[u8]) -> Result<Chunk, CodecError> {
    match kind {
        REPLY_TYPE_NONE => {
            Cursor::new(payload, "a NONE chunk").finish()?;
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            let mut c = Cursor::new(payload, "an OFFSET_DATA chunk");
            let offset = c.u64()?;
            if c.remaining() == 0 {
                return Err(c.malformed("it carries no data".into()));
            }
            Ok(Chunk::OffsetData {
                offset,
                data: c.take(c.remaining())?.to_vec(),
            })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let mut c = Cursor::new(payload, "an OFFSET_HOLE chunk");
            let offset = c.u64()?;
            let len = c.u32()?;
            c.finish()?;
            if len == 0 {
                return Err(CodecError::Malformed {
                    what: "an OFFSET_HOLE chunk",
                    reason: "the hole size is zero".into(),
                });
            }
            Ok(Chunk::OffsetHole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let mut c = Cursor::new(payload, "a BLOCK_STATUS chunk");
            let context = c.u32()?;
            if c.remaining() == 0 || !c.remaining().is_multiple_of(8) {
                return Err(c.malformed(format!(
                    "{} bytes of descriptors are not a positive multiple of 8",
                    c.remaining()
                )));
            }
            let mut extents = Vec::with_capacity(c.remaining() / 8);
            while c.remaining() > 0 {
                let len = c.u32()?;
                let flags = c.u32()?;
                if len == 0 {
                    return Err(c.malformed("a descriptor has length zero".into()));
                }
                extents.push(BlockDescriptor { len, flags });
            }
            Ok(Chunk::BlockStatus { context, extents })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let mut c = Cursor::new(payload, "an error chunk");
            let error = c.u32()?;
            if error == 0 {
                return Err(c.malformed("the error value is zero".into()));
            }
            let mlen = c.u16()?;
            let message = check_string(c.take(usize::from(mlen))?, "an error chunk message")?;
            if kind == REPLY_TYPE_ERROR {
                c.finish()?;
                Ok(Chunk::Error { error, message })
            } else {
                let offset = c.u64()?;
                c.finish()?;
                Ok(Chunk::ErrorOffset {
                    error,
                    message,
                    offset,
                })
            }
        }
        other => Ok(Chunk::Unknown {
            kind: other,
            payload: payload.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nbd_string() -> impl Strategy<Value = String> + Clone {
        "[^\u{0}]{0,64}"
    }

    fn info_strategy() -> impl Strategy<Value = Info> {
        prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
            nbd_string().prop_map(Info::Name),
            nbd_string().prop_map(Info::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }),
            (4u16..100, proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(kind, data)| Info::Unknown { kind, data }),
        ]
    }

    fn rep_error() -> impl Strategy<Value = RepError> {
        prop_oneof![
            Just(RepError::Unsup),
            Just(RepError::Policy),
            Just(RepError::Invalid),
            Just(RepError::Platform),
            Just(RepError::TlsReqd),
            Just(RepError::Unknown),
            Just(RepError::Shutdown),
            Just(RepError::BlockSizeReqd),
            Just(RepError::TooBig),
            (10u32..0x7fff_ffff).prop_map(|c| RepError::Other(c | REP_FLAG_ERROR)),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        prop_oneof![
            Just(OptionReply::Ack),
            (nbd_string(), nbd_string())
                .prop_map(|(name, details)| OptionReply::Server { name, details }),
            info_strategy().prop_map(OptionReply::Info),
            (any::<u32>(), nbd_string())
                .prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
            (rep_error(), nbd_string())
                .prop_map(|(kind, message)| OptionReply::Error { kind, message }),
        ]
    }

    fn client_option() -> impl Strategy<Value = ClientOption> {
        let info = (nbd_string(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(export, requests)| InfoRequest { export, requests });
        let meta = (nbd_string(), proptest::collection::vec(nbd_string(), 0..8))
            .prop_map(|(export, queries)| MetaContextRequest { export, queries });
        prop_oneof![
            nbd_string().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StartTls),
            info.clone().prop_map(ClientOption::Info),
            info.prop_map(ClientOption::Go),
            Just(ClientOption::StructuredReply),
            meta.clone().prop_map(ClientOption::ListMetaContext),
            meta.prop_map(ClientOption::SetMetaContext),
            (11u32..).prop_map(ClientOption::Unknown),
        ]
    }

    fn chunk() -> impl Strategy<Value = Chunk> {
        let desc = (1u32.., any::<u32>()).prop_map(|(len, flags)| BlockDescriptor { len, flags });
        prop_oneof![
            Just(Chunk::None),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..256))
                .prop_map(|(offset, data)| Chunk::OffsetData { offset, data }),
            (any::<u64>(), 1u32..).prop_map(|(offset, len)| Chunk::OffsetHole { offset, len }),
            (any::<u32>(), proptest::collection::vec(desc, 1..20))
                .prop_map(|(context, extents)| Chunk::BlockStatus { context, extents }),
            (1u32.., nbd_string()).prop_map(|(error, message)| Chunk::Error { error, message }),
            (1u32.., nbd_string(), any::<u64>()).prop_map(|(error, message, offset)| {
                Chunk::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }),
        ]
    }

    fn command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(Command::from_code)
    }

    proptest! {
        #[test]
        fn client_option_round_trip(opt in client_option()) {
            let wire = opt.encode();
            let header = parse_option_header(&wire).expect("header");
            prop_assert_eq!(header.option, opt.code());
            prop_assert_eq!(header.len as usize, wire.len() - OPTION_HEADER_LEN);
            let parsed = parse_option(header.option, &wire[OPTION_HEADER_LEN..]).expect("option");
            prop_assert_eq!(parsed, opt);
        }

        #[test]
        fn option_reply_round_trip(option in any::<u32>(), reply in option_reply()) {
            let wire = encode_option_reply(option, &reply);
            let header = parse_option_reply_header(&wire).expect("header");
            prop_assert_eq!(header.option, option);
            prop_assert_eq!(header.reply_type, reply.reply_type());
            prop_assert_eq!(header.len as usize, wire.len() - OPTION_REPLY_HEADER_LEN);
            let parsed = parse_option_reply(header.reply_type, &wire[OPTION_REPLY_HEADER_LEN..])
                .expect("reply");
            prop_assert_eq!(parsed, reply);
        }

        #[test]
        fn request_round_trip(flags in any::<u16>(), command in command(), handle in any::<u64>(),
                              offset in any::<u64>(), len in any::<u32>()) {
            let req = Request { flags, command, handle, offset, len };
            let parsed = parse_request(&req.encode());
            if command == Command::Write && len > MAX_PAYLOAD {
                prop_assert_eq!(parsed, Err(CodecError::PayloadTooLarge { len }));
            } else {
                prop_assert_eq!(parsed, Ok(req));
            }
        }

        #[test]
        fn simple_reply_round_trip(handle in any::<u64>(), error in any::<u32>()) {
            let wire = encode_simple_reply(handle, error);
            prop_assert_eq!(reply_magic(&wire), Ok(SIMPLE_REPLY_MAGIC));
            prop_assert_eq!(parse_simple_reply(&wire), Ok((handle, error)));
        }

        #[test]
        fn chunk_round_trip(handle in any::<u64>(), done in any::<bool>(), chunk in chunk()) {
            let wire = encode_chunk(handle, done, &chunk).expect("encodable");
            let header = parse_chunk_header(&wire, u32::MAX).expect("header");
            prop_assert_eq!(header.handle, handle);
            prop_assert_eq!(header.kind, chunk.kind());
            prop_assert_eq!(header.done(), done || chunk == Chunk::None);
            prop_assert_eq!(header.len as usize, wire.len() - CHUNK_HEADER_LEN);
            let parsed = parse_chunk(header.kind, &wire[CHUNK_HEADER_LEN..]).expect("chunk");
            prop_assert_eq!(parsed, chunk);
        }

        #[test]
        fn greeting_and_flags_round_trip(flags in any::<u16>(), fixed in any::<bool>(), nz in any::<bool>()) {
            prop_assert_eq!(parse_greeting(&encode_greeting(flags)), Ok(flags));
            let cf = ClientFlags { fixed_newstyle: fixed, no_zeroes: nz };
            prop_assert_eq!(parse_client_flags(&cf.encode()), Ok(cf));
        }

        #[test]
        fn export_name_reply_round_trip(size in any::<u64>(), flags in any::<u16>(), nz in any::<bool>()) {
            let wire = encode_export_name_reply(size, flags, nz);
            prop_assert_eq!(wire.len(), if nz { 10 } else { EXPORT_NAME_REPLY_LEN });
            prop_assert_eq!(parse_export_name_reply(&wire), Ok((size, flags)));
        }

        // ---- never panics on arbitrary bytes ----

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                               code in any::<u32>(), kind in any::<u16>()) {
            let _ = parse_greeting(&bytes);
            let _ = parse_client_flags(&bytes);
            let _ = parse_option_header(&bytes);
            let _ = parse_option(code, &bytes);
            let _ = parse_option(code % 16, &bytes);
            let _ = parse_option_reply_header(&bytes);
            let _ = parse_option_reply(code, &bytes);
            let _ = parse_option_reply(code % 8, &bytes);
            let _ = parse_export_name_reply(&bytes);
            let _ = parse_request(&bytes);
            let _ = reply_magic(&bytes);
            let _ = parse_simple_reply(&bytes);
            let _ = parse_chunk_header(&bytes, MAX_PAYLOAD);
            let _ = parse_chunk(kind, &bytes);
            let _ = parse_chunk(kind % 8, &bytes);
            let _ = parse_chunk(REPLY_TYPE_FLAG_ERROR | (kind % 4), &bytes);
        }

        #[test]
        fn option_parsers_never_panic_on_framed_data(
            option in prop_oneof![Just(OPT_INFO), Just(OPT_GO), Just(OPT_LIST_META_CONTEXT),
                                  Just(OPT_SET_META_CONTEXT), Just(OPT_EXPORT_NAME)],
            prefix_len in any::<u32>(), count in any::<u32>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Plausible framing with hostile lengths, to reach past the first length check.
            let mut data = prefix_len.to_be_bytes().to_vec();
            data.extend_from_slice(&count.to_be_bytes());
            data.extend_from_slice(&tail);
            let _ = parse_option(option, &data);
            let mut data = 0u32.to_be_bytes().to_vec();
            data.extend_from_slice(&count.to_be_bytes());
            data.extend_from_slice(&tail);
            let _ = parse_option(option, &data);
        }

        #[test]
        fn valid_request_prefix_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut wire = REQUEST_MAGIC.to_be_bytes().to_vec();
            wire.extend_from_slice(&bytes);
            let _ = parse_request(&wire);
        }
    }

    #[test]
    fn known_wire_values() {
        // Spot checks against proto.md's literal numbers.
        assert_eq!(&encode_greeting(3)[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REPLY_TYPE_ERROR, 0x8001);
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0x0102_0304_0506_0708,
            offset: 512,
            len: 4096,
        };
        let wire = req.encode();
        assert_eq!(&wire[..8], &[0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1]);
        assert_eq!(&wire[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn option_syntax_errors() {
        assert!(matches!(
            parse_option(OPT_LIST, b"x"),
            Err(CodecError::Malformed { .. })
        ));
        assert_eq!(parse_option(OPT_ABORT, b"ignored"), Ok(ClientOption::Abort));
        // GO whose name length runs past the data.
        let mut data = 10u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc\0\0");
        assert!(parse_option(OPT_GO, &data).is_err());
        // GO with a trailing odd byte.
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&[0, 1, 0, 3, 9]);
        assert!(parse_option(OPT_GO, &data).is_err());
        // Export names with NUL or bad UTF-8.
        assert!(parse_option(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert!(parse_option(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
        // Too many queries.
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&(MAX_META_QUERIES + 1).to_be_bytes());
        assert!(parse_option(OPT_SET_META_CONTEXT, &data).is_err());
        // An option header announcing too much data.
        let wire = encode_option(OPT_GO, &vec![0; MAX_OPTION_LEN as usize + 1]);
        assert!(matches!(
            parse_option_header(&wire),
            Err(CodecError::OptionTooLong { .. })
        ));
    }

    #[test]
    fn chunk_constraints() {
        assert!(
            encode_chunk(
                1,
                true,
                &Chunk::OffsetData {
                    offset: 0,
                    data: vec![]
                }
            )
            .is_err()
        );
        assert!(encode_chunk(1, true, &Chunk::OffsetHole { offset: 0, len: 0 }).is_err());
        assert!(
            encode_chunk(
                1,
                true,
                &Chunk::BlockStatus {
                    context: 1,
                    extents: vec![]
                }
            )
            .is_err()
        );
        assert!(
            encode_chunk(
                1,
                true,
                &Chunk::Error {
                    error: 0,
                    message: String::new()
                }
            )
            .is_err()
        );
        let long = "é".repeat(3000);
        let wire = encode_chunk(
            7,
            true,
            &Chunk::Error {
                error: EIO,
                message: long,
            },
        )
        .expect("encodable");
        let header = parse_chunk_header(&wire, u32::MAX).expect("header");
        match parse_chunk(header.kind, &wire[CHUNK_HEADER_LEN..]).expect("chunk") {
            Chunk::Error { message, .. } => assert!(message.len() <= MAX_STRING_LEN),
            other => panic!("unexpected chunk {other:?}"),
        }
        assert!(encode_offset_data_header(1, true, 0, u32::MAX as usize).is_err());
    }
}
