//! `chainvault image ...`: create, info, check, map, convert.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use chainvault_qcow::chain::{probe_format, Format};
use chainvault_qcow::check::{check, CheckOptions};
use chainvault_qcow::create::create;
use chainvault_qcow::{
    BackingFormat, BackingSpec, Chain, ChainOptions, CreateOptions, Extent, ExtentKind, Layer,
};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::units::{human, parse_size};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Create a full image, or an overlay on a backing file.
    Create(CreateArgs),
    /// Show an image and its backing chain.
    Info(InfoArgs),
    /// Check an image's consistency (exit 0 clean, 2 corrupt, 3 leaks only).
    Check(CheckArgs),
    /// Show which ranges hold data, zeros, or nothing, and in which layer.
    Map(MapArgs),
    /// Copy a raw file or qcow2 chain into a raw file or a new qcow2 image.
    Convert(ConvertArgs),
}

#[derive(Debug, Args)]
pub struct ChainArgs {
    /// Backing files must resolve inside this directory [default: the image's directory].
    #[arg(long, value_name = "DIR")]
    pub backing_root: Option<PathBuf>,
    /// Most backing layers to follow below the top.
    #[arg(long, default_value_t = 256)]
    pub max_depth: usize,
}

impl ChainArgs {
    fn options(&self, writable: bool) -> ChainOptions {
        ChainOptions {
            root: self.backing_root.clone(),
            max_depth: self.max_depth,
            writable,
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub file: PathBuf,
    /// Virtual size (e.g. 10G, 512M, bytes). Defaults to the backing file's size.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Backing file: the new image is an overlay that stores only what is written to it.
    #[arg(long, short = 'b', value_name = "FILE")]
    pub backing: Option<PathBuf>,
    /// Cluster size, 512 B to 2 MiB, a power of two.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub cluster_size: u64,
    /// Use extended L2 entries (32 subclusters per cluster; needs clusters >= 16K).
    #[arg(long)]
    pub extended_l2: bool,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    #[arg(long, default_value_t = 16)]
    pub refcount_bits: u32,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    pub file: PathBuf,
    /// Repair leaked clusters (the image must not be in use).
    #[arg(long)]
    pub repair: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MapArgs {
    pub file: PathBuf,
    /// JSON output in the shape of `qemu-img map --output=json`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Output format.
    #[arg(
        short = 'O',
        long = "output-format",
        value_enum,
        default_value = "qcow2"
    )]
    pub format: OutFormat,
    /// With -O qcow2: make DST an overlay on FILE and write only what differs from it.
    #[arg(long, short = 'B', value_name = "FILE")]
    pub backing: Option<PathBuf>,
    /// Cluster size of a new qcow2 image.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub cluster_size: u64,
    /// Extended L2 entries in a new qcow2 image.
    #[arg(long)]
    pub extended_l2: bool,
    /// Source: a raw file or a qcow2 image (with its backing chain).
    pub src: PathBuf,
    /// Destination; must not exist.
    pub dst: PathBuf,
    #[command(flatten)]
    pub chain: ChainArgs,
}

pub fn run(cmd: ImageCmd) -> anyhow::Result<u8> {
    // A pipe closed by the reader (`| head`) ends output quietly, as in other tools.
    // SAFETY: setting a signal disposition at start-up, before any threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match cmd {
        ImageCmd::Create(a) => cmd_create(a),
        ImageCmd::Info(a) => cmd_info(a),
        ImageCmd::Check(a) => cmd_check(a),
        ImageCmd::Map(a) => cmd_map(a),
        ImageCmd::Convert(a) => cmd_convert(a),
    }
}

/// `target` expressed relative to directory `base` (both absolute, canonical).
pub fn relative_to(target: &Path, base: &Path) -> PathBuf {
    let t: Vec<Component> = target.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// The directory a new file will live in, canonicalised.
fn parent_dir(file: &Path) -> anyhow::Result<PathBuf> {
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.canonicalize().with_context(|| {
        format!(
            "directory {} of {} does not exist",
            parent.display(),
            file.display()
        )
    })
}

/// Backing spec for a new overlay at `file` on `backing`: a name relative to the
/// overlay's directory, the backing's format, and its virtual size.
fn backing_spec(file: &Path, backing: &Path) -> anyhow::Result<(BackingSpec, u64)> {
    let b = backing
        .canonicalize()
        .with_context(|| format!("backing file {} cannot be opened", backing.display()))?;
    let fmt = probe_format(&b)?;
    let size = match fmt {
        Format::Qcow2 => chainvault_qcow::chain::read_header(&b)?.size,
        Format::Raw => std::fs::metadata(&b)?.len(),
    };
    let name = relative_to(&b, &parent_dir(file)?);
    let spec = BackingSpec {
        name: name
            .to_str()
            .ok_or_else(|| anyhow!("backing path {} is not UTF-8", b.display()))?
            .to_string(),
        format: match fmt {
            Format::Qcow2 => BackingFormat::Qcow2,
            Format::Raw => BackingFormat::Raw,
        },
    };
    Ok((spec, size))
}

fn cmd_create(a: CreateArgs) -> anyhow::Result<u8> {
    let (backing, bsize) = match &a.backing {
        Some(b) => {
            let (s, size) = backing_spec(&a.file, b)?;
            (Some(s), Some(size))
        }
        None => (None, None),
    };
    let size = a
        .size
        .or(bsize)
        .ok_or_else(|| anyhow!("--size is required for an image without --backing"))?;
    let opts = CreateOptions {
        size,
        cluster_size: a.cluster_size,
        extended_l2: a.extended_l2,
        refcount_bits: a.refcount_bits,
        backing,
    };
    create(&a.file, &opts)?;
    match &opts.backing {
        Some(b) => println!(
            "Created {} ({}, {}-byte clusters), backing file {} ({})",
            a.file.display(),
            human(size),
            a.cluster_size,
            b.name,
            b.format.as_str()
        ),
        None => println!(
            "Created {} ({}, {}-byte clusters)",
            a.file.display(),
            human(size),
            a.cluster_size
        ),
    }
    Ok(0)
}

fn disk_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn layer_json(l: &Layer) -> serde_json::Value {
    let path = l.path();
    let mut v = json!({
        "filename": path.display().to_string(),
        "format": l.format(),
        "virtual-size": l.size(),
        "actual-size": disk_size(path),
    });
    if let Layer::Qcow(img) = l {
        let h = img.header();
        v["cluster-size"] = json!(h.cluster_size());
        v["dirty-flag"] = json!(h.incompatible_features & 1 != 0);
        if let Some(b) = &h.backing_file {
            v["backing-filename"] = json!(b);
        }
        if let Some(f) = h.backing_format() {
            v["backing-filename-format"] = json!(f);
        }
        v["format-specific"] = json!({
            "type": "qcow2",
            "data": {
                "compat": if h.version >= 3 { "1.1" } else { "0.10" },
                "compression-type": h.compression_type,
                "lazy-refcounts": h.compatible_features & 1 != 0,
                "refcount-bits": h.refcount_bits(),
                "corrupt": h.incompatible_features & 2 != 0,
                "extended-l2": h.extended_l2(),
            }
        });
    }
    v
}

fn cmd_info(a: InfoArgs) -> anyhow::Result<u8> {
    let chain = Chain::open(&a.file, &a.chain.options(false))?;
    if a.json {
        let v: Vec<_> = chain.layers().iter().map(layer_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for (i, l) in chain.layers().iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("image: {}", l.path().display());
        println!("file format: {}", l.format());
        println!("virtual size: {} ({} bytes)", human(l.size()), l.size());
        println!("disk size: {}", human(disk_size(l.path())));
        if let Layer::Qcow(img) = l {
            let h = img.header();
            println!("cluster_size: {}", h.cluster_size());
            if let Some(b) = &h.backing_file {
                println!("backing file: {b}");
                if let Some(f) = h.backing_format() {
                    println!("backing file format: {f}");
                }
            }
            println!("Format specific information:");
            println!(
                "    compat: {}",
                if h.version >= 3 { "1.1" } else { "0.10" }
            );
            println!(
                "    compression type: {}",
                serde_json::to_value(h.compression_type)?
                    .as_str()
                    .unwrap_or("?")
            );
            println!("    lazy refcounts: {}", h.compatible_features & 1 != 0);
            println!("    refcount bits: {}", h.refcount_bits());
            println!("    corrupt: {}", h.incompatible_features & 2 != 0);
            println!("    extended l2: {}", h.extended_l2());
        }
    }
    Ok(0)
}

fn cmd_check(a: CheckArgs) -> anyhow::Result<u8> {
    let report = check(
        &a.file,
        &CheckOptions {
            repair_leaks: a.repair,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("{}", p.message);
        }
        if report.leaks_fixed > 0 {
            println!("Repaired {} leaked clusters.", report.leaks_fixed);
        }
        println!("{}", report.summary());
    }
    Ok(report.exit_code() as u8)
}

fn map_json(e: &Extent) -> serde_json::Value {
    let mut v = json!({
        "start": e.offset,
        "length": e.length,
        "depth": e.depth,
        "present": e.kind != ExtentKind::Unallocated,
        "zero": e.kind != ExtentKind::Data,
        "data": e.kind == ExtentKind::Data,
        "compressed": e.compressed,
    });
    if let Some(o) = e.host_offset {
        v["offset"] = json!(o);
    }
    v
}

fn cmd_map(a: MapArgs) -> anyhow::Result<u8> {
    let chain = Chain::open(&a.file, &a.chain.options(false))?;
    let size = chain.size();
    let mut all = Vec::new();
    // In slices, so a huge sparse image does not build one giant list at once.
    let step = 1u64 << 34;
    let mut pos = 0;
    while pos < size {
        let n = step.min(size - pos);
        all.extend(chain.block_status(pos, n)?);
        pos += n;
    }
    if a.json {
        let v: Vec<_> = all.iter().map(map_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:<20}{:<20}{:<20}File", "Offset", "Length", "Mapped to");
        for e in all.iter().filter(|e| e.kind == ExtentKind::Data) {
            let file = chain.layers()[e.depth as usize]
                .path()
                .display()
                .to_string();
            let mapped = e
                .host_offset
                .map_or("compressed".to_string(), |o| format!("{o:#x}"));
            println!(
                "{:<20}{:<20}{:<20}{}",
                format!("{:#x}", e.offset),
                format!("{:#x}", e.length),
                mapped,
                file
            );
        }
    }
    Ok(0)
}

/// Progress on stderr when it is a terminal.
struct Progress {
    total: u64,
    start: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress {
            total,
            start: Instant::now(),
            last: Instant::now(),
            tty: std::io::stderr().is_terminal(),
        }
    }
    fn update(&mut self, done: u64) {
        if !self.tty || self.last.elapsed().as_millis() < 200 {
            return;
        }
        self.last = Instant::now();
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        eprint!("\r  {pct:5.1}% of {}", human(self.total));
        let _ = std::io::stderr().flush();
    }
    fn finish(&self) {
        if self.tty {
            eprintln!(
                "\r  100.0% of {} in {:.1}s",
                human(self.total),
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

fn cmd_convert(a: ConvertArgs) -> anyhow::Result<u8> {
    if a.dst.exists() {
        bail!(
            "destination {} already exists; remove it or choose another name",
            a.dst.display()
        );
    }
    let src = Chain::open(&a.src, &a.chain.options(false))?;
    let size = src.size();
    let result = match a.format {
        OutFormat::Raw => {
            if a.backing.is_some() {
                bail!("--backing only applies to -O qcow2");
            }
            convert_raw(&src, &a.dst)
        }
        OutFormat::Qcow2 => convert_qcow2(&src, &a, size),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&a.dst);
    }
    result.map(|_| 0)
}

const CHUNK: u64 = 4 << 20;

use crate::digest::is_zero;

/// Data extents of `src`, coalesced, in pieces of at most CHUNK.
fn data_pieces(src: &Chain, pos: u64, len: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for e in src.block_status(pos, len)? {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let mut p = e.offset;
        while p < e.offset + e.length {
            let n = CHUNK.min(e.offset + e.length - p);
            out.push((p, n));
            p += n;
        }
    }
    Ok(out)
}

fn convert_raw(src: &Chain, dst: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let size = src.size();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .with_context(|| format!("cannot create {}", dst.display()))?;
    f.set_len(size)?;
    let mut progress = Progress::new(size);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let span = (CHUNK * 64).min(size - pos);
        for (off, n) in data_pieces(src, pos, span)? {
            let b = &mut buf[..n as usize];
            src.read_at(b, off)?;
            // Keep the output sparse: skip 64 KiB blocks that are all zeros.
            let mut i = 0;
            while i < b.len() {
                let j = (i + 65536).min(b.len());
                if !is_zero(&b[i..j]) {
                    f.write_all_at(&b[i..j], off + i as u64)
                        .with_context(|| format!("write to {}", dst.display()))?;
                }
                i = j;
            }
        }
        pos += span;
        progress.update(pos);
    }
    f.sync_all()?;
    progress.finish();
    Ok(())
}

fn convert_qcow2(src: &Chain, a: &ConvertArgs, size: u64) -> anyhow::Result<()> {
    let backing = match &a.backing {
        Some(b) => {
            let (spec, bsize) = backing_spec(&a.dst, b)?;
            if bsize > size {
                bail!(
                    "backing file {} ({} bytes) is larger than the source ({} bytes)",
                    b.display(),
                    bsize,
                    size
                );
            }
            Some(spec)
        }
        None => None,
    };
    create(
        &a.dst,
        &CreateOptions {
            size,
            cluster_size: a.cluster_size,
            extended_l2: a.extended_l2,
            refcount_bits: 16,
            backing: backing.clone(),
        },
    )?;
    let root = match (&a.chain.backing_root, &a.backing) {
        (Some(r), _) => Some(r.clone()),
        (None, Some(b)) => Some(common_root(&parent_dir(&a.dst)?, &b.canonicalize()?)),
        (None, None) => None,
    };
    let out = Chain::open(
        &a.dst,
        &ChainOptions {
            root,
            max_depth: a.chain.max_depth,
            writable: true,
            ..Default::default()
        },
    )?;
    let img = out
        .top_image()
        .ok_or_else(|| anyhow!("destination is not qcow2"))?
        .clone();
    let cs = a.cluster_size;
    // Granularity of the comparison with the backing chain: what the overlay can store alone.
    let gran = if a.extended_l2 { cs / 32 } else { cs };
    let mut progress = Progress::new(size);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut old = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let span = (CHUNK * 64).min(size - pos);
        if backing.is_none() {
            // Full image: write the data extents, leave zeros unallocated.
            for (off, n) in data_pieces(src, pos, span)? {
                let b = &mut buf[..n as usize];
                src.read_at(b, off)?;
                write_nonzero(&img, b, off, cs)?;
            }
        } else {
            // Overlay: compare with what the backing chain already holds, cluster by cluster.
            let mut p = pos;
            while p < pos + span {
                let n = CHUNK.min(pos + span - p);
                let b = &mut buf[..n as usize];
                let o = &mut old[..n as usize];
                src.read_at(b, p)?;
                img.read_at(o, p)?;
                let mut i = 0u64;
                while i < n {
                    let j = (i + gran - (p + i) % gran).min(n);
                    let (x, y) = (&b[i as usize..j as usize], &o[i as usize..j as usize]);
                    if x != y {
                        if is_zero(x) {
                            img.write_zeroes(p + i, j - i, true)?;
                        } else {
                            img.write_at(x, p + i)?;
                        }
                    }
                    i = j;
                }
                p += n;
            }
        }
        pos += span;
        progress.update(pos);
    }
    img.flush()?;
    progress.finish();
    Ok(())
}

/// Write `b` at `off`, skipping clusters that are all zeros (they stay unallocated).
fn write_nonzero(img: &chainvault_qcow::Image, b: &[u8], off: u64, cs: u64) -> anyhow::Result<()> {
    let n = b.len() as u64;
    let mut i = 0u64;
    let mut run: Option<u64> = None;
    while i < n {
        let j = (i + cs - (off + i) % cs).min(n);
        let zero = is_zero(&b[i as usize..j as usize]);
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(s)) => {
                img.write_at(&b[s as usize..i as usize], off + s)?;
                run = None;
            }
            _ => {}
        }
        i = j;
    }
    if let Some(s) = run {
        img.write_at(&b[s as usize..], off + s)?;
    }
    Ok(())
}

/// Deepest directory containing both paths.
fn common_root(a: &Path, b: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for (x, y) in a.components().zip(b.components()) {
        if x != y {
            break;
        }
        out.push(x.as_os_str());
    }
    if out.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/c.qcow2"), Path::new("/a/b")),
            PathBuf::from("c.qcow2")
        );
        assert_eq!(
            relative_to(Path::new("/a/x/c.qcow2"), Path::new("/a/b")),
            PathBuf::from("../x/c.qcow2")
        );
        assert_eq!(
            relative_to(Path::new("/c.qcow2"), Path::new("/a/b")),
            PathBuf::from("../../c.qcow2")
        );
    }
}
