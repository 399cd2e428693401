//! Mounting in the foreground, and leaving cleanly.
//!
//! SIGINT, SIGTERM and SIGHUP are blocked in every thread (call
//! [`block_termination_signals`] before any thread is started) and taken by
//! one thread with `sigwait`, which asks the main thread to unmount. An
//! external `umount`/`fusermount3 -u` ends the session threads, which the
//! main thread also waits for. Either way, every open disk is closed before
//! returning (in `--server` mode that closes the daemon's restore exports).

use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session};

use crate::catalog::Catalog;
use crate::fs::RestoreFs;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// FUSE event-loop threads (each with its own cloned /dev/fuse fd), so
    /// that many readers are served at once.
    pub threads: usize,
    /// Close a point's disk (chain files, restore export) after this long
    /// without reads.
    pub idle_close: Duration,
    /// Shown as the source in /proc/mounts.
    pub fsname: String,
    /// Let other users in (needs `user_allow_other` in /etc/fuse.conf for
    /// non-root).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 8,
            idle_close: Duration::from_secs(60),
            fsname: "chainvault".into(),
            allow_other: false,
        }
    }
}

/// Why the mount ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A signal (its number) asked us to unmount.
    Signal(i32),
    /// Someone unmounted it from outside.
    Unmounted,
}

fn term_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Block SIGINT/SIGTERM/SIGHUP in the calling thread and every thread it
/// starts afterwards, so that only the `sigwait` thread of
/// [`mount_foreground`] sees them. Call it first thing, before any runtime
/// or thread pool starts.
pub fn block_termination_signals() -> io::Result<()> {
    // A shell starts background jobs with SIGINT ignored; an ignored signal
    // is dropped before sigwait could see it, so take the defaults back
    // (SIGHUP stays as inherited: `nohup` means it).
    // SAFETY: resetting dispositions before any thread exists.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
    let set = term_set();
    // SAFETY: setting this thread's signal mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

enum Event {
    Signal(i32),
    SessionEnded(io::Result<()>),
}

/// Mount `fs` on `mountpoint`, call `ready` once the kernel has the mount,
/// and serve until a signal or an external unmount. Returns why it ended.
pub fn mount_foreground(
    fs: RestoreFs,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(),
) -> io::Result<Ended> {
    let catalog: Arc<Catalog> = fs.catalog().clone();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("chainvault".into()),
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;

    let mut session = Session::new(fs, mountpoint, &config).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot mount on {}: {e}", mountpoint.display()),
        )
    })?;
    let mut unmounter = session.unmount_callable();
    let (tx, rx) = mpsc::channel::<Event>();

    let txs = tx.clone();
    let serve = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = txs.send(Event::SessionEnded(r));
        })?;

    let txg = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let set = term_set();
            let mut sig: libc::c_int = 0;
            // SAFETY: waiting for signals blocked in every thread.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 && txg.send(Event::Signal(sig)).is_err() {
                return;
            }
        })?;

    let idle = opts.idle_close;
    let cat = catalog.clone();
    std::thread::Builder::new()
        .name("idle-close".into())
        .spawn(move || loop {
            std::thread::sleep((idle / 4).max(Duration::from_millis(200)));
            for p in cat.all_points() {
                p.disk.close_if_idle(idle);
            }
        })?;
    drop(tx);

    ready();

    let ended = match rx.recv() {
        Ok(Event::Signal(sig)) => {
            tracing::info!(signal = sig, "unmounting");
            let wait = match unmounter.unmount() {
                Ok(()) => Duration::from_secs(10),
                Err(e) => {
                    // Busy (a shell has its cwd inside): detach it from the
                    // namespace now; whoever is still inside gets ENOTCONN
                    // once this process is gone.
                    tracing::warn!(error = %e, "unmount failed (busy?); detaching lazily");
                    lazy_detach(mountpoint);
                    Duration::from_secs(2)
                }
            };
            // The session threads see the unmount and end.
            match rx.recv_timeout(wait) {
                Ok(Event::SessionEnded(r)) => log_end(r),
                _ => tracing::warn!("the FUSE session is still in use; leaving anyway"),
            }
            Ended::Signal(sig)
        }
        Ok(Event::SessionEnded(r)) => {
            log_end(r);
            Ended::Unmounted
        }
        Err(_) => Ended::Unmounted,
    };
    if serve.is_finished() {
        let _ = serve.join();
    }
    for p in catalog.all_points() {
        p.disk.close();
    }
    Ok(ended)
}

fn log_end(r: io::Result<()>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "the FUSE session ended with an error");
    }
}

fn lazy_detach(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a valid C string.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(mountpoint)
            .status();
    }
}
