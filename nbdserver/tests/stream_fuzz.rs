//! A short, deterministic run of the fuzz harness on stable Rust: random
//! and structured client byte streams must never panic or hang the server.
//! The long-running version is the cargo-fuzz target in `fuzz/`.

mod common;

use std::time::Duration;

use chainvault_nbd::proto::{cflag, cmd, opt, COMPACT_REQUEST_LEN, IHAVEOPT};
use chainvault_nbd::testing::{feed_client_bytes, fuzz_server};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A plausible client: a handshake that reaches transmission, then requests
/// with random fields.
fn structured_input(rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&3u32.to_be_bytes());
    let extended = rng.below(3) == 0;
    let structured = rng.below(2) == 0;
    if extended {
        option(&mut v, opt::EXTENDED_HEADERS, &[]);
    } else if structured {
        option(&mut v, opt::STRUCTURED_REPLY, &[]);
    }
    let export = rng.pick(&["disk", "ro", "", "missing"]);
    if rng.below(2) == 0 {
        let mut d = Vec::new();
        string(&mut d, export);
        d.extend_from_slice(&2u32.to_be_bytes());
        string(&mut d, "base:allocation");
        string(&mut d, "qemu:allocation-depth");
        option(&mut v, opt::SET_META_CONTEXT, &d);
    }
    if rng.below(4) == 0 {
        option(&mut v, opt::LIST, &[]);
        option(&mut v, rng.below(1 << 16) as u32, b"junk");
    }
    let mut d = Vec::new();
    string(&mut d, export);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    option(&mut v, opt::GO, &d);
    let size = 8u64 << 20;
    for _ in 0..rng.below(40) {
        let command = rng.pick(&[
            cmd::READ,
            cmd::WRITE,
            cmd::FLUSH,
            cmd::TRIM,
            cmd::CACHE,
            cmd::WRITE_ZEROES,
            cmd::BLOCK_STATUS,
            9,
        ]);
        let flags = rng.pick(&[
            0,
            cflag::FUA,
            cflag::DF,
            cflag::REQ_ONE,
            cflag::NO_HOLE | cflag::FAST_ZERO,
            cflag::PAYLOAD_LEN,
            0xffff,
        ]);
        let r = rng.below(size);
        let offset = rng.pick(&[0, 4096, size - 1, size, u64::MAX - 10, r]);
        let r = rng.below(1 << 20);
        let len = rng.pick(&[0, 1, 512, 65536, 1 << 20, 33 << 20, r]);
        v.extend_from_slice(
            &(if extended {
                0x21e4_1c71u32
            } else {
                0x2560_9513u32
            })
            .to_be_bytes(),
        );
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(&rng.next().to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        if extended {
            v.extend_from_slice(&len.to_be_bytes());
        } else {
            v.extend_from_slice(&(len as u32).to_be_bytes());
        }
        let carries = command == cmd::WRITE || (extended && flags & cflag::PAYLOAD_LEN != 0);
        if carries && len <= 1 << 20 {
            let n = if rng.below(8) == 0 {
                rng.below(len + 1)
            } else {
                len
            };
            v.extend(std::iter::repeat_n(0x3c, n as usize));
        }
    }
    if rng.below(2) == 0 {
        v.extend_from_slice(&[0u8; COMPACT_REQUEST_LEN]);
    }
    v
}

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.below(6) {
        if v.is_empty() {
            break;
        }
        let i = rng.below(v.len() as u64) as usize;
        match rng.below(3) {
            0 => v[i] ^= 1 << rng.below(8),
            1 => v[i] = rng.next() as u8,
            _ => v.truncate(i),
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_client_streams_neither_panic_nor_hang() {
    common::init_tracing();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let limit = Duration::from_secs(10);
    for round in 0..400 {
        let input = match round % 4 {
            0 => {
                let n = rng.below(200) as usize;
                (0..n).map(|_| rng.next() as u8).collect()
            }
            1 => structured_input(&mut rng),
            _ => {
                let base = structured_input(&mut rng);
                mutate(&mut rng, base)
            }
        };
        let server = fuzz_server();
        if feed_client_bytes(&server, &input, limit).await.is_err() {
            panic!("server hung on input #{round}: {input:02x?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_valid_session_at_every_length() {
    let mut rng = Rng(42);
    let mut input = structured_input(&mut rng);
    while input.len() < 300 {
        input = structured_input(&mut rng);
    }
    input.truncate(600);
    let server = fuzz_server();
    for cut in 0..input.len() {
        if feed_client_bytes(&server, &input[..cut], Duration::from_secs(10))
            .await
            .is_err()
        {
            panic!("server hung on a stream cut at {cut} bytes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_really_drives_the_server() {
    // A valid session through the same harness: GO, WRITE, FLUSH, DISC.
    let mut v = Vec::new();
    v.extend_from_slice(&3u32.to_be_bytes());
    option(&mut v, opt::STRUCTURED_REPLY, &[]);
    let mut d = Vec::new();
    string(&mut d, "disk");
    d.extend_from_slice(&0u16.to_be_bytes());
    option(&mut v, opt::GO, &d);
    let mut req = |command: u16, offset: u64, payload: &[u8]| {
        v.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
    };
    req(cmd::WRITE, 1 << 20, b"through the harness");
    req(cmd::FLUSH, 0, &[]);
    req(cmd::DISC, 0, &[]);
    let server = fuzz_server();
    feed_client_bytes(&server, &v, Duration::from_secs(10))
        .await
        .unwrap();
    let disk = server.export("disk").unwrap();
    let mut b = [0u8; 19];
    disk.read(1 << 20, &mut b).unwrap();
    assert_eq!(&b, b"through the harness");
}
