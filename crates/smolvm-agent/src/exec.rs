//! An exec stream: runs one process, forwards stdin, stdout and stderr, enforces the output
//! cap and the timeout, and reports how the process ended.
//!
//! The process gets the agent's base environment, then the persistent one (as it was when
//! the request came), then the request's own variables.
//!
//! The stream is cancelled by closing it: when the host's side ends (FIN or reset), the
//! whole process group is killed, so a host must keep its side open until `Exited`.

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_bytes::ByteBuf;
use smolvm_protocol::{decode, ExecRequest, ExitStatus, GuestMessage, HostMessage, MAX_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::task::JoinHandle;

use crate::env::Vars;
use crate::error::{AgentError, Result};
use crate::request::{kind, send, Transport};
use crate::spawn;

/// After the process exits, stop waiting for its pipes once they were quiet this long
/// (a background process may hold them open forever).
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// ... and in any case this long after the exit.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Highest signal number accepted from the host (`SIGRTMAX`).
const MAX_SIGNAL: i32 = 64;

type Sender = SplitSink<Transport, Bytes>;
type Receiver = SplitStream<Transport>;

/// Serves an exec stream whose first frame was `req`; `env` is the persistent environment.
pub async fn run(req: ExecRequest, transport: Transport, env: Arc<Vars>) {
    let (mut tx, rx) = transport.split();
    let last = match execute(&req, &env, &mut tx, rx).await {
        Ok(status) => GuestMessage::Exited(status),
        Err(e) => GuestMessage::Error(e.to_wire()),
    };
    let _ = send(&mut tx, &last).await;
    let _ = tx.close().await;
}

/// Sends `sig` to every process of the group `pgid`. Refuses the ids that mean "every
/// process" or "our own group", so a bug cannot turn this into a massacre.
fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Kills the process group with SIGKILL when dropped, unless released: an exec that ends
/// early (host gone, session over, task aborted) leaves no processes behind.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn release(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_group(pgid, libc::SIGKILL);
        }
    }
}

/// Aborts a helper task when dropped.
struct TaskGuard(JoinHandle<()>);

impl TaskGuard {
    /// Aborts the task and waits until it no longer runs.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One of the process's output pipes, with its cap.
struct Output<R> {
    pipe: Option<R>,
    buf: Vec<u8>,
    cap: u64,
    forwarded: u64,
    truncated: bool,
}

impl<R: AsyncRead + Unpin> Output<R> {
    fn new(pipe: Option<R>, cap: u64) -> Self {
        Self {
            pipe,
            buf: vec![0; MAX_CHUNK],
            cap,
            forwarded: 0,
            truncated: false,
        }
    }

    fn is_open(&self) -> bool {
        self.pipe.is_some()
    }

    /// Reads the next chunk (never resolves once the pipe is closed).
    async fn read(&mut self) -> std::io::Result<usize> {
        match self.pipe.as_mut() {
            Some(pipe) => pipe.read(&mut self.buf).await,
            None => std::future::pending().await,
        }
    }

    /// Takes the result of [`Output::read`]: closes the pipe at its end, and returns what
    /// may be forwarded under the cap (bytes past it are dropped and flagged).
    fn accept(&mut self, read: std::io::Result<usize>) -> Option<ByteBuf> {
        let n = match read {
            Ok(0) | Err(_) => {
                self.pipe = None;
                return None;
            }
            Ok(n) => n,
        };
        let room = self.cap.saturating_sub(self.forwarded);
        let take = n.min(usize::try_from(room).unwrap_or(usize::MAX));
        if take < n {
            self.truncated = true;
        }
        self.forwarded += take as u64;
        (take > 0).then(|| ByteBuf::from(self.buf[..take].to_vec()))
    }
}

/// Runs the request to its end and returns how the process ended.
async fn execute(
    req: &ExecRequest,
    env: &Vars,
    tx: &mut Sender,
    rx: Receiver,
) -> Result<ExitStatus> {
    let (mut child, pid) = spawn::spawn(req, env)?;
    let started = Instant::now();
    let Ok(pgid) = i32::try_from(pid) else {
        // Cannot happen on Linux (pids fit in 22 bits); never leave the process behind.
        let _ = child.start_kill();
        return Err(AgentError::Spawn {
            program: "process".into(),
            reason: format!("pid {pid} out of range"),
            io_kind: std::io::ErrorKind::Other,
        });
    };
    let group = GroupGuard(Some(pgid));
    tracing::debug!(pid, "started");
    send(tx, &GuestMessage::Started { pid }).await?;

    let input = TaskGuard(tokio::spawn(forward_input(rx, child.stdin.take(), pgid)));
    let timed_out = Arc::new(AtomicBool::new(false));
    let mut timer = req.timeout_ms.map(|ms| {
        let flag = Arc::clone(&timed_out);
        TaskGuard(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            flag.store(true, Ordering::SeqCst);
            tracing::debug!(pid, "timeout of {ms} ms passed; killing its process group");
            kill_group(pgid, libc::SIGKILL);
        }))
    });

    let mut stdout = Output::new(child.stdout.take(), req.max_output_bytes);
    let mut stderr = Output::new(child.stderr.take(), req.max_output_bytes);
    let mut exit: Option<(std::process::ExitStatus, Instant)> = None;
    let mut last_activity = Instant::now();
    loop {
        if exit.is_some() && !stdout.is_open() && !stderr.is_open() {
            break;
        }
        // Quiet time is counted from the exit at the earliest.
        let drain_deadline =
            exit.map(|(_, at)| (last_activity.max(at) + DRAIN_IDLE).min(at + DRAIN_MAX));
        tokio::select! {
            read = stdout.read(), if stdout.is_open() => {
                if let Some(chunk) = stdout.accept(read) {
                    send(tx, &GuestMessage::Stdout(chunk)).await?;
                }
                last_activity = Instant::now();
            }
            read = stderr.read(), if stderr.is_open() => {
                if let Some(chunk) = stderr.accept(read) {
                    send(tx, &GuestMessage::Stderr(chunk)).await?;
                }
                last_activity = Instant::now();
            }
            status = child.wait(), if exit.is_none() => {
                let status = status.map_err(|e| AgentError::io("wait for the process", e))?;
                timer = None;
                exit = Some((status, Instant::now()));
            }
            _ = sleep_until(drain_deadline), if drain_deadline.is_some() => {
                tracing::debug!(pid, "output still held open after exit; not waiting for it");
                break;
            }
        }
    }
    drop(timer);
    // Stop listening to the host before reporting, so its closing the stream after
    // `Exited` cannot kill background processes the command left running on purpose.
    input.stop().await;
    group.release();

    let (status, exited_at) = exit.ok_or_else(|| {
        AgentError::io(
            "wait for the process",
            std::io::Error::other("exit status missing"),
        )
    })?;
    Ok(ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out: timed_out.load(Ordering::SeqCst),
        stdout_truncated: stdout.truncated,
        stderr_truncated: stderr.truncated,
        duration_ms: exited_at.duration_since(started).as_millis() as u64,
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads the host's frames on an exec stream: stdin data, end of stdin, signals. When the
/// host's side ends, the process group is killed (the host no longer wants it).
async fn forward_input(mut rx: Receiver, mut stdin: Option<ChildStdin>, pgid: i32) {
    loop {
        let frame = match rx.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                tracing::debug!("exec stream unreadable: {e}");
                break;
            }
            None => break,
        };
        match decode::<HostMessage>(&frame) {
            Ok(HostMessage::Stdin(data)) => {
                if let Some(pipe) = stdin.as_mut() {
                    if pipe.write_all(&data).await.is_err() {
                        // The process closed its stdin; later data has nowhere to go.
                        stdin = None;
                    }
                }
            }
            Ok(HostMessage::StdinEof) => stdin = None,
            Ok(HostMessage::Signal(sig)) if (1..=MAX_SIGNAL).contains(&sig) => {
                kill_group(pgid, sig);
            }
            Ok(HostMessage::Signal(sig)) => tracing::warn!("ignoring invalid signal {sig}"),
            Ok(other) => tracing::warn!("ignoring {} on an exec stream", kind(&other)),
            Err(e) => tracing::warn!("ignoring a malformed frame on an exec stream: {e}"),
        }
    }
    tracing::debug!(
        pid = pgid,
        "host closed the exec stream; killing its process group"
    );
    kill_group(pgid, libc::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_cap_forwards_exactly_the_cap() {
        let mut out: Output<tokio::io::Empty> = Output::new(Some(tokio::io::empty()), 100);
        out.buf[..70].fill(b'a');
        assert_eq!(out.accept(Ok(70)).map(|b| b.len()), Some(70));
        assert!(!out.truncated);
        assert_eq!(out.accept(Ok(70)).map(|b| b.len()), Some(30));
        assert!(out.truncated);
        assert_eq!(out.accept(Ok(70)), None);
        assert_eq!(out.forwarded, 100);
        assert!(out.is_open());
        assert_eq!(out.accept(Ok(0)), None);
        assert!(!out.is_open());
    }

    #[test]
    fn zero_cap_forwards_nothing() {
        let mut out: Output<tokio::io::Empty> = Output::new(Some(tokio::io::empty()), 0);
        assert_eq!(out.accept(Ok(5)), None);
        assert!(out.truncated);
    }
}
