//! The reply queue of a connection and its writer: whoever queues a reply
//! while nobody writes becomes the writer for everything queued.

use super::*;

/// One reply ready to be written; dropping it releases the request's
/// in-flight permits.
pub(super) struct OutMsg {
    pub(super) bufs: Vec<Bytes>,
    pub(super) _permits: Permits,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) items: Vec<OutMsg>,
    /// Some task or thread is currently writing the queue out.
    pub(super) writing: bool,
}

/// Writes replies; shared by the reader task and the blocking workers.
///
/// Whoever queues a reply while nobody is writing becomes the writer and
/// writes everything queued (its own reply and any that arrive meanwhile)
/// with vectored writes, then steps down. At queue depth 1 a worker thus
/// writes its own reply with no thread hop; under load replies are batched
/// into few system calls.
pub(super) struct ReplySink {
    pub(super) w: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
    pub(super) queue: Mutex<Queue>,
    pub(super) failed: AtomicBool,
    pub(super) error: Mutex<Option<io::Error>>,
    pub(super) stop: CancellationToken,
    /// A batch of replies not written within this long ends the connection.
    pub(super) stall_timeout: Duration,
}

impl ReplySink {
    pub(super) fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a reply and, unless another writer is active, write the queue.
    /// After a write failure replies are dropped unwritten (their permits
    /// are still released) and the connection is told to stop.
    pub(super) async fn send(&self, msg: OutMsg) {
        self.send_many(vec![msg]).await
    }

    /// Queue several replies at once (see [`ReplySink::send`]).
    pub(super) async fn send_many(&self, msgs: Vec<OutMsg>) {
        {
            let mut q = self.lock_queue();
            q.items.extend(msgs);
            if q.writing {
                return;
            }
            q.writing = true;
        }
        // If this future is dropped half-way (the connection is being torn
        // down), the stream may hold a partial reply: stop writing, release
        // what is queued and let others take over the (failed) sink.
        let mut guard = WriterGuard(Some(self));
        let mut w = self.w.lock().await;
        loop {
            let batch = {
                let mut q = self.lock_queue();
                if q.items.is_empty() {
                    q.writing = false;
                    break;
                }
                std::mem::take(&mut q.items)
            };
            if self.failed.load(Ordering::Acquire) {
                continue;
            }
            let bufs: Vec<Bytes> = batch.iter().flat_map(|m| m.bufs.iter().cloned()).collect();
            let write = async {
                write_all_vectored(&mut *w, &bufs).await?;
                w.flush().await
            };
            let r = match tokio::time::timeout(self.stall_timeout, write).await {
                Ok(r) => r,
                Err(_) => {
                    warn!(timeout = ?self.stall_timeout, "client stopped reading replies; closing");
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("client read no reply for {:?}", self.stall_timeout),
                    ))
                }
            };
            if let Err(e) = r {
                debug!(error = %e, "writing replies failed; stopping the connection");
                self.failed.store(true, Ordering::Release);
                *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                self.stop.cancel();
            }
            drop(batch);
        }
        guard.0 = None;
    }

    /// Queue (and maybe write) replies from a blocking-pool thread.
    pub(super) fn send_many_blocking(&self, msgs: Vec<OutMsg>) {
        tokio::runtime::Handle::current().block_on(self.send_many(msgs));
    }

    pub(super) async fn close(&self) -> io::Result<()> {
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        if self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut w = self.w.lock().await;
        w.flush().await?;
        let _ = w.shutdown().await;
        Ok(())
    }
}

/// Active while a writer drains the queue; if the writer's future is
/// dropped, marks the sink failed and releases everything queued.
pub(super) struct WriterGuard<'a>(Option<&'a ReplySink>);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if let Some(sink) = self.0 {
            sink.failed.store(true, Ordering::Release);
            let items = {
                let mut q = sink.lock_queue();
                q.writing = false;
                std::mem::take(&mut q.items)
            };
            drop(items);
        }
    }
}

/// `write_all` over several buffers with vectored writes.
pub(super) async fn write_all_vectored<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    bufs: &[Bytes],
) -> io::Result<()> {
    const MAX_SLICES: usize = 256;
    let mut idx = 0usize;
    let mut off = 0usize;
    while idx < bufs.len() {
        if off >= bufs[idx].len() {
            idx += 1;
            off = 0;
            continue;
        }
        let end = bufs.len().min(idx + MAX_SLICES);
        let mut slices = Vec::with_capacity(end - idx);
        slices.push(IoSlice::new(&bufs[idx][off..]));
        for b in &bufs[idx + 1..end] {
            slices.push(IoSlice::new(b));
        }
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "connection closed while writing a reply",
            ));
        }
        while n > 0 && idx < bufs.len() {
            let rem = bufs[idx].len() - off;
            if n >= rem {
                n -= rem;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}
