//! Decompression of compressed clusters: raw deflate (QEMU's default) and zstd.

use std::io::Read;

use crate::header::CompressionType;

/// Decompress one cluster. `input` may carry trailing bytes past the end of the
/// compressed stream (the descriptor rounds up to 512-byte sectors); they are ignored.
/// Returns an error string when the stream is damaged or too short.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => {
            let mut d = flate2::read::DeflateDecoder::new(input);
            d.read_exact(out)
                .map_err(|e| format!("deflate stream is damaged: {e}"))
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd stream is damaged: {e}"))?
                .single_frame();
            d.read_exact(out)
                .map_err(|e| format!("zstd stream is damaged: {e}"))
        }
    }
}
