/**
 * NBD wire constants and pure encoders, as `doc/proto.md` of the
 * NetworkBlockDevice project defines them. No sockets or files here.
 */

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;
export const CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// Options.
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
/** The options this server implements; any other gets NBD_REP_ERR_UNSUP. */
export const OPTIONS_KNOWN: ReadonlySet<number> = new Set([
  OPT_EXPORT_NAME,
  OPT_ABORT,
  OPT_LIST,
  OPT_STARTTLS,
  OPT_INFO,
  OPT_GO,
  OPT_STRUCTURED_REPLY,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
]);

// Option reply types.
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERROR_BIT = 0x80000000;
export const REP_ERR_UNSUP = REP_ERROR_BIT + 1;
export const REP_ERR_POLICY = REP_ERROR_BIT + 2;
export const REP_ERR_INVALID = REP_ERROR_BIT + 3;
export const REP_ERR_PLATFORM = REP_ERROR_BIT + 4;
export const REP_ERR_TLS_REQD = REP_ERROR_BIT + 5;
export const REP_ERR_UNKNOWN = REP_ERROR_BIT + 6;
export const REP_ERR_SHUTDOWN = REP_ERROR_BIT + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8;
export const REP_ERR_TOO_BIG = REP_ERROR_BIT + 9;

// Info types.
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// Transmission flags.
export const TFLAG_HAS_FLAGS = 1 << 0;
export const TFLAG_READ_ONLY = 1 << 1;
export const TFLAG_SEND_FLUSH = 1 << 2;
export const TFLAG_SEND_FUA = 1 << 3;
export const TFLAG_ROTATIONAL = 1 << 4;
export const TFLAG_SEND_TRIM = 1 << 5;
export const TFLAG_SEND_WRITE_ZEROES = 1 << 6;
export const TFLAG_SEND_DF = 1 << 7;
export const TFLAG_CAN_MULTI_CONN = 1 << 8;
export const TFLAG_SEND_CACHE = 1 << 10;
export const TFLAG_SEND_FAST_ZERO = 1 << 11;

// Command flags.
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

// Commands.
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

/**
 * The flags each command accepts; any other bit is refused with EINVAL. FUA is
 * on every command: with NBD_FLAG_SEND_FUA advertised the spec says the server
 * "MUST accept all commands with this bit set (even by ignoring the bit)".
 */
export const CMD_FLAGS_ALLOWED: Readonly<Record<number, number>> = {
  [CMD_READ]: CMD_FLAG_FUA | CMD_FLAG_DF,
  [CMD_WRITE]: CMD_FLAG_FUA,
  [CMD_DISC]: CMD_FLAG_FUA,
  [CMD_FLUSH]: CMD_FLAG_FUA,
  [CMD_TRIM]: CMD_FLAG_FUA,
  [CMD_CACHE]: CMD_FLAG_FUA,
  [CMD_WRITE_ZEROES]: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
  [CMD_BLOCK_STATUS]: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
};

// Structured reply chunk types and flags.
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = (1 << 15) + 1;
export const REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

// Error values on the wire.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// base:allocation flags.
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

export const META_CONTEXT_BASE_ALLOCATION = 'base:allocation';
/** The one metadata context this server offers; its id on the wire. */
export const META_CONTEXT_ID_BASE_ALLOCATION = 1;

export const REQUEST_HEADER_BYTES = 28;
export const OPTION_HEADER_BYTES = 16;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;

/** Maps a Node/libuv error code to the NBD error a client understands. */
export function nbdErrorFromSystem(error: unknown): number {
  const code = (error as { code?: string } | null)?.code;
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return NBD_EPERM;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'EINVAL':
      return NBD_EINVAL;
    case 'EOPNOTSUPP':
    case 'ENOTSUP':
      return NBD_ENOTSUP;
    default:
      return NBD_EIO;
  }
}

export function optionReply(option: number, replyType: number, payload?: Buffer): Buffer {
  const length = payload ? payload.length : 0;
  const out = Buffer.allocUnsafe(20 + length);
  out.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(replyType >>> 0, 12);
  out.writeUInt32BE(length, 16);
  if (payload) payload.copy(out, 20);
  return out;
}

export function simpleReplyHeader(error: number, cookie: Buffer): Buffer {
  const out = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
  out.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(error, 4);
  cookie.copy(out, 8, 0, 8);
  return out;
}

export function structuredReplyHeader(
  flags: number,
  type: number,
  cookie: Buffer,
  length: number,
  extraBytes = 0,
): Buffer {
  const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + extraBytes);
  out.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  cookie.copy(out, 8, 0, 8);
  out.writeUInt32BE(length, 16);
  return out;
}

export function structuredError(cookie: Buffer, error: number, message: string): Buffer {
  const text = Buffer.from(message.slice(0, 512), 'utf8');
  const out = structuredReplyHeader(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + text.length, 6 + text.length);
  out.writeUInt32BE(error, 20);
  out.writeUInt16BE(text.length, 24);
  text.copy(out, 26);
  return out;
}

export function infoExport(size: bigint, transmissionFlags: number): Buffer {
  const out = Buffer.allocUnsafe(12);
  out.writeUInt16BE(INFO_EXPORT, 0);
  out.writeBigUInt64BE(size, 2);
  out.writeUInt16BE(transmissionFlags, 10);
  return out;
}

export function infoText(type: number, text: string): Buffer {
  const body = Buffer.from(text, 'utf8');
  const out = Buffer.allocUnsafe(2 + body.length);
  out.writeUInt16BE(type, 0);
  body.copy(out, 2);
  return out;
}

export function infoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const out = Buffer.allocUnsafe(14);
  out.writeUInt16BE(INFO_BLOCK_SIZE, 0);
  out.writeUInt32BE(minimum, 2);
  out.writeUInt32BE(preferred, 6);
  out.writeUInt32BE(maximum, 10);
  return out;
}

export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [CMD_READ]: 'read',
  [CMD_WRITE]: 'write',
  [CMD_DISC]: 'disc',
  [CMD_FLUSH]: 'flush',
  [CMD_TRIM]: 'trim',
  [CMD_CACHE]: 'cache',
  [CMD_WRITE_ZEROES]: 'write_zeroes',
  [CMD_BLOCK_STATUS]: 'block_status',
};
