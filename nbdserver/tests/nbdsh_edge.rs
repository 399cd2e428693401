//! Protocol edge cases driven from Python: libnbd's bindings (python3-libnbd,
//! the module behind nbdsh) and raw sockets for things libnbd will not send.

mod common;

use std::io;
use std::sync::Arc;

use chainvault_nbd::{BlockExport, Capabilities, MemExport};
use common::*;

const MIB: u64 = 1024 * 1024;

/// Handshake details over a raw socket: unknown options, option limits,
/// LIST, meta contexts, INFO and ABORT.
const RAW_HANDSHAKE: &str = r#"
import socket, struct, sys
path = sys.argv[1]
IHAVEOPT = 0x49484156454F5054
ERR = 0x80000000

def connect():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s

def recvn(s, n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("server closed after %d of %d bytes" % (len(b), n))
        b += c
    return b

def send_opt(s, code, data=b''):
    s.sendall(struct.pack('>QII', IHAVEOPT, code, len(data)) + data)

def reply(s, expect):
    m, o, t, l = struct.unpack('>QIII', recvn(s, 20))
    assert m == 0x3e889045565a9, hex(m)
    assert o == expect, (o, expect)
    return t, recvn(s, l)

def string(x):
    x = x.encode()
    return struct.pack('>I', len(x)) + x

s = connect()
magic, opt, flags = struct.unpack('>QQH', recvn(s, 18))
assert magic == 0x4e42444d41474943, hex(magic)
assert opt == IHAVEOPT
assert flags == 3, flags   # FIXED_NEWSTYLE | NO_ZEROES
s.sendall(struct.pack('>I', 3))

# Unknown option codes, with and without data: ERR_UNSUP, and we go on.
for code, data in [(0x1234, b'hello'), (0x7fffffff, b''), (4, b'')]:
    send_opt(s, code, data)
    t, d = reply(s, code)
    assert t == ERR + 1, hex(t)
# STARTTLS is not supported.
send_opt(s, 5)
t, d = reply(s, 5)
assert t == ERR + 1, hex(t)
# An option payload beyond the 64 KiB limit is skipped and refused.
send_opt(s, 3, b'x' * (100 * 1024))
t, d = reply(s, 3)
assert t == ERR + 9, hex(t)
# LIST with data is invalid.
send_opt(s, 3, b'x')
t, d = reply(s, 3)
assert t == ERR + 3, hex(t)
# LIST.
send_opt(s, 3)
names = []
while True:
    t, d = reply(s, 3)
    if t == 1:
        break
    assert t == 2, hex(t)
    n = struct.unpack('>I', d[:4])[0]
    names.append((d[4:4 + n].decode(), d[4 + n:].decode()))
assert names == [('disk', 'edge disk')], names
# Meta contexts need structured replies first.
q = string('disk') + struct.pack('>I', 1) + string('base:allocation')
send_opt(s, 10, q)
t, d = reply(s, 10)
assert t == ERR + 3, hex(t)
send_opt(s, 8)
t, d = reply(s, 8)
assert t == 1, hex(t)
# STRUCTURED_REPLY with data is invalid.
send_opt(s, 8, b'z')
t, d = reply(s, 8)
assert t == ERR + 3, hex(t)

def list_meta(queries, export='disk'):
    data = string(export) + struct.pack('>I', len(queries)) + b''.join(string(x) for x in queries)
    send_opt(s, 9, data)
    out = []
    while True:
        t, d = reply(s, 9)
        if t == 1:
            return out
        if t & ERR:
            return t
        assert t == 4, hex(t)
        out.append(d[4:].decode())

assert sorted(list_meta([])) == ['base:allocation', 'qemu:allocation-depth'], list_meta([])
assert list_meta(['base:']) == ['base:allocation']
assert list_meta(['qemu:']) == ['qemu:allocation-depth']
assert list_meta(['x-unknown:thing', 'nocolon']) == []
assert list_meta([], export='missing') == ERR + 6
# A query count larger than the payload can hold is invalid.
send_opt(s, 9, string('disk') + struct.pack('>I', 1000))
t, d = reply(s, 9)
assert t == ERR + 3, hex(t)

# SET selects exact names only; ids are unique and non-zero.
data = string('disk') + struct.pack('>I', 3) + string('base:allocation') + string('qemu:allocation-depth') + string('base:')
send_opt(s, 10, data)
ids = {}
while True:
    t, d = reply(s, 10)
    if t == 1:
        break
    assert t == 4, hex(t)
    ids[d[4:].decode()] = struct.unpack('>I', d[:4])[0]
assert set(ids) == {'base:allocation', 'qemu:allocation-depth'}, ids
assert len(set(ids.values())) == 2 and 0 not in ids.values(), ids

# INFO: unknown export, malformed request, then a good one.
def info_req(name, infos):
    return string(name) + struct.pack('>H', len(infos)) + b''.join(struct.pack('>H', i) for i in infos)
send_opt(s, 6, info_req('missing', []))
t, d = reply(s, 6)
assert t == ERR + 6, hex(t)
send_opt(s, 6, info_req('disk', [1])[:-1])
t, d = reply(s, 6)
assert t == ERR + 3, hex(t)
send_opt(s, 6, struct.pack('>I', 0xffffffff))
t, d = reply(s, 6)
assert t == ERR + 3, hex(t)
send_opt(s, 6, info_req('disk', [0, 1, 2, 3, 99]))
got = {}
while True:
    t, d = reply(s, 6)
    if t == 1:
        break
    assert t == 3, hex(t)
    got[struct.unpack('>H', d[:2])[0]] = d[2:]
size, tflags = struct.unpack('>QH', got[0])
assert size == 64 * 1024 * 1024, size
assert tflags & 1, tflags
assert got[1] == b'disk', got
assert got[2] == b'edge disk', got
assert struct.unpack('>III', got[3]) == (1, 4096, 32 * 1024 * 1024), got[3]
# ABORT is acknowledged.
send_opt(s, 2)
t, d = reply(s, 2)
assert t == 1, hex(t)
s.close()

# A bad option magic ends the connection.
s = connect()
recvn(s, 18)
s.sendall(struct.pack('>I', 1) + struct.pack('>QII', 0x1122334455667788, 3, 0))
assert s.recv(1) == b'', 'server should hang up on a bad option magic'
s.close()

# Unknown client flags end the connection.
s = connect()
recvn(s, 18)
s.sendall(struct.pack('>I', 0x80))
assert s.recv(1) == b''
s.close()

# EXPORT_NAME (old style) with NO_ZEROES: size + flags and no padding.
s = connect()
recvn(s, 18)
s.sendall(struct.pack('>I', 3))
send_opt(s, 1, b'disk')
size, tflags = struct.unpack('>QH', recvn(s, 10))
assert size == 64 * 1024 * 1024
# Simple-reply transmission: a read of 4 KiB at 0.
s.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 0, 42, 0, 4096))
magic, err, cookie = struct.unpack('>IIQ', recvn(s, 16))
assert (magic, err, cookie) == (0x67446698, 0, 42), (hex(magic), err, cookie)
data = recvn(s, 4096)
assert data[:4] == b'EDGE', data[:4]
# A bad request magic closes the connection.
s.sendall(struct.pack('>IHHQQI', 0xdeadbeef, 0, 0, 43, 0, 4096))
assert s.recv(1) == b''
s.close()

# EXPORT_NAME for a missing export: the server hangs up.
s = connect()
recvn(s, 18)
s.sendall(struct.pack('>I', 1))
send_opt(s, 1, b'missing')
assert s.recv(1) == b''
s.close()
print('ok')
"#;

fn edge_export() -> Arc<MemExport> {
    let m = MemExport::new(64 * MIB).with_description("edge disk");
    m.write(0, b"EDGE", false).unwrap();
    m.write(4, &vec![0x5au8; 256 * 1024 - 4], false).unwrap();
    Arc::new(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_socket_handshake_edge_cases() {
    let ts = TestServer::start().await;
    ts.add("disk", edge_export());
    let out = run_python(RAW_HANDSHAKE, &[ts.socket.to_str().unwrap()]).await;
    assert_eq!(out.trim(), "ok");
}

/// libnbd's option mode (what nbdsh --opt-mode uses).
const OPT_MODE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
names = []
h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
assert ('disk', 'edge disk') in names, names
ctx = []
h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
assert sorted(ctx) == ['base:allocation', 'qemu:allocation-depth'], ctx
h.set_export_name('missing')
try:
    h.opt_info()
    raise SystemExit('opt_info on a missing export must fail')
except nbd.Error:
    pass
h.set_export_name('disk')
h.opt_info()
assert h.get_size() == 64 * 1024 * 1024
h.add_meta_context('base:allocation')
h.opt_go()
assert h.can_meta_context('base:allocation')
assert h.get_structured_replies_negotiated()
assert h.pread(4, 0) == b'EDGE'
h.shutdown()
print('ok')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_option_mode() {
    let ts = TestServer::start().await;
    ts.add("disk", edge_export());
    let out = run_python(OPT_MODE, &[&ts.uri("disk")]).await;
    assert_eq!(out.trim(), "ok");
}

/// Transmission edge cases through libnbd with its client-side checks off.
const TRANSMISSION: &str = r#"
import nbd, sys, errno
def en(e):
    # libnbd's Python binding reports errno as a name in some versions.
    return e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context('base:allocation')
h.add_meta_context('qemu:allocation-depth')
h.connect_uri(uri)
size = h.get_size()
MIB = 1024 * 1024

def expect_errno(what, fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert en(e) == code, '%s: got errno %r (%s), wanted %d' % (what, e.errno, e.string, code)
        return
    raise AssertionError('%s should have failed' % what)

# Out of range.
expect_errno('read past the end', lambda: h.pread(4096, size), errno.EINVAL)
expect_errno('read straddling the end', lambda: h.pread(8192, size - 4096), errno.EINVAL)
expect_errno('write past the end', lambda: h.pwrite(b'x' * 512, size), errno.ENOSPC)
expect_errno('trim past the end', lambda: h.trim(4096, size), errno.EINVAL)
# Oversized requests: the connection survives them.
expect_errno('33 MiB read', lambda: h.pread(33 * MIB, 0), errno.EOVERFLOW)
expect_errno('33 MiB write', lambda: h.pwrite(b'y' * (33 * MIB), 0), errno.EOVERFLOW)
assert h.pread(4, 0) == b'EDGE'
# Flags not valid for the command.
expect_errno('FUA on read', lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA), errno.EINVAL)
expect_errno('REQ_ONE on write', lambda: h.pwrite(b'z', 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
# Zero-length requests succeed.
assert h.pread(0, 0) == b''
h.pwrite(b'', 0)
assert h.pread(4, 0) == b'EDGE'

# Structured reads: data then a hole without DF; one data chunk with DF.
def chunks(length, offset, flags):
    got = []
    def cb(buf, off, status, err):
        got.append((status, off, len(buf)))
        return 0
    data = h.pread_structured(length, offset, cb, flags)
    return data, got

data, got = chunks(MIB, 0, 0)
assert data[:4] == b'EDGE' and data[256 * 1024:] == bytes(MIB - 256 * 1024)
kinds = [c[0] for c in got]
assert nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds, got
assert sum(c[2] for c in got) == MIB, got
data2, got = chunks(MIB, 0, nbd.CMD_FLAG_DF)
assert data2 == data
assert got == [(nbd.READ_DATA, 0, MIB)], got
# An all-hole read is a single hole chunk.
data, got = chunks(MIB, 32 * MIB, 0)
assert data == bytes(MIB) and got == [(nbd.READ_HOLE, 32 * MIB, MIB)], got

# Block status with and without REQ_ONE.
def status(length, offset, flags):
    out = {}
    def cb(ctx, off, entries, err):
        out[ctx] = (off, list(entries))
        return 0
    h.block_status(length, offset, cb, flags)
    return out

st = status(4 * MIB, 0, 0)
assert st['base:allocation'] == (0, [256 * 1024, 0, 4 * MIB - 256 * 1024, 3]), st
assert st['qemu:allocation-depth'] == (0, [256 * 1024, 1, 4 * MIB - 256 * 1024, 0]), st
st = status(4 * MIB, 0, nbd.CMD_FLAG_REQ_ONE)
assert st['base:allocation'] == (0, [256 * 1024, 0]), st
assert st['qemu:allocation-depth'] == (0, [256 * 1024, 1]), st
st = status(1000, 100, nbd.CMD_FLAG_REQ_ONE)
assert st['base:allocation'] == (100, [1000, 0]), st
expect_errno('block status past the end', lambda: status(4096, size, 0), errno.EINVAL)

# Write zeroes, NO_HOLE and FAST_ZERO on an export that zeroes fast.
h.pwrite(b'\x77' * MIB, 8 * MIB)
h.zero(MIB, 8 * MIB, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(MIB, 8 * MIB) == bytes(MIB)
st = status(MIB, 8 * MIB, 0)
assert st['base:allocation'][1][1] & 1, st
h.pwrite(b'\x77' * MIB, 8 * MIB)
h.zero(MIB, 8 * MIB, nbd.CMD_FLAG_NO_HOLE)
st = status(MIB, 8 * MIB, 0)
assert st['base:allocation'][1] == [MIB, 0], st
h.cache(MIB, 0)
h.flush()
h.shutdown()
print('ok')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_transmission_edge_cases() {
    let ts = TestServer::start().await;
    ts.add("disk", edge_export());
    let out = run_python(TRANSMISSION, &[&ts.uri("disk")]).await;
    assert_eq!(out.trim(), "ok");
}

/// Read-only exports refuse writes with EPERM.
const READ_ONLY: &str = r#"
import nbd, sys, errno
def en(e):
    # libnbd's Python binding reports errno as a name in some versions.
    return e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero() and not h.can_fua()
for what, fn in [('write', lambda: h.pwrite(b'x', 0)),
                 ('trim', lambda: h.trim(4096, 0)),
                 ('zero', lambda: h.zero(4096, 0))]:
    try:
        fn()
        raise AssertionError(what + ' must fail')
    except nbd.Error as e:
        assert en(e) == errno.EPERM, (what, e.errno, e.string)
assert h.pread(4, 0) == b'EDGE'
print('ok')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_read_only_export() {
    let ts = TestServer::start().await;
    let m = MemExport::new(MIB);
    m.write(0, b"EDGE", false).unwrap();
    ts.add("ro", Arc::new(m.read_only()));
    let out = run_python(READ_ONLY, &[&ts.uri("ro")]).await;
    assert_eq!(out.trim(), "ok");
}

/// Write on one connection, flush on another.
const MULTI_CONN: &str = r#"
import nbd, sys
uri, offset, do_flush = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'flush'
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn()
a.pwrite(b'\xa5' * 4096, offset)   # returns once the server has replied
if do_flush:
    b.flush()
a.shutdown(); b.shutdown()
print('ok')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_on_one_connection_covers_writes_on_another() {
    let ts = TestServer::start().await;
    let export = Arc::new(MemExport::new_write_back(4 * MIB));
    ts.add("wb", export.clone());
    let mut buf = vec![0u8; 4096];

    // Control: without a flush the write is visible but not durable.
    let out = run_python(MULTI_CONN, &[&ts.uri("wb"), "0", "noflush"]).await;
    assert_eq!(out.trim(), "ok");
    export.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5), "write not applied");
    export.read_durable(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "unflushed write must not be durable yet"
    );

    // Write on A, flush on B: durable.
    let out = run_python(MULTI_CONN, &[&ts.uri("wb"), "1048576", "flush"]).await;
    assert_eq!(out.trim(), "ok");
    export.read_durable(MIB, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xa5),
        "flush on B must cover the write completed on A"
    );
    // The flush covers everything completed before it, from every connection.
    export.read_durable(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));
}

/// An export that cannot zero quickly: it relies on the trait's default
/// `write_zeroes`, which writes zero buffers and refuses FAST_ZERO.
struct SlowZeroExport(MemExport);

impl BlockExport for SlowZeroExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            write_zeroes: true,
            fast_zero: true,
            ..Capabilities::default()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.0.write(offset, buf, fua)
    }
}

const FAST_ZERO: &str = r#"
import nbd, sys, errno, time
def en(e):
    # libnbd's Python binding reports errno as a name in some versions.
    return e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.can_zero() and h.can_fast_zero()
assert not h.can_trim() and not h.can_fua() and not h.can_multi_conn() and not h.can_cache()
h.pwrite(b'\x11' * 65536, 0)
t = time.monotonic()
try:
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    raise AssertionError('fast zero must fail with ENOTSUP')
except nbd.Error as e:
    assert en(e) == errno.ENOTSUP, (e.errno, e.string)
assert time.monotonic() - t < 1.0
# Nothing was changed by the refused request.
assert h.pread(65536, 0) == b'\x11' * 65536
# Without FAST_ZERO it works (slowly).
h.zero(65536, 0)
assert h.pread(65536, 0) == bytes(65536)
# Block status without support in the export still answers base:allocation.
print('ok')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_fails_quickly_when_the_export_cannot() {
    let ts = TestServer::start().await;
    ts.add("slow", Arc::new(SlowZeroExport(MemExport::new(4 * MIB))));
    let out = run_python(FAST_ZERO, &[&ts.uri("slow")]).await;
    assert_eq!(out.trim(), "ok");
}
