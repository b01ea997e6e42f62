//! One yamux stream = one request. Its first frame says what kind: a handshake (`Hello`),
//! a liveness probe (`Ping`), a process to run (`Exec`), a change to the persistent
//! environment (`Env`, answered with the whole environment), a clean shutdown (`Shutdown`,
//! answered with `Ok`; see [`crate::shutdown`]) or a tunnel to a guest TCP port (`Connect`,
//! answered with `Ok`, then raw bytes; see [`connect`]).

mod connect;

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Sink, SinkExt, StreamExt};
use smolvm_protocol::{codec, decode, encode, EnvUpdate, GuestMessage, HostMessage};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::error::{AgentError, Result};
use crate::server::{Context, ServerConfig};
use crate::{exec, handshake, shutdown};

/// A yamux stream carrying length-prefixed frames.
pub type Transport = Framed<Compat<yamux::Stream>, LengthDelimitedCodec>;

/// Encodes and sends one message, waiting for the stream to take it (backpressure).
pub async fn send<S>(sink: &mut S, msg: &GuestMessage) -> Result<()>
where
    S: Sink<Bytes, Error = io::Error> + Unpin,
{
    let payload = encode(msg)?;
    sink.send(Bytes::from(payload))
        .await
        .map_err(|e| AgentError::io("send to the host", e))
}

/// Closes our side of the stream (yamux FIN) after flushing what is queued.
pub async fn close<S>(sink: &mut S)
where
    S: Sink<Bytes, Error = io::Error> + Unpin,
{
    let _ = sink.close().await;
}

/// The name of a message's variant, for error messages.
pub fn kind(msg: &HostMessage) -> &'static str {
    match msg {
        HostMessage::Hello(_) => "Hello",
        HostMessage::Exec(_) => "Exec",
        HostMessage::Stdin(_) => "Stdin",
        HostMessage::StdinEof => "StdinEof",
        HostMessage::Signal(_) => "Signal",
        HostMessage::Ping(_) => "Ping",
        HostMessage::Env(_) => "Env",
        HostMessage::Shutdown => "Shutdown",
        HostMessage::Connect { .. } => "Connect",
    }
}

/// Serves one stream.
pub async fn handle(stream: yamux::Stream, ctx: Arc<Context>) {
    let mut transport = Framed::new(stream.compat(), codec());
    let first = match transport.next().await {
        None => return,
        Some(Err(e)) => return refuse(transport, format!("unreadable request: {e}")).await,
        Some(Ok(frame)) => frame,
    };
    match decode::<HostMessage>(&first) {
        Ok(HostMessage::Exec(req)) => exec::run(req, transport, ctx.env.snapshot()).await,
        Ok(HostMessage::Env(update)) => env(transport, &update, &ctx).await,
        Ok(HostMessage::Shutdown) => shutdown::handle(transport, ctx).await,
        Ok(HostMessage::Connect { port }) => connect::handle(transport, port).await,
        Ok(msg @ (HostMessage::Hello(_) | HostMessage::Ping(_))) => {
            control(transport, msg, &ctx.cfg).await
        }
        Ok(other) => {
            let why = format!(
                "unexpected first message {}: a stream starts with Hello, Ping, Exec, Env, \
                 Shutdown or Connect",
                kind(&other)
            );
            refuse(transport, why).await
        }
        Err(e) => refuse(transport, format!("malformed request: {e}")).await,
    }
}

/// Answers with an error and closes the stream.
async fn refuse(mut transport: Transport, why: String) {
    tracing::debug!("refusing a stream: {why}");
    let _ = send(&mut transport, &GuestMessage::Error(why)).await;
    close(&mut transport).await;
}

/// An environment stream: applies the update, answers with the whole environment (or why
/// nothing changed) and closes.
async fn env(mut transport: Transport, update: &EnvUpdate, ctx: &Context) {
    tracing::debug!(
        clear = update.clear,
        unset = update.unset.len(),
        set = update.set.len(),
        "environment update"
    );
    let reply = match ctx.env.update(update).await {
        Ok(vars) => GuestMessage::Env(vars),
        Err(e) => {
            tracing::warn!("environment update refused: {e}");
            GuestMessage::Error(e.to_string())
        }
    };
    let _ = send(&mut transport, &reply).await;
    close(&mut transport).await;
}

/// A handshake or ping stream: answers `Hello` and `Ping` until the host closes it.
async fn control(mut transport: Transport, first: HostMessage, cfg: &ServerConfig) {
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        let reply = match msg {
            HostMessage::Hello(hello) => handshake::answer(&hello, cfg.apply_identity),
            HostMessage::Ping(n) => GuestMessage::Pong(n),
            other => {
                GuestMessage::Error(format!("unexpected {} on a handshake stream", kind(&other)))
            }
        };
        let failed = matches!(reply, GuestMessage::Error(_));
        if send(&mut transport, &reply).await.is_err() || failed {
            break;
        }
        next = match transport.next().await {
            Some(Ok(frame)) => match decode::<HostMessage>(&frame) {
                Ok(msg) => Some(msg),
                Err(e) => return refuse(transport, format!("malformed message: {e}")).await,
            },
            Some(Err(e)) => return refuse(transport, format!("unreadable message: {e}")).await,
            None => None,
        };
    }
    close(&mut transport).await;
}
