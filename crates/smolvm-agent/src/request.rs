//! One yamux stream = one request. Its first frame says what kind: a handshake (`Hello`),
//! a liveness probe (`Ping`), a process to run (`Exec`), a change to the persistent
//! environment (`Env`, answered with the whole environment), a clean shutdown (`Shutdown`,
//! answered with `Ok`; see [`crate::shutdown`]), a tunnel to a guest TCP port (`Connect`,
//! answered with `Ok`, then raw bytes; see [`connect`]) or a new network identity for a
//! restored guest (`Network`, answered with `Ok`; see [`crate::net::reconfigure_ethernet`]).

mod connect;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Sink, SinkExt, StreamExt};
use smolvm_protocol::boot::GuestNet;
use smolvm_protocol::{
    codec, decode, encode, EnvUpdate, ErrorKind, GuestMessage, HostMessage, WireError,
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::error::{AgentError, Result};
use crate::server::{Context, ServerConfig};
use crate::{exec, handshake, net, shutdown};

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
        HostMessage::Network(_) => "Network",
    }
}

/// Serves one stream.
pub async fn handle(stream: yamux::Stream, ctx: Arc<Context>) {
    let mut transport = Framed::new(stream.compat(), codec());
    let first = match transport.next().await {
        None => return,
        Some(Err(e)) => {
            let why = WireError::new(ErrorKind::Io, format!("unreadable request: {e}"));
            return refuse(transport, why).await;
        }
        Some(Ok(frame)) => frame,
    };
    match decode::<HostMessage>(&first) {
        Ok(HostMessage::Exec(req)) => exec::run(req, transport, ctx.env.snapshot()).await,
        Ok(HostMessage::Env(update)) => env(transport, &update, &ctx).await,
        Ok(HostMessage::Shutdown) => shutdown::handle(transport, ctx).await,
        Ok(HostMessage::Connect { port }) => connect::handle(transport, port).await,
        Ok(HostMessage::Network(guest_net)) => network(transport, guest_net, &ctx).await,
        Ok(msg @ (HostMessage::Hello(_) | HostMessage::Ping(_))) => {
            control(transport, msg, &ctx.cfg).await
        }
        Ok(other) => {
            let why = format!(
                "unexpected first message {}: a stream starts with Hello, Ping, Exec, Env, \
                 Shutdown, Connect or Network",
                kind(&other)
            );
            refuse(transport, WireError::new(ErrorKind::InvalidInput, why)).await
        }
        Err(e) => {
            let why = WireError::new(ErrorKind::InvalidInput, format!("malformed request: {e}"));
            refuse(transport, why).await
        }
    }
}

/// Answers with an error and closes the stream.
async fn refuse(mut transport: Transport, why: WireError) {
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
            GuestMessage::Error(e.to_wire())
        }
    };
    let _ = send(&mut transport, &reply).await;
    close(&mut transport).await;
}

/// Longest a `Network` request may take (waiting for the interface takes at most
/// [`net::ETHERNET_WAIT`]; the ioctls take microseconds).
pub const NETWORK_LIMIT: Duration = Duration::from_secs(5);

/// A network stream: gives the first Ethernet interface the configuration `guest_net`,
/// replacing what it had, answers `Ok` or why not, and closes. Only an agent that may set
/// the machine's identity (`--apply-identity`, always as PID 1) changes its network; it
/// looks for interfaces and writes `resolv.conf` under its state root (`/` in a guest).
async fn network(mut transport: Transport, guest_net: GuestNet, ctx: &Context) {
    let reply = match reconfigure(guest_net, ctx).await {
        Ok(()) => GuestMessage::Ok,
        Err(why) => {
            tracing::warn!("{why}");
            GuestMessage::Error(why)
        }
    };
    let _ = send(&mut transport, &reply).await;
    close(&mut transport).await;
}

/// Why an agent without `--apply-identity` refuses a `Network` request.
const NOT_APPLYING_IDENTITY: &str = "network not reconfigured: this agent does not change \
    the network of the machine it runs on (it was started without --apply-identity)";

/// Carries out a `Network` request off the async thread, within [`NETWORK_LIMIT`].
async fn reconfigure(guest_net: GuestNet, ctx: &Context) -> std::result::Result<(), WireError> {
    if !ctx.cfg.apply_identity {
        return Err(WireError::new(
            ErrorKind::Unsupported,
            NOT_APPLYING_IDENTITY,
        ));
    }
    let sys_class_net = ctx
        .cfg
        .state_root
        .join(net::SYS_CLASS_NET.trim_start_matches('/'));
    let resolv_conf = ctx
        .cfg
        .state_root
        .join(net::RESOLV_CONF.trim_start_matches('/'));
    let summary = format!(
        "{}/{} via {} mtu {}",
        guest_net.addr, guest_net.prefix, guest_net.gateway, guest_net.mtu
    );
    let work = tokio::task::spawn_blocking(move || {
        net::reconfigure_ethernet(&sys_class_net, &resolv_conf, &guest_net)
    });
    match tokio::time::timeout(NETWORK_LIMIT, work).await {
        Ok(Ok(Ok(name))) => {
            tracing::info!("{name} reconfigured: {summary}");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(WireError::new(
            e.kind(),
            format!("network not reconfigured ({summary}): {e}"),
        )),
        Ok(Err(e)) => Err(WireError::new(
            ErrorKind::Io,
            format!("network not reconfigured ({summary}): {e}"),
        )),
        Err(_) => Err(WireError::new(
            ErrorKind::Timeout,
            format!(
                "network not reconfigured ({summary}): it took longer than {} s",
                NETWORK_LIMIT.as_secs()
            ),
        )),
    }
}

/// A handshake or ping stream: answers `Hello` and `Ping` until the host closes it.
async fn control(mut transport: Transport, first: HostMessage, cfg: &ServerConfig) {
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        let reply = match msg {
            HostMessage::Hello(hello) => handshake::answer(&hello, cfg.apply_identity),
            HostMessage::Ping(n) => GuestMessage::Pong(n),
            other => GuestMessage::Error(WireError::new(
                ErrorKind::InvalidInput,
                format!("unexpected {} on a handshake stream", kind(&other)),
            )),
        };
        let failed = matches!(reply, GuestMessage::Error(_));
        if send(&mut transport, &reply).await.is_err() || failed {
            break;
        }
        next = match transport.next().await {
            Some(Ok(frame)) => match decode::<HostMessage>(&frame) {
                Ok(msg) => Some(msg),
                Err(e) => {
                    let why =
                        WireError::new(ErrorKind::InvalidInput, format!("malformed message: {e}"));
                    return refuse(transport, why).await;
                }
            },
            Some(Err(e)) => {
                let why = WireError::new(ErrorKind::Io, format!("unreadable message: {e}"));
                return refuse(transport, why).await;
            }
            None => None,
        };
    }
    close(&mut transport).await;
}
