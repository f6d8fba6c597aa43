#!/usr/bin/python3
"""
Edge cases of the NBD protocol for the differential conformance test
(src/nbd/conformance.test.ts). The same cases run against Lifeline and against
nbdkit's file plugin; each prints one JSON line {"case": NAME, "outcome": TEXT}
and the TypeScript side compares the two servers' outcomes.

Cases speak either through libnbd (the `nbd` module, strict mode off) or
through a raw socket, for what libnbd cannot send (bad magic, unknown flags,
malformed option lengths, truncated requests, vanishing clients).

Usage: conformance_cases.py --rw SOCKET --ro SOCKET --layout JSON [--case NAME ...]
  --rw     Unix socket serving the writable export (default export 'disk')
  --ro     Unix socket serving the read-only export 'ro'
  --layout JSON with sizeBytes, dataOffset, dataBytes, holeOffset, holeBytes,
           mixOffset, mixDataBytes, scratchOffset (see conformance.test.ts)
"""
import argparse
import errno
import json
import socket
import struct
import sys
import time
import traceback

import nbd

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_UNKNOWN = 0x4C4C  # no NBD option has this number

REP_NAMES = {
    1: 'ACK', 2: 'SERVER', 3: 'INFO', 4: 'META_CONTEXT',
    0x80000001: 'ERR_UNSUP', 0x80000002: 'ERR_POLICY', 0x80000003: 'ERR_INVALID',
    0x80000004: 'ERR_PLATFORM', 0x80000005: 'ERR_TLS_REQD', 0x80000006: 'ERR_UNKNOWN',
    0x80000007: 'ERR_SHUTDOWN', 0x80000008: 'ERR_BLOCK_SIZE_REQD', 0x80000009: 'ERR_TOO_BIG',
}
REP_ACK = 1
REP_ERROR_BIT = 0x80000000

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_UNKNOWN = 42

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_UNKNOWN = 1 << 9  # undefined in every version of the protocol

REPLY_FLAG_DONE = 1
CHUNK_NAMES = {0: 'NONE', 1: 'DATA', 2: 'HOLE', 5: 'BS', 0x8001: 'ERROR', 0x8002: 'ERROR_OFFSET'}

NBD_ERRORS = {0: 'ok', 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC',
              75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN'}

EXPORT = b'disk'
EXPORT_RO = b'ro'
MIB = 1 << 20
# Longer than any string the protocol allows (4096 bytes).
NAME_TOO_LONG = b'n' * 5000
# Larger than the 32 MiB maximum payload Lifeline advertises and any client may assume.
OVERSIZED = 32 * MIB + 4096
# Seconds a socket operation may take; a server answers locally in milliseconds.
IO_TIMEOUT = 10
# How long a client that sent half a request waits to see that the server keeps waiting.
PARTIAL_WAIT = 0.3


class Closed(Exception):
    """The server closed the connection."""


def error_name(code):
    return NBD_ERRORS.get(code, 'E%d' % code)


class Raw:
    """A minimal NBD client over a Unix socket that sends exactly what it is told."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(path)
        self.cookie = 0x1000

    def close(self):
        self.sock.close()

    def recv_exact(self, count):
        parts = []
        left = count
        while left > 0:
            try:
                data = self.sock.recv(min(left, 4 * MIB))
            except (ConnectionResetError, BrokenPipeError):
                raise Closed()
            if not data:
                raise Closed()
            parts.append(data)
            left -= len(data)
        return b''.join(parts)

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError):
            raise Closed()

    def closed_by_server(self, wait=IO_TIMEOUT):
        """True when the server closes the connection within `wait` seconds
        (any bytes it sends first are discarded)."""
        self.sock.settimeout(wait)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(IO_TIMEOUT)

    # ------------------------------------------------------------ handshake

    def greet(self, client_flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        magic, opt_magic, flags = struct.unpack('>QQH', self.recv_exact(18))
        assert magic == NBDMAGIC and opt_magic == IHAVEOPT, 'bad greeting'
        self.send(struct.pack('>I', client_flags))
        return flags

    def option(self, option, data=b'', magic=IHAVEOPT, length=None):
        self.send(struct.pack('>QII', magic, option, len(data) if length is None else length) + data)

    def reply(self):
        magic, option, rtype, length = struct.unpack('>QIII', self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, 'bad option reply magic %x' % magic
        return option, rtype, self.recv_exact(length)

    def replies(self, option):
        """Option replies up to the final one (ACK or an error)."""
        out = []
        while True:
            got, rtype, data = self.reply()
            assert got == option, 'reply for option %d, expected %d' % (got, option)
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & REP_ERROR_BIT:
                return out

    def ask(self, option, data=b'', **kwargs):
        self.option(option, data, **kwargs)
        return self.replies(option)

    def structured(self):
        replies = self.ask(OPT_STRUCTURED_REPLY)
        assert replies[-1][0] == REP_ACK, 'structured replies refused'

    def set_meta(self, name=EXPORT, queries=(b'base:allocation',)):
        return self.ask(OPT_SET_META_CONTEXT, meta_payload(name, queries))

    def go(self, name=EXPORT, infos=()):
        replies = self.ask(OPT_GO, info_payload(name, infos))
        assert replies[-1][0] == REP_ACK, 'GO refused: %s' % names_of(replies)
        for rtype, data in replies:
            if rtype == 3 and struct.unpack('>H', data[:2])[0] == INFO_EXPORT:
                return struct.unpack('>QH', data[2:12])
        raise AssertionError('GO without INFO_EXPORT')

    def probe_negotiation(self):
        """'continues' when the server still answers options after the case."""
        try:
            replies = self.ask(OPT_INFO, info_payload(EXPORT, ()))
        except Closed:
            return 'closed'
        return 'continues' if replies[-1][0] == REP_ACK else 'probe ' + names_of(replies)

    # --------------------------------------------------------- transmission

    def request(self, cmd, offset=0, length=0, flags=0, payload=b'', cookie=None, magic=REQUEST_MAGIC):
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        header = struct.pack('>IHHQQI', magic, flags, cmd, cookie, offset % (1 << 64), length)
        self.send(header + payload)
        return cookie

    def answer(self, cookie, read_bytes=0, structured=False):
        """Reads one complete reply. Returns (kind, error, chunks, data): kind is
        'simple' or 'structured'; chunks lists (type, offset, length) of each
        structured chunk; data is the payload of a successful simple read."""
        magic = struct.unpack('>I', self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, got = struct.unpack('>IQ', self.recv_exact(12))
            assert got == cookie, 'simple reply cookie %x, expected %x' % (got, cookie)
            data = self.recv_exact(read_bytes) if error == 0 and read_bytes and not structured else b''
            return 'simple', error, [], data
        assert magic == STRUCTURED_REPLY_MAGIC, 'bad reply magic %x' % magic
        chunks = []
        error = 0
        while True:
            flags, ctype, got, length = struct.unpack('>HHQI', self.recv_exact(16))
            assert got == cookie, 'chunk cookie %x, expected %x' % (got, cookie)
            payload = self.recv_exact(length)
            if ctype == 1:
                chunks.append(('DATA', struct.unpack('>Q', payload[:8])[0], length - 8))
            elif ctype == 2:
                chunks.append(('HOLE',) + struct.unpack('>QI', payload))
            elif ctype == 5:
                ids = struct.unpack('>I', payload[:4])[0]
                extents = [struct.unpack('>II', payload[i:i + 8]) for i in range(4, length, 8)]
                chunks.append(('BS', ids, extents))
            elif ctype & 0x8000:
                error = struct.unpack('>I', payload[:4])[0]
                chunks.append((CHUNK_NAMES.get(ctype, 'ERR?'), error))
            else:
                chunks.append((CHUNK_NAMES.get(ctype, 'T%d' % ctype),))
            if flags & REPLY_FLAG_DONE:
                return 'structured', error, chunks, b''
            magic = struct.unpack('>I', self.recv_exact(4))[0]
            assert magic == STRUCTURED_REPLY_MAGIC, 'bad chunk magic %x' % magic

    def probe_transmission(self, structured=False):
        """'alive' when a small read still succeeds after the case."""
        try:
            cookie = self.request(CMD_READ, 0, 512)
            kind, error, _, _ = self.answer(cookie, 512, structured)
        except Closed:
            return 'closed'
        return 'alive' if error == 0 else 'probe ' + error_name(error)


def info_payload(name, infos):
    return struct.pack('>I', len(name)) + name + struct.pack('>H', len(infos)) + b''.join(struct.pack('>H', i) for i in infos)


def meta_payload(name, queries):
    body = struct.pack('>I', len(name)) + name + struct.pack('>I', len(queries))
    for query in queries:
        body += struct.pack('>I', len(query)) + query
    return body


def names_of(replies):
    return ' '.join(REP_NAMES.get(rtype, 'REP_%x' % rtype) for rtype, _ in replies)


def meta_names(replies):
    """'META_CONTEXT(base:allocation) ACK' with the context names spelled out."""
    out = []
    for rtype, data in replies:
        if rtype == 4:
            out.append('META_CONTEXT(%s)' % data[4:].decode())
        else:
            out.append(REP_NAMES.get(rtype, 'REP_%x' % rtype))
    return ' '.join(out)


def describe(answer):
    """A reply as text: 'EINVAL' or 'ok' for simple replies, chunk names for structured ones."""
    kind, error, chunks, _ = answer
    if kind == 'simple':
        return error_name(error)
    parts = []
    for chunk in chunks:
        if chunk[0] in ('ERROR', 'ERROR_OFFSET'):
            parts.append('%s(%s)' % (chunk[0], error_name(chunk[1])))
        else:
            parts.append(chunk[0])
    return 'chunks ' + ','.join(parts)


# ------------------------------------------------------------------ cases

CASES = []


def case(function):
    CASES.append(function)
    return function


class Context:
    def __init__(self, args):
        self.rw = args.rw
        self.ro = args.ro
        layout = json.loads(args.layout)
        self.size = layout['sizeBytes']
        self.data_offset = layout['dataOffset']
        self.data_bytes = layout['dataBytes']
        self.hole_offset = layout['holeOffset']
        self.hole_bytes = layout['holeBytes']
        self.mix_offset = layout['mixOffset']
        self.mix_data_bytes = layout['mixDataBytes']
        self.scratch = layout['scratchOffset']
        self.scratch_used = 0

    def scratch_area(self, length):
        """A region no other case touches, so the cases can run in any order."""
        offset = self.scratch + self.scratch_used
        self.scratch_used += (length + MIB - 1) // MIB * MIB
        return offset

    def raw(self, path=None):
        return Raw(path or self.rw)

    def raw_go(self, structured=False, meta=False, name=EXPORT, path=None):
        raw = Raw(path or self.rw)
        raw.greet()
        if structured:
            raw.structured()
        if meta:
            replies = raw.set_meta(name)
            assert replies[-1][0] == REP_ACK, 'SET_META_CONTEXT refused'
        raw.go(name)
        return raw

    def libnbd(self, structured=True, meta=True, name=EXPORT, path=None, opt_mode=False):
        h = nbd.NBD()
        h.set_strict_mode(0)
        h.set_request_structured_replies(structured)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_export_name(name.decode())
        h.set_opt_mode(opt_mode)
        h.connect_unix(path or self.rw)
        return h


def lib_outcome(action):
    """Runs one libnbd call: 'ok' or the errno name it failed with."""
    try:
        action()
        return 'ok'
    except nbd.Error as error:
        return errno.errorcode.get(error.errno, str(error.errno)) if error.errno else 'error: ' + error.string


def lib_alive(h):
    try:
        h.pread(512, 0)
        return 'alive'
    except nbd.Error:
        return 'closed'


def tx(ctx, cmd, offset=0, length=0, flags=0, payload=b'', structured=False, meta=False, path=None, name=EXPORT):
    """Sends one request on a fresh connection: 'reply; alive|closed'."""
    raw = ctx.raw_go(structured, meta, name, path)
    try:
        cookie = raw.request(cmd, offset, length, flags, payload)
        try:
            text = describe(raw.answer(cookie, length if cmd == CMD_READ else 0, structured))
        except Closed:
            return 'closed'
        return '%s; %s' % (text, raw.probe_transmission(structured))
    finally:
        raw.close()


# --- handshake: client flags and option framing

@case
def hs_greeting_flags(ctx):
    raw = ctx.raw()
    flags = raw.greet()
    raw.close()
    return 'handshake flags %d' % flags


@case
def hs_client_flags_unknown(ctx):
    # "the server MUST drop the TCP connection if the client sets an unknown flag"
    raw = ctx.raw()
    raw.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | 1 << 5)
    closed = raw.closed_by_server()
    raw.close()
    return 'closed' if closed else 'open'


@case
def hs_client_flags_not_fixed(ctx):
    # Client flags 0 (no NBD_FLAG_C_FIXED_NEWSTYLE), then the only non-fixed option, EXPORT_NAME.
    raw = ctx.raw()
    raw.greet(0)
    try:
        raw.option(OPT_EXPORT_NAME, EXPORT)
        size, flags = struct.unpack('>QH', raw.recv_exact(10))
        raw.recv_exact(124)
    except Closed:
        return 'closed'
    text = 'served size %d; %s' % (size, raw.probe_transmission())
    raw.close()
    return text


@case
def hs_bad_option_magic(ctx):
    raw = ctx.raw()
    raw.greet()
    raw.option(OPT_LIST, magic=0x1122334455667788)
    closed = raw.closed_by_server()
    raw.close()
    return 'closed' if closed else 'open'


@case
def hs_unknown_option(ctx):
    # Baseline: "Servers that receive messages which they do not implement MUST reply
    # to them with NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next message".
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_UNKNOWN, b'ignored payload')
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_unknown_option_large(ctx):
    # An unknown option with 100 KiB of data: the length lets the server skip it.
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_UNKNOWN, b'x' * (100 * 1024))
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_option_length_short(ctx):
    # INFO whose header length ends inside the name (name length says 100, 4 bytes follow).
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_INFO, struct.pack('>I', 100) + b'disk')
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_info_request_count_mismatch(ctx):
    # INFO claiming 3 information requests but carrying one.
    raw = ctx.raw()
    raw.greet()
    data = struct.pack('>I', len(EXPORT)) + EXPORT + struct.pack('>HH', 3, INFO_NAME)
    replies = raw.ask(OPT_INFO, data)
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


# --- handshake: LIST, ABORT, EXPORT_NAME

@case
def hs_list(ctx):
    h = ctx.libnbd(opt_mode=True)
    names = []
    h.opt_list(lambda name, description: names.append(name))
    h.opt_abort()
    return 'lists disk' if 'disk' in names else 'lists %r' % names


@case
def hs_list_with_data(ctx):
    # "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_LIST, b'data')
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_abort(ctx):
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_ABORT)
    closed = raw.closed_by_server()
    raw.close()
    return '%s; %s' % (names_of(replies), 'closed' if closed else 'open')


@case
def hs_abort_with_data(ctx):
    # "The server MUST reply with NBD_REP_ACK ... a server SHOULD ignore any data
    # sent by the client rather than rejecting the request as invalid."
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_ABORT, b'bye')
    closed = raw.closed_by_server()
    raw.close()
    return '%s; %s' % (names_of(replies), 'closed' if closed else 'open')


@case
def hs_export_name_unknown(ctx):
    # "If the chosen export does not exist ... the server MUST terminate the session."
    raw = ctx.raw()
    raw.greet()
    raw.option(OPT_EXPORT_NAME, b'no-such-export')
    closed = raw.closed_by_server()
    raw.close()
    return 'closed' if closed else 'open'


@case
def hs_export_name_too_long(ctx):
    raw = ctx.raw()
    raw.greet()
    raw.option(OPT_EXPORT_NAME, NAME_TOO_LONG)
    closed = raw.closed_by_server()
    raw.close()
    return 'closed' if closed else 'open'


@case
def hs_export_name_zeroes(ctx):
    # Without NBD_FLAG_C_NO_ZEROES the reply carries 124 zero bytes after size and flags.
    raw = ctx.raw()
    raw.greet(FLAG_C_FIXED_NEWSTYLE)
    raw.option(OPT_EXPORT_NAME, EXPORT)
    size, flags = struct.unpack('>QH', raw.recv_exact(10))
    zeroes = raw.recv_exact(124)
    cookie = raw.request(CMD_READ, 0, 512)
    kind, error, _, _ = raw.answer(cookie, 512)
    raw.close()
    return 'size %d, 124 zero bytes %s, read %s' % (size, zeroes == bytes(124), error_name(error))


@case
def hs_export_name_no_zeroes(ctx):
    raw = ctx.raw()
    raw.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    raw.option(OPT_EXPORT_NAME, EXPORT)
    size, flags = struct.unpack('>QH', raw.recv_exact(10))
    # The next bytes must already be the reply to this read.
    cookie = raw.request(CMD_READ, 0, 512)
    kind, error, _, _ = raw.answer(cookie, 512)
    raw.close()
    return 'size %d, read %s' % (size, error_name(error))


# --- handshake: INFO and GO

@case
def hs_info_unknown_export(ctx):
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_INFO, info_payload(b'no-such-export', ()))
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_go_unknown_export(ctx):
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_GO, info_payload(b'no-such-export', ()))
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_info_name_too_long(ctx):
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_INFO, info_payload(NAME_TOO_LONG, ()))
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_info_export(ctx):
    # INFO_EXPORT is mandatory; its size and the flags both servers must agree on.
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_INFO, info_payload(EXPORT, ()))
    raw.close()
    assert replies[-1][0] == REP_ACK, names_of(replies)
    for rtype, data in replies:
        if rtype == 3 and struct.unpack('>H', data[:2])[0] == INFO_EXPORT:
            size, flags = struct.unpack('>QH', data[2:12])
            # Flags both advertise for a writable file (HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES).
            common = flags & (1 | 4 | 8 | 32 | 64)
            read_only = bool(flags & 2)
            df = bool(flags & 128)
            return 'size %d, flags %#x, read-only %s, DF %s' % (size, common, read_only, df)
    return 'no INFO_EXPORT'


@case
def hs_info_name_description(ctx):
    h = ctx.libnbd(opt_mode=True)
    h.set_full_info(True)
    h.set_export_name('')
    h.opt_info()
    name = h.get_canonical_export_name()
    description = h.get_export_description()
    h.opt_abort()
    return 'name %s, description %s' % (name, description)


@case
def hs_info_block_size(ctx):
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_INFO, info_payload(EXPORT, (INFO_BLOCK_SIZE,)))
    raw.close()
    for rtype, data in replies:
        if rtype == 3 and struct.unpack('>H', data[:2])[0] == INFO_BLOCK_SIZE:
            minimum, preferred, maximum = struct.unpack('>III', data[2:14])
            return 'block size %d/%d/%d; %s' % (minimum, preferred, maximum, names_of(replies[-1:]))
    return 'no block size; %s' % names_of(replies[-1:])


@case
def hs_info_unknown_request(ctx):
    # "The server MUST ignore any information requests it does not understand."
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_INFO, info_payload(EXPORT, (0x7777,)))
    raw.close()
    kinds = sorted({struct.unpack('>H', data[:2])[0] for rtype, data in replies if rtype == 3})
    return 'info types include export %s; %s' % (INFO_EXPORT in kinds and 0x7777 not in kinds, names_of(replies[-1:]))


@case
def hs_info_then_go(ctx):
    # Same parameters, no option in between: "the server MUST reply with the same set of information".
    raw = ctx.raw()
    raw.greet()
    info = raw.ask(OPT_INFO, info_payload(EXPORT, (INFO_NAME,)))
    go = raw.ask(OPT_GO, info_payload(EXPORT, (INFO_NAME,)))
    same = sorted(data for rtype, data in info if rtype == 3) == sorted(data for rtype, data in go if rtype == 3)
    text = 'same info %s; GO %s; %s' % (same, names_of(go[-1:]), raw.probe_transmission())
    raw.close()
    return text


# --- handshake: STRUCTURED_REPLY, STARTTLS

@case
def hs_structured_reply_with_data(ctx):
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_STRUCTURED_REPLY, b'data')
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_structured_reply_twice(ctx):
    # "The client SHOULD NOT send such messages more than once; if it does, the
    # server MAY fail the repeated message with NBD_REP_ERR_INVALID."
    raw = ctx.raw()
    raw.greet()
    first = raw.ask(OPT_STRUCTURED_REPLY)
    second = raw.ask(OPT_STRUCTURED_REPLY)
    text = '%s, %s; %s' % (names_of(first), names_of(second), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_starttls_without_tls(ctx):
    # NOTLS mode: "it MUST respond with NBD_REP_ERR_POLICY ... NBD_REP_ERR_UNSUP ..."
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_STARTTLS)
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_starttls_with_data(ctx):
    raw = ctx.raw()
    raw.greet()
    replies = raw.ask(OPT_STARTTLS, b'data')
    text = '%s; %s' % (names_of(replies), raw.probe_negotiation())
    raw.close()
    return text


# --- handshake: metadata contexts

def meta_case(ctx, option, queries, name=EXPORT, structured=True, payload=None):
    raw = ctx.raw()
    raw.greet()
    if structured:
        raw.structured()
    replies = raw.ask(option, meta_payload(name, queries) if payload is None else payload)
    text = '%s; %s' % (meta_names(replies), raw.probe_negotiation())
    raw.close()
    return text


@case
def hs_list_meta_before_structured(ctx):
    # "This option SHOULD NOT be requested unless structured replies have been
    # negotiated first. If a client attempts to do so, a server MAY send NBD_REP_ERR_INVALID."
    return meta_case(ctx, OPT_LIST_META_CONTEXT, [b'base:allocation'], structured=False)


@case
def hs_set_meta_before_structured(ctx):
    # "If a client attempts to do so, a server SHOULD send NBD_REP_ERR_INVALID."
    return meta_case(ctx, OPT_SET_META_CONTEXT, [b'base:allocation'], structured=False)


@case
def hs_list_meta_no_queries(ctx):
    return meta_case(ctx, OPT_LIST_META_CONTEXT, [])


@case
def hs_list_meta_base_wildcard(ctx):
    # "base:" "MUST support this as a wildcard during NBD_OPT_LIST_META_CONTEXT"
    return meta_case(ctx, OPT_LIST_META_CONTEXT, [b'base:'])


@case
def hs_list_meta_unknown_namespace(ctx):
    # "the server MUST ignore query strings belonging to an unknown namespace"
    return meta_case(ctx, OPT_LIST_META_CONTEXT, [b'x-lifeline-test:anything'])


@case
def hs_list_meta_libnbd(ctx):
    h = ctx.libnbd(opt_mode=True)
    found = []
    count = h.opt_list_meta_context(lambda name: found.append(name))
    h.opt_abort()
    return '%d: %s' % (count, ','.join(found))


@case
def hs_list_meta_unknown_export(ctx):
    return meta_case(ctx, OPT_LIST_META_CONTEXT, [b'base:allocation'], name=b'no-such-export')


@case
def hs_set_meta_base_allocation(ctx):
    return meta_case(ctx, OPT_SET_META_CONTEXT, [b'base:allocation'])


@case
def hs_set_meta_base_wildcard(ctx):
    # "base:" - "the server MUST ignore this form during NBD_OPT_SET_META_CONTEXT"
    return meta_case(ctx, OPT_SET_META_CONTEXT, [b'base:'])


@case
def hs_set_meta_no_queries(ctx):
    # "If zero queries are sent, the server MUST select no metadata contexts."
    return meta_case(ctx, OPT_SET_META_CONTEXT, [])


@case
def hs_set_meta_unknown_leaf(ctx):
    # "If a [leaf-name] requested by the client is not recognized, the server MUST ignore it"
    return meta_case(ctx, OPT_SET_META_CONTEXT, [b'base:no-such-leaf'])


@case
def hs_set_meta_empty_query(ctx):
    # A zero-length query has no namespace; the query "MUST start with a namespace and a colon".
    return meta_case(ctx, OPT_SET_META_CONTEXT, [b'', b'base:allocation'])


@case
def hs_set_meta_unknown_export(ctx):
    return meta_case(ctx, OPT_SET_META_CONTEXT, [b'base:allocation'], name=b'no-such-export')


@case
def hs_meta_query_overruns(ctx):
    # "If the option request is syntactically invalid (such as a query length that would
    # require reading beyond the original length given in the option header), the server
    # MUST fail the request with NBD_REP_ERR_INVALID."
    payload = struct.pack('>I', len(EXPORT)) + EXPORT + struct.pack('>II', 1, 200) + b'base:allocation'
    return meta_case(ctx, OPT_LIST_META_CONTEXT, None, payload=payload)


@case
def hs_meta_query_count_overruns(ctx):
    payload = struct.pack('>I', len(EXPORT)) + EXPORT + struct.pack('>I', 2) + struct.pack('>I', 15) + b'base:allocation'
    return meta_case(ctx, OPT_SET_META_CONTEXT, None, payload=payload)


@case
def hs_meta_truncated(ctx):
    # Export name length but no query count.
    payload = struct.pack('>I', len(EXPORT)) + EXPORT
    return meta_case(ctx, OPT_SET_META_CONTEXT, None, payload=payload)


@case
def hs_meta_name_too_long(ctx):
    return meta_case(ctx, OPT_LIST_META_CONTEXT, [b'base:allocation'], name=NAME_TOO_LONG)


@case
def hs_meta_query_too_long(ctx):
    return meta_case(ctx, OPT_LIST_META_CONTEXT, [b'base:' + b'a' * 5000])


# --- transmission: bounds

@case
def tx_read_past_end(ctx):
    return tx(ctx, CMD_READ, ctx.size, 512)


@case
def tx_read_straddles_end(ctx):
    return tx(ctx, CMD_READ, ctx.size - 512, 1024)


@case
def tx_read_past_end_structured(ctx):
    return tx(ctx, CMD_READ, ctx.size - 512, 1024, structured=True)


@case
def tx_write_past_end(ctx):
    # "The server SHOULD return NBD_ENOSPC if it receives a write request including
    # one or more sectors beyond the size of the device."
    return tx(ctx, CMD_WRITE, ctx.size - 512, 1024, payload=b'w' * 1024)


@case
def tx_trim_past_end(ctx):
    # "It SHOULD return NBD_EINVAL if it receives a read or trim request including one
    # or more sectors beyond the size of the device"
    return tx(ctx, CMD_TRIM, ctx.size - 512, 1024)


@case
def tx_zero_past_end(ctx):
    # "The server SHOULD return NBD_ENOSPC if it receives a write zeroes request
    # including one or more sectors beyond the size of the device."
    return tx(ctx, CMD_WRITE_ZEROES, ctx.size - 512, 1024)


@case
def tx_cache_past_end(ctx):
    return tx(ctx, CMD_CACHE, ctx.size - 512, 1024)


@case
def tx_block_status_past_end(ctx):
    # "The server SHOULD return NBD_EINVAL if it receives a NBD_CMD_BLOCK_STATUS request
    # including one or more sectors beyond the size of the device."
    return tx(ctx, CMD_BLOCK_STATUS, ctx.size, 512, structured=True, meta=True)


@case
def tx_read_offset_overflow(ctx):
    # offset + length wraps around 2^64.
    return tx(ctx, CMD_READ, (1 << 64) - 512, 1024)


@case
def tx_write_offset_overflow(ctx):
    return tx(ctx, CMD_WRITE, (1 << 64) - 512, 1024, payload=b'w' * 1024)


# --- transmission: zero-length requests ("the behavior of a server on such a request
# is unspecified although the server SHOULD NOT disconnect")

@case
def tx_read_zero_length(ctx):
    return tx(ctx, CMD_READ, 0, 0)


@case
def tx_write_zero_length(ctx):
    return tx(ctx, CMD_WRITE, ctx.scratch_area(0), 0)


@case
def tx_trim_zero_length(ctx):
    return tx(ctx, CMD_TRIM, ctx.scratch_area(0), 0)


@case
def tx_zero_zero_length(ctx):
    return tx(ctx, CMD_WRITE_ZEROES, ctx.scratch_area(0), 0)


@case
def tx_block_status_zero_length(ctx):
    return tx(ctx, CMD_BLOCK_STATUS, 0, 0, structured=True, meta=True)


# --- transmission: commands and flags

@case
def tx_unknown_command(ctx):
    # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
    return tx(ctx, CMD_UNKNOWN, 0, 512)


@case
def tx_unknown_flag(ctx):
    # "The server SHOULD return NBD_EINVAL if it receives an unknown command flag."
    return tx(ctx, CMD_READ, 0, 512, CMD_FLAG_UNKNOWN)


@case
def tx_no_hole_on_write(ctx):
    # NO_HOLE is documented for WRITE_ZEROES only: "SHOULD return NBD_EINVAL if it
    # receives a request with a flag not explicitly documented as applicable".
    return tx(ctx, CMD_WRITE, ctx.scratch_area(512), 512, CMD_FLAG_NO_HOLE, payload=b'n' * 512)


@case
def tx_fua_on_read(ctx):
    # "NBD_CMD_FLAG_FUA; This flag is valid for all commands, provided NBD_FLAG_SEND_FUA
    # has been negotiated, in which case the server MUST accept all commands with this bit set"
    return tx(ctx, CMD_READ, 0, 512, CMD_FLAG_FUA)


@case
def tx_fua_on_flush(ctx):
    return tx(ctx, CMD_FLUSH, 0, 0, CMD_FLAG_FUA)


@case
def tx_fua_on_cache(ctx):
    return tx(ctx, CMD_CACHE, 0, 4096, CMD_FLAG_FUA)


@case
def tx_fua_on_block_status(ctx):
    return tx(ctx, CMD_BLOCK_STATUS, 0, 4096, CMD_FLAG_FUA, structured=True, meta=True)


@case
def tx_df_without_structured(ctx):
    # NBD_FLAG_SEND_DF "MUST leave this flag clear if structured replies have not been
    # negotiated"; the client then may not send DF.
    return tx(ctx, CMD_READ, 0, 512, CMD_FLAG_DF)


@case
def tx_req_one_on_read(ctx):
    return tx(ctx, CMD_READ, 0, 512, CMD_FLAG_REQ_ONE, structured=True)


@case
def tx_flush_nonzero_offset(ctx):
    # "For a flush request, length and offset are reserved, and MUST be set to all-zero."
    return tx(ctx, CMD_FLUSH, 4096, 0)


@case
def tx_flush_nonzero_length(ctx):
    return tx(ctx, CMD_FLUSH, 0, 4096)


@case
def tx_block_status_without_structured(ctx):
    return tx(ctx, CMD_BLOCK_STATUS, 0, 4096)


@case
def tx_block_status_without_meta(ctx):
    # "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS
    # without selecting at least one metadata context."
    return tx(ctx, CMD_BLOCK_STATUS, 0, 4096, structured=True)


@case
def tx_block_status_meta_other_export(ctx):
    # The context was set for 'ro', but the client goes to 'disk'.
    raw = ctx.raw()
    raw.greet()
    raw.structured()
    raw.set_meta(EXPORT_RO)
    raw.go(EXPORT)
    cookie = raw.request(CMD_BLOCK_STATUS, 0, 4096)
    text = '%s; %s' % (describe(raw.answer(cookie, 0, True)), raw.probe_transmission(True))
    raw.close()
    return text


@case
def tx_block_status_req_one(ctx):
    h = ctx.libnbd()
    seen = []
    h.block_status(ctx.mix_offset + ctx.mix_data_bytes * 2, ctx.mix_offset,
                   lambda context, offset, entries, error: seen.append(list(entries)) or 0,
                   nbd.CMD_FLAG_REQ_ONE)
    h.shutdown()
    return 'extents %s' % seen


@case
def tx_block_status_layout(ctx):
    # Data, hole, data-then-hole: both servers read SEEK_DATA/SEEK_HOLE of identical files.
    h = ctx.libnbd()
    out = []
    for offset, length in ((ctx.data_offset, ctx.data_bytes), (ctx.hole_offset, ctx.hole_bytes),
                           (ctx.mix_offset, ctx.mix_data_bytes * 2)):
        seen = []
        h.block_status(length, offset, lambda context, o, entries, error: seen.extend(entries) or 0)
        # Only the part inside the request: the last extent may reach past it.
        covered, extents = 0, []
        for i in range(0, len(seen), 2):
            extents.append((min(seen[i], length - covered), seen[i + 1]))
            covered += seen[i]
            if covered >= length:
                break
        out.append(extents)
    h.shutdown()
    return 'extents %s' % out


@case
def tx_unknown_command_structured(ctx):
    return tx(ctx, CMD_UNKNOWN, 0, 512, structured=True)


@case
def tx_read_error_structured(ctx):
    # Even an early EINVAL on a read must come as a structured reply once negotiated:
    # "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early
    # NBD_EINVAL due to bad flags)".
    return tx(ctx, CMD_READ, 0, 512, CMD_FLAG_UNKNOWN, structured=True)


# --- transmission: read-only export

@case
def tx_write_read_only(ctx):
    # "If this flag is set, the server MUST error subsequent write operations";
    # "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export".
    return tx(ctx, CMD_WRITE, 0, 512, payload=b'r' * 512, path=ctx.ro, name=EXPORT_RO)


@case
def tx_trim_read_only(ctx):
    return tx(ctx, CMD_TRIM, 0, 512, path=ctx.ro, name=EXPORT_RO)


@case
def tx_zero_read_only(ctx):
    return tx(ctx, CMD_WRITE_ZEROES, 0, 512, path=ctx.ro, name=EXPORT_RO)


# --- transmission: payload sizes

@case
def tx_read_oversized(ctx):
    return tx(ctx, CMD_READ, 0, OVERSIZED)


@case
def tx_read_oversized_structured(ctx):
    return tx(ctx, CMD_READ, 0, OVERSIZED, structured=True)


@case
def tx_write_oversized(ctx):
    offset = ctx.scratch_area(OVERSIZED)
    return tx(ctx, CMD_WRITE, offset, OVERSIZED, payload=b'o' * OVERSIZED)


@case
def tx_zero_large(ctx):
    # No payload either way: "the client MAY request an effect length larger than the
    # maximum payload size; the server SHOULD NOT disconnect".
    return tx(ctx, CMD_WRITE_ZEROES, ctx.scratch_area(OVERSIZED), OVERSIZED)


# --- transmission: data paths

@case
def tx_write_fua_read_back(ctx):
    h = ctx.libnbd()
    offset = ctx.scratch_area(8192)
    data = bytes(range(256)) * 32
    result = lib_outcome(lambda: h.pwrite(data, offset, nbd.CMD_FLAG_FUA))
    same = h.pread(len(data), offset) == data
    h.shutdown()
    return 'write %s, reads back %s' % (result, same)


@case
def tx_zero_no_hole(ctx):
    h = ctx.libnbd()
    offset = ctx.scratch_area(65536)
    h.pwrite(b'\xaa' * 65536, offset)
    result = lib_outcome(lambda: h.zero(65536, offset, nbd.CMD_FLAG_NO_HOLE))
    zero = h.pread(65536, offset) == bytes(65536)
    # Whether block status then reports a hole depends on the filesystem and the page
    # cache (ext4 reports unwritten extents as holes unless cached), and the spec lets
    # a server "report a hole even where NBD_CMD_TRIM has not been requested"; only
    # that the query succeeds is compared.
    seen = []
    status = lib_outcome(lambda: h.block_status(65536, offset, lambda context, o, entries, error: seen.extend(entries) or 0))
    h.shutdown()
    return 'zero %s, reads zero %s, block status %s' % (result, zero, status)


@case
def tx_zero_may_trim(ctx):
    h = ctx.libnbd()
    offset = ctx.scratch_area(65536)
    h.pwrite(b'\xbb' * 65536, offset)
    result = lib_outcome(lambda: h.zero(65536, offset))
    zero = h.pread(65536, offset) == bytes(65536)
    h.shutdown()
    return 'zero %s, reads zero %s' % (result, zero)


@case
def tx_fast_zero(ctx):
    # FAST_ZERO on a server that advertises it: succeed quickly or fail with ENOTSUP;
    # on one that does not: "SHOULD fail with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set".
    h = ctx.libnbd()
    offset = ctx.scratch_area(65536)
    h.pwrite(b'\xcc' * 65536, offset)
    advertised = h.can_fast_zero()
    if not advertised:
        # Never send the flag unadvertised: nbdkit 1.32 aborts on an assertion
        # (backend_zero: can_fast_zero == 1) when a client does.
        h.shutdown()
        return 'not advertised'
    result = lib_outcome(lambda: h.zero(65536, offset, nbd.CMD_FLAG_FAST_ZERO))
    content = h.pread(65536, offset)
    state = 'zero' if content == bytes(65536) else 'unchanged' if content == b'\xcc' * 65536 else 'mixed'
    h.shutdown()
    return 'advertised, zero %s, content %s' % (result, state)


@case
def tx_trim(ctx):
    h = ctx.libnbd()
    offset = ctx.scratch_area(MIB)
    h.pwrite(b'\xdd' * MIB, offset)
    result = lib_outcome(lambda: h.trim(MIB, offset, nbd.CMD_FLAG_FUA))
    alive = lib_alive(h)
    h.shutdown()
    return 'trim %s; %s' % (result, alive)


@case
def tx_cache(ctx):
    h = ctx.libnbd()
    result = lib_outcome(lambda: h.cache(MIB, ctx.data_offset))
    h.shutdown()
    return 'cache %s' % result


@case
def tx_read_hole_structured(ctx):
    # A hole may come back as OFFSET_HOLE or as zero-filled OFFSET_DATA ("The server MAY
    # split the reply into any number of content chunks"); the bytes must be zero.
    return structured_read(ctx, ctx.hole_offset, 65536, 0)


@case
def tx_read_data_structured(ctx):
    return structured_read(ctx, ctx.data_offset, 65536, 0)


@case
def tx_read_mixed_structured(ctx):
    return structured_read(ctx, ctx.mix_offset, ctx.mix_data_bytes * 2, 0)


@case
def tx_read_mixed_df(ctx):
    # DF: "the server MUST send at most one content chunk ... If the area being read contains
    # both data and a hole, the server MUST use NBD_REPLY_TYPE_OFFSET_DATA with the zeroes".
    return structured_read(ctx, ctx.mix_offset, ctx.mix_data_bytes * 2, nbd.CMD_FLAG_DF)


def structured_read(ctx, offset, length, flags):
    h = ctx.libnbd()
    chunks = []

    def chunk(buf, chunk_offset, status, error):
        chunks.append(('DATA' if status == nbd.READ_DATA else 'HOLE' if status == nbd.READ_HOLE else 'ERROR',
                       chunk_offset - offset, len(buf)))
        return 0

    data = h.pread_structured(length, offset, chunk, flags)
    plain = h.pread(length, offset)
    h.shutdown()
    kinds = ','.join(sorted({kind for kind, _, _ in chunks}))
    covered = sum(size for _, _, size in chunks) == length
    return 'chunks %d (%s), covers %s, bytes match %s' % (len(chunks), kinds, covered, data == plain)


@case
def tx_cookie_echo(ctx):
    raw = ctx.raw_go()
    cookie = raw.request(CMD_READ, 0, 512, cookie=0xFFFFFFFFFFFFFFFE)
    kind, error, _, _ = raw.answer(cookie, 512)
    raw.close()
    return 'cookie echoed, %s' % error_name(error)


@case
def tx_pipelined(ctx):
    # Eight requests before reading any reply: every one answered, matched by cookie.
    raw = ctx.raw_go()
    offset = ctx.scratch_area(8 * 4096)
    cookies = {}
    for i in range(8):
        cookie = raw.request(CMD_WRITE, offset + i * 4096, 4096, payload=bytes([i]) * 4096)
        cookies[cookie] = 'write'
    cookies[raw.request(CMD_FLUSH)] = 'flush'
    errors = []
    for _ in range(len(cookies)):
        magic, error, cookie = struct.unpack('>IIQ', raw.recv_exact(16))
        errors.append(error)
        cookies.pop(cookie)
    raw.close()
    return 'answered %d, errors %d, unmatched %d' % (len(errors), sum(1 for e in errors if e), len(cookies))


@case
def tx_disc(ctx):
    # "There is no reply to an NBD_CMD_DISC"; the server closes the connection.
    raw = ctx.raw_go()
    raw.request(CMD_DISC)
    raw.sock.settimeout(IO_TIMEOUT)
    try:
        data = raw.sock.recv(16)
    except ConnectionResetError:
        data = b''
    raw.close()
    return 'closed without reply' if data == b'' else 'sent %d bytes' % len(data)


# --- transmission: misbehaving clients

@case
def tx_bad_request_magic(ctx):
    raw = ctx.raw_go()
    raw.request(CMD_READ, 0, 512, magic=0x12345678)
    closed = raw.closed_by_server()
    raw.close()
    return 'closed' if closed else 'open'


@case
def tx_request_in_pieces(ctx):
    # A request split across writes with a pause: the server waits for the rest.
    raw = ctx.raw_go()
    header = struct.pack('>IHHQQI', REQUEST_MAGIC, 0, CMD_READ, 77, 0, 512)
    raw.send(header[:10])
    closed = raw.closed_by_server(PARTIAL_WAIT)
    if closed:
        return 'closed'
    raw.send(header[10:])
    kind, error, _, _ = raw.answer(77, 512)
    raw.close()
    return 'waited, then %s' % error_name(error)


@case
def tx_client_vanishes_mid_header(ctx):
    raw = ctx.raw_go()
    raw.send(struct.pack('>IHHQ', REQUEST_MAGIC, 0, CMD_WRITE, 5))
    raw.close()
    return server_still_serving(ctx)


@case
def tx_client_vanishes_mid_payload(ctx):
    # Half a write payload, then the client is gone: nothing of it may reach the disk.
    offset = ctx.scratch_area(65536)
    h = ctx.libnbd()
    h.pwrite(b'\x11' * 65536, offset)
    h.shutdown()
    raw = ctx.raw_go()
    raw.send(struct.pack('>IHHQQI', REQUEST_MAGIC, 0, CMD_WRITE, 6, offset, 65536) + b'\x22' * 1000)
    raw.close()
    time.sleep(0.1)
    h = ctx.libnbd()
    unchanged = h.pread(65536, offset) == b'\x11' * 65536
    h.shutdown()
    return '%s, region unchanged %s' % (server_still_serving(ctx), unchanged)


def server_still_serving(ctx):
    try:
        h = ctx.libnbd()
        h.pread(512, 0)
        h.shutdown()
        return 'server still serving'
    except nbd.Error as error:
        return 'server down: ' + error.string


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--rw', required=True)
    parser.add_argument('--ro', required=True)
    parser.add_argument('--layout', required=True)
    parser.add_argument('--case', action='append', default=[])
    args = parser.parse_args()
    ctx = Context(args)
    for function in CASES:
        name = function.__name__
        if args.case and name not in args.case:
            continue
        started = time.monotonic()
        try:
            outcome = function(ctx)
        except Exception as error:  # a case that breaks still reports, so the table is complete
            outcome = 'driver error: %s: %s' % (type(error).__name__, error)
            traceback.print_exc(file=sys.stderr)
        print(json.dumps({'case': name, 'outcome': outcome, 'ms': round((time.monotonic() - started) * 1000)}), flush=True)


if __name__ == '__main__':
    main()
