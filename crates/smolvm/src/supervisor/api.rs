//! The VM's API socket: one request per connection, from any local process of the owner.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use smolvm_protocol::{
    decode, encode, ApiHello, ApiHelloReply, ApiReply, ApiRequest, ErrorKind, ExecRequest,
    GuestMessage, HostMessage, VmStatus, WireError, API_MAGIC, API_VERSION,
};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

use super::agent_link::{self, AgentLink};
use super::forward::Forwards;

/// A stop request: the grace period in ms, and where the main loop says it is done. It
/// hands over a sender on which the handler confirms it has replied, so the supervisor exits
/// only after the client has its answer.
pub type StopRequest = (u64, oneshot::Sender<oneshot::Sender<()>>);

/// Requests only the supervisor's main loop can carry out (it owns the QEMU monitor).
#[derive(Debug)]
pub enum Control {
    /// Freeze the vCPUs.
    Pause,
    /// Unfreeze them.
    Resume,
    /// Save memory, devices and disk into this directory; the VM goes on as it was.
    Snapshot(std::path::PathBuf),
}

/// A control request and where its outcome goes.
pub type ControlRequest = (Control, oneshot::Sender<Result<(), WireError>>);

/// Longest a control request may take (a snapshot writes the guest's memory).
const CONTROL_LIMIT: std::time::Duration = std::time::Duration::from_secs(150);

/// What request handlers share.
pub struct Shared {
    /// Asks the main loop to pause, resume or snapshot the VM.
    pub control_tx: mpsc::Sender<ControlRequest>,
    /// The agent session.
    pub link: AgentLink,
    /// The status reported to clients.
    pub status: VmStatus,
    /// Asks the main loop to stop the VM.
    pub stop_tx: mpsc::Sender<StopRequest>,
    /// The VM's port forwards.
    pub forwards: Forwards,
}

type ClientFramed = Framed<UnixStream, tokio_util::codec::LengthDelimitedCodec>;

/// Whether the peer runs as our own user (or root).
pub fn peer_allowed(stream: &UnixStream) -> bool {
    match stream.peer_cred() {
        Ok(cred) => {
            let me = nix::unistd::geteuid().as_raw();
            cred.uid() == me || cred.uid() == 0
        }
        Err(_) => false,
    }
}

/// Serves one client connection.
pub async fn handle(stream: UnixStream, shared: Arc<Shared>) {
    if !peer_allowed(&stream) {
        tracing::warn!("refused API connection from another user");
        return;
    }
    let mut client = Framed::new(stream, smolvm_protocol::codec());
    if !greet(&mut client).await {
        return;
    }
    let req = match tokio::time::timeout(FIRST_FRAME, client.next()).await {
        Ok(Some(Ok(bytes))) => match decode::<ApiRequest>(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let why = WireError::new(ErrorKind::InvalidInput, format!("bad request: {e}"));
                let _ = reply(&mut client, &ApiReply::Error(why)).await;
                return;
            }
        },
        _ => return,
    };
    match req {
        ApiRequest::Status => {
            let _ = reply(&mut client, &ApiReply::Status(shared.status.clone())).await;
        }
        ApiRequest::Stop { graceful_ms } => {
            let (tx, rx) = oneshot::channel();
            let replied = if shared.stop_tx.send((graceful_ms, tx)).await.is_ok() {
                rx.await.ok()
            } else {
                None
            };
            let _ = reply(&mut client, &ApiReply::Ok).await;
            if let Some(replied) = replied {
                let _ = replied.send(());
            }
        }
        ApiRequest::Exec(req) => relay_exec(client, &shared.link, req).await,
        ApiRequest::Env(update) => {
            let r = match shared.link.env(update).await {
                Ok(vars) => ApiReply::Env(vars),
                Err(e) => ApiReply::Error(e.into_wire()),
            };
            let _ = reply(&mut client, &r).await;
        }
        ApiRequest::Expose {
            guest_port,
            host_port,
            bind,
        } => {
            let r = match shared
                .forwards
                .expose(guest_port, host_port, bind.as_deref())
                .await
            {
                Ok(info) => ApiReply::Forward(info),
                Err(e) => ApiReply::Error(e.into_wire()),
            };
            let _ = reply(&mut client, &r).await;
        }
        ApiRequest::Unexpose { host_port } => {
            let r = match shared.forwards.unexpose(host_port).await {
                Ok(()) => ApiReply::Ok,
                Err(e) => ApiReply::Error(e.into_wire()),
            };
            let _ = reply(&mut client, &r).await;
        }
        ApiRequest::Forwards => {
            let _ = reply(&mut client, &ApiReply::Forwards(shared.forwards.list())).await;
        }
        ApiRequest::Pause => control(&mut client, &shared, Control::Pause).await,
        ApiRequest::Resume => control(&mut client, &shared, Control::Resume).await,
        ApiRequest::Snapshot { dir } => {
            let dir = std::path::PathBuf::from(dir);
            if !dir.is_absolute() || !dir.is_dir() {
                let why = WireError::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "snapshot directory {} is not an existing absolute path",
                        dir.display()
                    ),
                );
                let _ = reply(&mut client, &ApiReply::Error(why)).await;
                return;
            }
            control(&mut client, &shared, Control::Snapshot(dir)).await
        }
    }
}

/// Hands a control request to the main loop and answers with its outcome.
async fn control(client: &mut ClientFramed, shared: &Shared, what: Control) {
    let (tx, rx) = oneshot::channel();
    let stopping = || WireError::new(ErrorKind::GuestGone, "the VM is stopping");
    let outcome = if shared.control_tx.send((what, tx)).await.is_err() {
        Err(stopping())
    } else {
        match tokio::time::timeout(CONTROL_LIMIT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(stopping()),
            Err(_) => Err(WireError::new(
                ErrorKind::Timeout,
                format!(
                    "the VM's supervisor to carry out the request (for {} s)",
                    CONTROL_LIMIT.as_secs()
                ),
            )),
        }
    };
    let r = match outcome {
        Ok(()) => ApiReply::Ok,
        Err(e) => ApiReply::Error(e),
    };
    let _ = reply(client, &r).await;
}

/// Longest wait for a client's hello, then for its request.
const FIRST_FRAME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the client's [`ApiHello`] and answers it; true when the request may follow. A
/// client of another API version (or one that sends no hello) gets a typed refusal naming
/// both versions, and the connection ends.
async fn greet(client: &mut ClientFramed) -> bool {
    let hello = match tokio::time::timeout(FIRST_FRAME, client.next()).await {
        Ok(Some(Ok(bytes))) => decode::<ApiHello>(&bytes).ok(),
        _ => return false,
    };
    let refused = match hello {
        Some(h) if h.magic == API_MAGIC && h.api_version == API_VERSION => None,
        Some(h) if h.magic == API_MAGIC => Some(WireError::new(
            ErrorKind::Refused,
            format!(
                "this VM's supervisor speaks API version {API_VERSION}, the client speaks {}: \
                 stop the VM and start it again with the client's smolvm, or use the smolvm \
                 that started it",
                h.api_version
            ),
        )),
        _ => Some(WireError::new(
            ErrorKind::InvalidInput,
            format!(
                "an API connection starts with a hello (API version {API_VERSION}); the client \
                 sent none, so it predates API versions: use the smolvm that started the VM"
            ),
        )),
    };
    let ok = refused.is_none();
    let answer = ApiHelloReply {
        magic: API_MAGIC,
        api_version: API_VERSION,
        refused,
    };
    match encode(&answer) {
        Ok(bytes) => client.send(bytes::Bytes::from(bytes)).await.is_ok() && ok,
        Err(_) => false,
    }
}

async fn reply(client: &mut ClientFramed, r: &ApiReply) -> Result<(), ()> {
    let bytes = encode(r).map_err(|_| ())?;
    client.send(bytes::Bytes::from(bytes)).await.map_err(|_| ())
}

async fn to_client(client: &mut ClientFramed, m: &GuestMessage) -> bool {
    match encode(m) {
        Ok(bytes) => client.send(bytes::Bytes::from(bytes)).await.is_ok(),
        Err(_) => false,
    }
}

/// Relays one exec between a client and a fresh agent stream. Guest frames are decoded
/// (bounded) and re-encoded, so nothing malformed reaches the client; client frames other
/// than stdin and signals are refused.
async fn relay_exec(mut client: ClientFramed, link: &AgentLink, req: ExecRequest) {
    let mut agent = match link.open().await {
        Ok(a) => a,
        Err(e) => {
            let _ = to_client(&mut client, &GuestMessage::Error(e.into_wire())).await;
            return;
        }
    };
    if let Err(e) = agent_link::send(&mut agent, &HostMessage::Exec(req)).await {
        let _ = to_client(&mut client, &GuestMessage::Error(e.into_wire())).await;
        return;
    }
    let went_away = |reason: String| {
        GuestMessage::Error(WireError::new(
            ErrorKind::GuestGone,
            format!("the guest agent went away: {reason}"),
        ))
    };
    loop {
        tokio::select! {
            m = client.next() => {
                let msg = match m {
                    Some(Ok(bytes)) => decode::<HostMessage>(&bytes).ok(),
                    _ => None,
                };
                match msg {
                    Some(m @ (HostMessage::Stdin(_) | HostMessage::StdinEof | HostMessage::Signal(_))) => {
                        if agent_link::send(&mut agent, &m).await.is_err() {
                            let reason = link.closed_reason().unwrap_or_else(|| "agent stream failed".into());
                            let _ = to_client(&mut client, &went_away(reason)).await;
                            return;
                        }
                    }
                    Some(_) => {
                        let why = WireError::new(ErrorKind::InvalidInput, "only stdin and signals may follow an exec request");
                        let _ = to_client(&mut client, &GuestMessage::Error(why)).await;
                        let _ = agent_link::send(&mut agent, &HostMessage::Signal(9)).await;
                        return;
                    }
                    None => {
                        // The client went away: kill the process, no orphans.
                        let _ = agent_link::send(&mut agent, &HostMessage::Signal(9)).await;
                        return;
                    }
                }
            }
            m = agent_link::recv(&mut agent) => {
                match m {
                    Ok(Some(msg)) => {
                        let last = matches!(msg, GuestMessage::Exited(_) | GuestMessage::Error(_));
                        if !to_client(&mut client, &msg).await {
                            let _ = agent_link::send(&mut agent, &HostMessage::Signal(9)).await;
                            return;
                        }
                        if last {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        // Give the session driver a moment to record why it ended.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let reason = link
                            .closed_reason()
                            .unwrap_or_else(|| "the agent closed the stream without an exit status".into());
                        let _ = to_client(&mut client, &went_away(reason)).await;
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The supervisor's side of the hello, over a real socket pair: its own version is
    /// accepted, another version and a frame that is no hello get a typed refusal.
    #[tokio::test]
    async fn a_client_of_another_version_gets_a_typed_refusal() {
        let cases = [
            (
                encode(&ApiHello {
                    magic: API_MAGIC,
                    api_version: API_VERSION,
                })
                .unwrap(),
                None,
            ),
            (
                encode(&ApiHello {
                    magic: API_MAGIC,
                    api_version: API_VERSION + 1,
                })
                .unwrap(),
                Some(ErrorKind::Refused),
            ),
            // A client from before API versions sends its request first (here `Status`).
            (vec![1], Some(ErrorKind::InvalidInput)),
        ];
        for (hello, refused) in cases {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let mut server = Framed::new(ours, smolvm_protocol::codec());
            let mut client = Framed::new(theirs, smolvm_protocol::codec());
            client.send(bytes::Bytes::from(hello)).await.unwrap();
            let go_on = greet(&mut server).await;
            let answer = client.next().await.unwrap().unwrap();
            let answer: ApiHelloReply = decode(&answer).unwrap();
            assert_eq!(answer.magic, API_MAGIC);
            assert_eq!(answer.api_version, API_VERSION);
            assert_eq!(
                answer.refused.as_ref().map(|e| e.kind),
                refused,
                "{answer:?}"
            );
            assert_eq!(go_on, refused.is_none());
            if let Some(e) = answer.refused {
                assert!(
                    e.message.contains(&format!("API version {API_VERSION}")),
                    "{e}"
                );
                if refused == Some(ErrorKind::Refused) {
                    assert!(
                        e.message
                            .contains(&format!("the client speaks {}", API_VERSION + 1)),
                        "{e}"
                    );
                }
            }
        }
    }
}
