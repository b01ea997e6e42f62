//! A small QMP (QEMU Machine Protocol) client: JSON lines, bounded, with timeouts.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Longest QMP line we accept from QEMU.
const MAX_LINE: usize = 1 << 20;

/// A connected, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub async fn negotiate(stream: UnixStream, timeout: Duration) -> Result<Qmp> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_line(timeout).await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Qmp(format!("unexpected greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None, timeout).await?;
        Ok(qmp)
    }

    async fn read_line(&mut self, timeout: Duration) -> Result<Value> {
        let mut line = Vec::new();
        let fut = async {
            loop {
                let buf = self
                    .reader
                    .fill_buf()
                    .await
                    .map_err(|e| Error::Qmp(e.to_string()))?;
                if buf.is_empty() {
                    return Err(Error::Qmp("QEMU closed the monitor connection".into()));
                }
                let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (&buf[..=i], true),
                    None => (buf, false),
                };
                if line.len() + chunk.len() > MAX_LINE {
                    return Err(Error::Qmp("monitor line too long".into()));
                }
                line.extend_from_slice(chunk);
                let n = chunk.len();
                self.reader.consume(n);
                if done {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout {
                what: "the QEMU monitor".into(),
                secs: Some(timeout.as_secs_f64()),
            })??;
        serde_json::from_slice(&line).map_err(|e| Error::Qmp(format!("bad JSON from QEMU: {e}")))
    }

    /// Runs a command and returns its `return` value, skipping asynchronous events.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let mut req = json!({ "execute": command });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut bytes = req.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|e| Error::Qmp(format!("sending {command}: {e}")))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.read_line(left).await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Qmp(format!("{command}: {e}")));
            }
        }
    }
}
