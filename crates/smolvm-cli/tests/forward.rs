//! Port forwards with real VMs (network `none`: the bytes go through the agent channel):
//! HTTP from the host to a server in the guest, a MiB each way intact, listing in
//! `port`/`ls`/`inspect`, removal, refused guest ports, restart, delete, gc, bad input.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{boot, cli, poll_until, secs, sh, small};
use smolvm::{ExecOptions, Vm};

/// Starts `python3 -m http.server` on the guest's 127.0.0.1:8000, serving /srv/www, the way
/// a user would: a background process left by `smolvm exec`.
fn start_http_server(id: &str) {
    let out = cli(&[
        "exec",
        id,
        "--",
        "sh",
        "-c",
        "mkdir -p /srv/www && cd /srv/www && \
         nohup python3 -m http.server 8000 --bind 127.0.0.1 >/tmp/http.log 2>&1 &",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What an HTTP/1.0 GET got back.
struct Response {
    status: String,
    body: Vec<u8>,
    /// From connecting to the first byte of the answer.
    first_byte: Duration,
    /// From connecting to the end of the answer.
    total: Duration,
}

/// A plain HTTP/1.0 GET over a std TcpStream (no client library between us and the bytes).
fn http_get(port: u16, path: &str) -> std::io::Result<Response> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut first = [0u8; 1];
    if s.read(&mut first)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    let first_byte = t0.elapsed();
    let mut raw = first.to_vec();
    s.read_to_end(&mut raw)?;
    let total = t0.elapsed();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    Ok(Response {
        status: head.lines().next().unwrap_or_default().to_string(),
        body: raw[split + 4..].to_vec(),
        first_byte,
        total,
    })
}

/// Waits until the guest's HTTP server answers through the forward on `port`.
fn wait_http(port: u16) {
    poll_until(secs(90), "the guest's HTTP server to answer", || {
        http_get(port, "/").is_ok_and(|r| r.status.contains("200"))
    });
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Runs `smolvm port ...`; returns the host port from its `127.0.0.1:HOST -> guest:GUEST`.
fn expose(id: &str, spec: &str) -> u16 {
    let out = cli(&["port", id, spec]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "smolvm port {id} {spec}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let guest = spec.split(':').next().unwrap();
    let line = text.trim();
    assert!(
        line.starts_with("127.0.0.1:") && line.ends_with(&format!(" -> guest:{guest}")),
        "{line}"
    );
    line["127.0.0.1:".len()..line.find(' ').unwrap()]
        .parse()
        .unwrap()
}

fn refused(port: u16) -> bool {
    matches!(
        TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(5)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Binds 127.0.0.1:`port` ourselves, with SO_REUSEADDR as servers do (the forward's own
/// closed connections may linger in TIME_WAIT; a listener still holding the port would
/// make this fail all the same).
fn bind_reuse(port: u16) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own; it is closed on every error path
    // and otherwise handed to the TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let bound = libc::bind(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) == 0
            && libc::listen(fd, 16) == 0;
        if !bound {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(std::net::TcpListener::from_raw_fd(fd))
    }
}

/// A guest service on 127.0.0.1:9000 that reads until EOF, then answers with the byte
/// count and sha256 of what it got: checks uploads and half-close.
const SHA_SERVER: &str = r#"
import hashlib, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000))
s.listen(16)
while True:
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        h.update(d)
        n += len(d)
    c.sendall(("%d %s\n" % (n, h.hexdigest())).encode())
    c.close()
"#;

fn start_sha_server(vm: &Vm) {
    vm.write_file("/srv/sha_server.py", SHA_SERVER.as_bytes(), None)
        .unwrap();
    let out = vm
        .exec(&ExecOptions::shell(
            "nohup python3 /srv/sha_server.py >/tmp/sha.log 2>&1 &",
        ))
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
}

/// Uploads `data` to the sha server through the forward on `port`; returns its answer.
fn upload(port: u16, data: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

#[test]
fn a_forward_serves_http_and_a_mebibyte_each_way_without_a_network() {
    let vm = boot(small());
    let id = vm.id().to_string();
    start_http_server(&id);
    // Every CLI call is a process that exits: the forward outlives the one that made it.
    let port = expose(&id, "8000");
    wait_http(port);

    sh(&vm, "cd /srv/www && echo hello > hello.txt");
    let r = http_get(port, "/").unwrap();
    assert!(r.status.contains("200"), "{}", r.status);
    let listing = String::from_utf8_lossy(&r.body);
    assert!(listing.contains("Directory listing"), "{listing}");
    assert!(listing.contains("hello.txt"), "{listing}");
    let r = http_get(port, "/hello.txt").unwrap();
    assert_eq!(r.body, b"hello\n");
    eprintln!(
        "forward: small GET, connect to first byte {:.1} ms, total {:.1} ms",
        r.first_byte.as_secs_f64() * 1e3,
        r.total.as_secs_f64() * 1e3
    );

    // A MiB from the guest, intact.
    let guest_sum = sh(
        &vm,
        "cd /srv/www && head -c 1048576 /dev/urandom > blob && sha256sum blob",
    );
    let r = http_get(port, "/blob").unwrap();
    assert_eq!(r.body.len(), 1 << 20);
    assert_eq!(
        sha256(&r.body),
        guest_sum.split_whitespace().next().unwrap()
    );
    eprintln!(
        "forward: 1 MiB download, first byte {:.1} ms, total {:.1} ms ({:.1} MiB/s)",
        r.first_byte.as_secs_f64() * 1e3,
        r.total.as_secs_f64() * 1e3,
        mib_per_s(1 << 20, r.total)
    );

    // A MiB to the guest, then our half closes and the guest still answers (Rust API).
    start_sha_server(&vm);
    let up = vm.expose_local(9000, None, None).unwrap();
    assert_eq!((up.host_addr.as_str(), up.guest_port), ("127.0.0.1", 9000));
    assert_ne!(up.host_port, 0);
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut answer = String::new();
    poll_until(secs(60), "the guest's sha server", || {
        upload(up.host_port, b"ping").is_ok_and(|a| {
            answer = a;
            !answer.is_empty()
        })
    });
    let t0 = Instant::now();
    let answer = upload(up.host_port, &data).unwrap();
    let took = t0.elapsed();
    assert_eq!(answer, format!("{} {}\n", data.len(), sha256(&data)));
    eprintln!(
        "forward: 1 MiB upload with half-close, {:.1} ms ({:.1} MiB/s)",
        took.as_secs_f64() * 1e3,
        mib_per_s(data.len(), took)
    );

    // Round trips through a fresh connection each: connect, 4 bytes up, half-close, answer.
    let mut rtts: Vec<Duration> = (0..20)
        .map(|_| {
            let t0 = Instant::now();
            assert!(upload(up.host_port, b"ping").unwrap().starts_with("4 "));
            t0.elapsed()
        })
        .collect();
    rtts.sort();
    eprintln!(
        "forward: new connection + request + answer, p50 {:.1} ms, max {:.1} ms (20 runs)",
        rtts[10].as_secs_f64() * 1e3,
        rtts[19].as_secs_f64() * 1e3
    );

    // Listed by `port`, `ls`, `ls --json`, `inspect` and the API.
    let out = cli(&["port", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("127.0.0.1:{port} -> guest:8000")),
        "{text}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{} -> guest:9000", up.host_port)),
        "{text}"
    );
    let ls = String::from_utf8_lossy(&cli(&["ls"]).stdout).into_owned();
    assert!(ls.contains("PORTS"), "{ls}");
    let row = ls.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(row.contains(&format!("{port}->8000")), "{row}");
    let json: serde_json::Value = serde_json::from_slice(&cli(&["ls", "--json"]).stdout).unwrap();
    let mine = json
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id.as_str())
        .unwrap();
    assert_eq!(mine["forwards"].as_array().unwrap().len(), 2);
    let inspect: serde_json::Value =
        serde_json::from_slice(&cli(&["inspect", &id]).stdout).unwrap();
    assert!(inspect["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["host_port"] == port && f["guest_port"] == 8000));
    assert_eq!(vm.forwards().unwrap().len(), 2);
    assert_eq!(vm.active_forwards().unwrap().len(), 2);

    // Exposing the same thing again is a no-op; a port of another forward is refused.
    assert_eq!(expose(&id, &format!("8000:{port}")), port);
    let out = cli(&["port", &id, &format!("9000:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{port}")));

    // A guest port nothing listens on: the connection is closed cleanly (FIN, no reset),
    // whatever the client sent.
    let nothing = expose(&id, "9999");
    let mut s = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, nothing))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    assert_eq!(s.read_to_end(&mut buf).unwrap(), 0, "closed without data");
    // ... and the forward keeps serving once something listens.
    assert!(http_get(port, "/hello.txt").is_ok());

    // Removal closes the port.
    let out = cli(&["port", &id, "--rm", &nothing.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(refused(nothing), "port {nothing} still open after --rm");
    let out = cli(&["port", &id, "--rm", &nothing.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("host port {nothing}")));
    vm.unexpose(up.host_port).unwrap();
    assert!(refused(up.host_port));
    assert_eq!(vm.forwards().unwrap().len(), 1);

    vm.delete().unwrap();
}

#[test]
fn a_host_port_in_use_is_named_and_bad_input_is_a_usage_error() {
    let vm = boot(small());
    let id = vm.id().to_string();
    let taken = bind_reuse(0).unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let out = cli(&["port", &id, &format!("8000:{taken_port}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{taken_port} is already in use")),
        "{err}"
    );
    assert!(vm.forwards().unwrap().is_empty(), "nothing recorded");

    for bad in ["0", "70000", "x", "80:y", "80:70000", ""] {
        let out = cli(&["port", &id, bad]);
        assert_eq!(out.status.code(), Some(2), "port {bad:?}");
    }
    let out = cli(&["port", &id, "8000", "--bind", "localhost:80"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bind"));
    let out = cli(&["port", &id, "8000", "--rm", "80"]);
    assert_eq!(out.status.code(), Some(2), "--rm with a port to add");
    let out = cli(&["port", "no-such-vm", "80"]);
    assert_eq!(out.status.code(), Some(3));

    let err = vm.expose_local(0, None, None).unwrap_err();
    assert!(
        matches!(
            err,
            smolvm::Error::InvalidConfig {
                field: "guest_port",
                ..
            }
        ),
        "{err}"
    );
    // An explicit other address is honoured (here: IPv6 loopback, when the host has it).
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let f = vm
            .expose_local(8000, None, Some("::1".parse().unwrap()))
            .unwrap();
        assert_eq!(f.host_addr, "::1");
        assert!(f.to_string().starts_with("[::1]:"), "{f}");
        vm.unexpose(f.host_port).unwrap();
    }
    vm.delete().unwrap();
    drop(taken);
}

#[test]
fn forwards_come_back_after_a_restart_and_go_with_delete() {
    let vm = boot(small());
    let id = vm.id().to_string();
    let port = expose(&id, "8000");
    start_http_server(&id);
    wait_http(port);

    let out = cli(&["stop", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(refused(port), "the listener ends with the VM");
    // Still recorded while stopped.
    assert_eq!(vm.forwards().unwrap().len(), 1);
    assert!(vm.active_forwards().unwrap().is_empty());
    let listed = String::from_utf8_lossy(&cli(&["port", &id]).stdout).into_owned();
    assert!(
        listed.contains(&format!("127.0.0.1:{port} -> guest:8000")),
        "{listed}"
    );
    // A VM that is not running cannot get new forwards.
    let out = cli(&["port", &id, "8001"]);
    assert_eq!(out.status.code(), Some(1));

    // Started again while another program holds the host port: the VM starts, the forward
    // stays recorded, and `start` and `port` say it is not active.
    let squatter = bind_reuse(port).unwrap();
    let out = cli(&["start", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port} -> guest:8000 is not active")),
        "{err}"
    );
    assert!(vm.active_forwards().unwrap().is_empty());
    let listed = String::from_utf8_lossy(&cli(&["port", &id]).stdout).into_owned();
    assert!(listed.contains("(not active"), "{listed}");
    // Once the port is free, exposing it again brings the recorded forward back.
    drop(squatter);
    assert_eq!(expose(&id, &format!("8000:{port}")), port);
    assert_eq!(vm.forwards().unwrap().len(), 1);
    assert_eq!(vm.active_forwards().unwrap(), vm.forwards().unwrap());
    // And a plain restart re-establishes it by itself.
    vm.stop(false).unwrap();
    common::start(&vm);
    assert_eq!(vm.active_forwards().unwrap(), vm.forwards().unwrap());
    // The guest rebooted: its server is new, the host port is the same.
    start_http_server(&id);
    wait_http(port);
    assert_eq!(
        http_get(port, "/").unwrap().status.split(' ').nth(1),
        Some("200")
    );

    vm.delete().unwrap();
    assert!(refused(port));
    let rt = common::runtime();
    assert!(matches!(
        rt.get(&id).and_then(|v| v.forwards()),
        Err(smolvm::Error::VmNotFound(_))
    ));
    let mine = bind_reuse(port).expect("the host port is free after delete");
    drop(mine);
}

#[test]
fn gc_removes_forwards_of_vms_that_are_gone() {
    // A state directory of its own: gc must not race the other tests' VMs.
    let home = tempfile::Builder::new()
        .prefix("smolvm-fwd-gc-")
        .tempdir_in("/tmp")
        .unwrap();
    let store = smolvm::store::Store::open(&home.path().join("smolvm.db")).unwrap();
    let ghost = smolvm::ForwardInfo {
        host_addr: "127.0.0.1".into(),
        host_port: 4321,
        guest_port: 80,
    };
    store.add_forward("ghost", &ghost).unwrap();
    let out = Command::new(common::bin())
        .args(["gc", "--json"])
        .env("SMOLVM_HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["removed_forwards"],
        serde_json::json!(["ghost 127.0.0.1:4321 -> guest:80"])
    );
    assert!(store.all_forwards().unwrap().is_empty());
}
