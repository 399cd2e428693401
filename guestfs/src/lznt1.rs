//! LZNT1 decompression ([MS-XCA] 2.5), the format of NTFS compressed files.
//!
//! The stored bytes of one NTFS compression unit are a run of chunks, each
//! standing for 4 KiB of output: chunk `k` fills output bytes
//! `k * 4096 ..`. A chunk starts with a little-endian 16-bit header: bit 15
//! says compressed, bits 12-14 are the signature 3, bits 0-11 are the body
//! size minus one. A raw chunk's body is its output; a compressed body is
//! groups of a flag byte and up to eight tokens (flag bit clear: one literal
//! byte; set: a 16-bit back-reference into this chunk's output, whose split
//! between offset and length bits depends on how much output the chunk has
//! produced so far). A zero header, or the end of the input, ends the
//! stream. Output a chunk does not reach (a short chunk, the chunks after
//! the end) is zero, as NTFS readers give it.
//!
//! Everything is checked: a chunk that runs past its input, a back-reference
//! before the chunk's first byte or past its 4 KiB, a bad signature, all
//! give an [`Lznt1Error`] naming the offset, never a panic or wrong bytes.

use std::fmt;

/// Output bytes per chunk.
pub const CHUNK: usize = 4096;

/// Why a compressed stream cannot be decoded, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lznt1Error {
    /// Offset in the compressed input (of the chunk header or the token).
    pub at: usize,
    pub what: &'static str,
}

impl fmt::Display for Lznt1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {} of the LZNT1 data: {}", self.at, self.what)
    }
}

impl std::error::Error for Lznt1Error {}

fn fail<T>(at: usize, what: &'static str) -> Result<T, Lznt1Error> {
    Err(Lznt1Error { at, what })
}

/// Decompresses `input` into all of `out` (chunk `k` at `k * 4096`; what
/// no chunk covers is zeroed). Errors on damaged data; `out` then holds
/// nothing trustworthy.
pub fn decompress(input: &[u8], out: &mut [u8]) -> Result<(), Lznt1Error> {
    let mut pos = 0;
    let mut o = 0;
    while o < out.len() && pos + 2 <= input.len() {
        let header = u16::from_le_bytes([input[pos], input[pos + 1]]);
        if header == 0 {
            break; // end of the stream
        }
        if (header >> 12) & 7 != 3 {
            return fail(
                pos,
                "chunk header without the LZNT1 signature (3 in bits 12-14)",
            );
        }
        let size = (header & 0x0fff) as usize + 1;
        let body = pos + 2;
        let Some(body) = input.get(body..body + size) else {
            return fail(
                pos,
                "chunk runs past the end of the compressed data (truncated)",
            );
        };
        let end = (o + CHUNK).min(out.len());
        let dst = &mut out[o..end];
        let n = if header & 0x8000 == 0 {
            if size > dst.len() {
                return fail(pos, "raw chunk is longer than the output left in the unit");
            }
            dst[..size].copy_from_slice(body);
            size
        } else {
            chunk(body, dst).map_err(|(at, what)| Lznt1Error {
                at: pos + 2 + at,
                what,
            })?
        };
        dst[n..].fill(0);
        o = end;
        pos += 2 + size;
    }
    out[o..].fill(0);
    Ok(())
}

/// Decodes one compressed chunk body into `dst` (at most 4 KiB); returns
/// how many bytes it produced, or (offset in `body`, why).
fn chunk(body: &[u8], dst: &mut [u8]) -> Result<usize, (usize, &'static str)> {
    const TOO_LONG: &str = "chunk decompresses to more than 4096 bytes (or past the unit's end)";
    let mut i = 0;
    let mut d = 0;
    while i < body.len() {
        let flags = body[i];
        i += 1;
        for bit in 0..8 {
            if i >= body.len() {
                break;
            }
            if flags >> bit & 1 == 0 {
                if d >= dst.len() {
                    return Err((i, TOO_LONG));
                }
                dst[d] = body[i];
                d += 1;
                i += 1;
                continue;
            }
            let Some(t) = body.get(i..i + 2) else {
                return Err((i, "back-reference cut off by the end of its chunk"));
            };
            let token = u16::from_le_bytes([t[0], t[1]]) as usize;
            if d == 0 {
                return Err((i, "back-reference before any byte of its chunk"));
            }
            // The offset field has as many bits as positions so far need
            // (at least 4); the length field has the rest of the 16.
            let mut offset_bits = 4;
            while (1usize << offset_bits) < d {
                offset_bits += 1;
            }
            let length_bits = 16 - offset_bits;
            let offset = (token >> length_bits) + 1;
            let length = (token & ((1 << length_bits) - 1)) + 3;
            if offset > d {
                return Err((i, "back-reference points before the start of its chunk"));
            }
            if d + length > dst.len() {
                return Err((i, TOO_LONG));
            }
            if offset >= length {
                dst.copy_within(d - offset..d - offset + length, d);
            } else {
                // Overlapping: each byte may be one this copy just wrote.
                for k in d..d + length {
                    dst[k] = dst[k - offset];
                }
            }
            d += length;
            i += 2;
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compressed chunk from a body (header computed).
    fn cchunk(body: &[u8]) -> Vec<u8> {
        let h = 0xB000u16 | (body.len() as u16 - 1);
        let mut v = h.to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn run(input: &[u8], n: usize) -> Result<Vec<u8>, Lznt1Error> {
        let mut out = vec![0xAAu8; n];
        decompress(input, &mut out).map(|_| out)
    }

    #[test]
    fn the_ms_xca_example_decodes() {
        // [MS-XCA] 3.3: a 142-byte string (with its NUL) in one 59-byte chunk.
        let input = [
            0x38, 0xb0, 0x88, 0x46, 0x23, 0x20, 0x00, 0x20, 0x47, 0x20, 0x41, 0x00, 0x10, 0xa2,
            0x47, 0x01, 0xa0, 0x45, 0x20, 0x44, 0x00, 0x08, 0x45, 0x01, 0x50, 0x79, 0x00, 0xc0,
            0x45, 0x20, 0x05, 0x24, 0x13, 0x88, 0x05, 0xb4, 0x02, 0x4a, 0x44, 0xef, 0x03, 0x58,
            0x02, 0x8c, 0x09, 0x16, 0x01, 0x48, 0x45, 0x00, 0xbe, 0x00, 0x9e, 0x00, 0x04, 0x01,
            0x18, 0x90, 0x00,
        ];
        let want = b"F# F# G A A G F# E D D E F# F# E E F# F# G A A G F# E D D E F# E D D E E F# D E F# G F# D E F# G F# E D E A F# F# G A A G F# E D D E F# E D D\0";
        let out = run(&input, CHUNK).unwrap();
        assert_eq!(&out[..want.len()], want);
        assert!(out[want.len()..].iter().all(|&b| b == 0), "rest zeroed");
    }

    #[test]
    fn raw_and_compressed_chunks_fill_4k_each() {
        let mut input = Vec::new();
        // chunk 0: raw, 4096 bytes
        input.extend_from_slice(&0x3FFFu16.to_le_bytes());
        input.extend((0..CHUNK).map(|i| (i * 7) as u8));
        // chunk 1: "ab" then a back-reference (offset 2, length 10)
        // position 2: offset bits 4, length bits 12: token = (2-1)<<12 | (10-3)
        let t = ((1u16 << 12) | 7).to_le_bytes();
        input.extend(cchunk(&[0b100, b'a', b'b', t[0], t[1]]));
        input.extend([0, 0]); // end
        let out = run(&input, 3 * CHUNK).unwrap();
        assert!(out[..CHUNK]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i * 7) as u8));
        assert_eq!(&out[CHUNK..CHUNK + 12], b"abababababab");
        assert!(out[CHUNK + 12..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_offset_field_grows_with_the_position() {
        // 17 literals, then a reference at position 17: 5 offset bits,
        // 11 length bits. Offset 17 (back to the start), length 5.
        let lits: Vec<u8> = (b'A'..b'A' + 17).collect();
        let mut body = Vec::new();
        let mut tokens: Vec<Vec<u8>> = lits.iter().map(|&b| vec![b]).collect();
        tokens.push((((17u16 - 1) << 11) | (5 - 3)).to_le_bytes().to_vec());
        for group in tokens.chunks(8) {
            let mut flags = 0u8;
            for (k, t) in group.iter().enumerate() {
                if t.len() == 2 {
                    flags |= 1 << k;
                }
            }
            body.push(flags);
            for t in group {
                body.extend_from_slice(t);
            }
        }
        let out = run(&cchunk(&body), CHUNK).unwrap();
        assert_eq!(&out[..22], b"ABCDEFGHIJKLMNOPQABCDE");
    }

    #[test]
    fn hostile_inputs_are_errors() {
        // truncated: header says 100 bytes, 10 follow
        let mut t = 0xB063u16.to_le_bytes().to_vec();
        t.extend([0u8; 10]);
        let e = run(&t, CHUNK).unwrap_err();
        assert!(e.what.contains("truncated"), "{e}");
        // back-reference as the first token
        let e = run(&cchunk(&[0b1, 0x00, 0x10]), CHUNK).unwrap_err();
        assert!(e.what.contains("before any byte"), "{e}");
        // back-reference before the chunk's start: 1 literal, offset 5
        let tok = ((4u16) << 12).to_le_bytes();
        let e = run(&cchunk(&[0b10, b'x', tok[0], tok[1]]), CHUNK).unwrap_err();
        assert!(e.what.contains("before the start"), "{e}");
        assert_eq!(e.at, 2 + 2);
        // oversize: a reference whose length takes the chunk past 4 KiB
        let tok = (0x0FFFu16).to_le_bytes(); // offset 1, length 4098
        let e = run(&cchunk(&[0b10, b'x', tok[0], tok[1]]), CHUNK).unwrap_err();
        assert!(e.what.contains("more than 4096"), "{e}");
        // oversize by literals: a chunk of 4097 literals (limit the output
        // to 4096 bytes by many references instead: 4096 + 1 literal)
        let mut body = vec![0b10, b'x'];
        body.extend((0x0FFCu16).to_le_bytes()); // offset 1, length 4095 -> 4096
        body.extend([b'y']); // flag bit 2 clear: a literal past 4 KiB
        let e = run(&cchunk(&body), CHUNK).unwrap_err();
        assert!(e.what.contains("more than 4096"), "{e}");
        // a raw chunk longer than the output left
        let mut raw = 0x3FFFu16.to_le_bytes().to_vec();
        raw.extend([1u8; CHUNK]);
        let e = run(&raw, 1000).unwrap_err();
        assert!(e.what.contains("longer than the output"), "{e}");
        // a reference cut in half by the chunk's end
        let e = run(&cchunk(&[0b10, b'x', 0x01]), CHUNK).unwrap_err();
        assert!(e.what.contains("cut off"), "{e}");
        // a bad signature
        let e = run(&[0x05, 0x80, 1, 2, 3, 4, 5, 6], CHUNK).unwrap_err();
        assert!(e.what.contains("signature"), "{e}");
    }

    #[test]
    fn random_bytes_never_panic() {
        // A tiny deterministic generator: many shapes of garbage, with and
        // without a valid-looking header in front.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = vec![0u8; 16 * CHUNK];
        for round in 0..3000 {
            let n = (next() % 9000) as usize;
            let mut v: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            if round % 2 == 0 && v.len() >= 2 {
                let h = 0xB000u16 | (next() as u16 & 0x0FFF);
                v[..2].copy_from_slice(&h.to_le_bytes());
            }
            let _ = decompress(&v, &mut out);
            let n = (next() % 70000) as usize % out.len();
            let _ = decompress(&v, &mut out[..n]);
        }
    }

    #[test]
    fn empty_and_ended_streams_are_zeros() {
        assert!(run(&[], CHUNK).unwrap().iter().all(|&b| b == 0));
        assert!(run(&[0, 0, 0xFF, 0xFF], 2 * CHUNK)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }
}
