//! Running commands from Python: the command runs on a worker thread while the calling
//! thread waits with the GIL released, wakes every 100 ms to deliver output to callbacks
//! and to notice Ctrl-C; an interrupted command is cancelled (killed in the guest).

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use smolvm::{CancelToken, Error, ExecOptions, ExecOutput, OutputStream, Vm};

use crate::errors::{raise, to_py};

/// How often a waiting call looks for Ctrl-C.
const POLL: Duration = Duration::from_millis(100);
/// Output chunks queued between the worker and Python before the guest is slowed down.
const QUEUE: usize = 64;
/// How long an interrupted call waits for its command to be torn down.
const TEARDOWN: Duration = Duration::from_secs(5);

/// What the worker thread reports.
pub enum Event {
    /// A chunk of output.
    Out(OutputStream, Vec<u8>),
    /// The command ended (or could not run).
    Done(smolvm::Result<ExecOutput>),
}

/// How a command is asked for from Python.
pub struct Request {
    /// What to run and how.
    pub opts: ExecOptions,
    /// The timeout in seconds, as given (for the timeout exception).
    pub timeout: Option<f64>,
}

fn invalid(py: Python<'_>, field: &'static str, value: String, allowed: &str) -> PyErr {
    to_py(
        py,
        Error::InvalidConfig {
            field,
            value,
            allowed: allowed.into(),
        },
    )
}

/// Builds the runtime's options from `run()`'s arguments; errors name the argument.
pub fn request(
    py: Python<'_>,
    command: &Bound<'_, PyAny>,
    timeout: Option<f64>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<String>,
    stdin: Option<Vec<u8>>,
    max_output_bytes: Option<u64>,
) -> PyResult<Request> {
    let mut opts = if command.is_instance_of::<PyString>() {
        ExecOptions::shell(command.extract::<String>()?)
    } else if command.is_instance_of::<PyList>() || command.hasattr("__iter__")? {
        let argv: Vec<String> = command.extract().map_err(|_| {
            invalid(
                py,
                "command",
                command.repr().map(|r| r.to_string()).unwrap_or_default(),
                "a shell command string, or a list of strings (program and arguments)",
            )
        })?;
        ExecOptions::argv(argv)
    } else {
        return Err(invalid(
            py,
            "command",
            command.repr().map(|r| r.to_string()).unwrap_or_default(),
            "a shell command string, or a list of strings (program and arguments)",
        ));
    };
    if let Some(t) = timeout {
        let d = Duration::try_from_secs_f64(t)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                invalid(
                    py,
                    "timeout",
                    t.to_string(),
                    "a number of seconds above 0, or None for no limit",
                )
            })?;
        opts = opts.timeout(d);
    }
    for (k, v) in env.unwrap_or_default() {
        opts = opts.env(k, v);
    }
    if let Some(c) = cwd {
        opts = opts.cwd(c);
    }
    if let Some(s) = stdin {
        opts = opts.stdin(s);
    }
    if let Some(m) = max_output_bytes {
        if m == 0 {
            return Err(invalid(
                py,
                "max_output_bytes",
                "0".into(),
                "a positive number of bytes",
            ));
        }
        opts = opts.max_output(m);
    }
    opts.validate().map_err(|e| to_py(py, e))?;
    Ok(Request { opts, timeout })
}

/// Starts the command on a worker thread; chunks are forwarded only when `forward`.
pub fn spawn(vm: Vm, opts: ExecOptions, forward: bool, collect: bool) -> PyResult<Receiver<Event>> {
    let (tx, rx) = mpsc::sync_channel::<Event>(QUEUE);
    std::thread::Builder::new()
        .name("smolvm-exec".into())
        .spawn(move || {
            let chunks = tx.clone();
            let mut sink = |s: OutputStream, d: &[u8]| {
                if forward {
                    let _ = chunks.send(Event::Out(s, d.to_vec()));
                }
            };
            let res = if collect {
                vm.exec_tee(&opts, &mut sink)
            } else {
                vm.exec_streaming(&opts, &mut sink)
            };
            let _ = tx.send(Event::Done(res));
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a thread: {e}")))?;
    Ok(rx)
}

/// Waits up to [`POLL`] for the next event with the GIL released.
fn next_event(
    py: Python<'_>,
    rx: Receiver<Event>,
) -> (Receiver<Event>, Result<Event, RecvTimeoutError>) {
    py.allow_threads(move || {
        let ev = rx.recv_timeout(POLL);
        (rx, ev)
    })
}

/// After an interruption: cancels the command and waits (bounded) for its worker to end,
/// so the guest process is gone before the exception reaches the caller.
pub fn cancel_and_drain(py: Python<'_>, token: &CancelToken, rx: Receiver<Event>) {
    token.cancel();
    py.allow_threads(move || {
        let until = std::time::Instant::now() + TEARDOWN;
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Event::Done(_)) | Err(_) => break,
                Ok(Event::Out(..)) => {}
            }
        }
    });
}

/// The result dict handed to Python, or the timeout exception.
pub fn finish<'py>(
    py: Python<'py>,
    res: smolvm::Result<ExecOutput>,
    timeout: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let out = res.map_err(|e| to_py(py, e))?;
    if out.timed_out {
        let secs = timeout.unwrap_or(0.0);
        return Err(raise(
            py,
            "OperationTimeoutError",
            format!(
                "the command did not finish within {secs} s; it was killed with its process group"
            ),
            &[
                (
                    "operation",
                    PyString::new(py, "command").into_any().unbind(),
                ),
                (
                    "timeout_seconds",
                    secs.into_pyobject(py)?.into_any().unbind(),
                ),
                ("stdout", PyBytes::new(py, &out.stdout).into_any().unbind()),
                ("stderr", PyBytes::new(py, &out.stderr).into_any().unbind()),
            ],
        ));
    }
    let d = PyDict::new(py);
    d.set_item("exit_code", out.shell_code())?;
    d.set_item("signal", out.signal)?;
    d.set_item("stdout", PyBytes::new(py, &out.stdout))?;
    d.set_item("stderr", PyBytes::new(py, &out.stderr))?;
    d.set_item("truncated", out.stdout_truncated || out.stderr_truncated)?;
    d.set_item("duration", out.duration.as_secs_f64())?;
    Ok(d)
}

fn stream_name(s: OutputStream) -> &'static str {
    match s {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    }
}

/// Runs a command to its end, calling `on_stdout`/`on_stderr` with each chunk (bytes).
pub fn run<'py>(
    py: Python<'py>,
    vm: &Vm,
    req: Request,
    on_stdout: Option<PyObject>,
    on_stderr: Option<PyObject>,
) -> PyResult<Bound<'py, PyDict>> {
    let token = CancelToken::new();
    let opts = req.opts.cancel_with(token.clone());
    let forward = on_stdout.is_some() || on_stderr.is_some();
    let mut rx = spawn(vm.clone(), opts, forward, true)?;
    loop {
        let (back, ev) = next_event(py, rx);
        rx = back;
        match ev {
            Ok(Event::Out(s, data)) => {
                let cb = match s {
                    OutputStream::Stdout => &on_stdout,
                    OutputStream::Stderr => &on_stderr,
                };
                if let Some(cb) = cb {
                    if let Err(e) = cb.call1(py, (PyBytes::new(py, &data),)) {
                        cancel_and_drain(py, &token, rx);
                        return Err(e);
                    }
                }
            }
            Ok(Event::Done(res)) => return finish(py, res, req.timeout),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err(
                    "the command's worker thread ended without a result",
                ))
            }
        }
        if let Err(e) = py.check_signals() {
            cancel_and_drain(py, &token, rx);
            return Err(e);
        }
    }
}

/// A command whose output is read as it comes: iterate for `(stream, bytes)` pairs; when
/// the iteration ends, `result()` holds the exit status. Dropping or `cancel()`ing it
/// before the end kills the command in the guest.
#[pyclass(module = "smolvm._native", frozen)]
pub struct ExecStream {
    rx: Mutex<Option<Receiver<Event>>>,
    token: CancelToken,
    timeout: Option<f64>,
    result: Mutex<Option<Py<PyDict>>>,
}

impl ExecStream {
    /// Starts `req` on `vm`.
    pub fn start(vm: &Vm, req: Request) -> PyResult<ExecStream> {
        let token = CancelToken::new();
        let opts = req.opts.cancel_with(token.clone());
        let rx = spawn(vm.clone(), opts, true, false)?;
        Ok(ExecStream {
            rx: Mutex::new(Some(rx)),
            token,
            timeout: req.timeout,
            result: Mutex::new(None),
        })
    }
}

#[pymethods]
impl ExecStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(&'static str, Py<PyBytes>)>> {
        let mut guard = self
            .rx
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("this stream is being read by another thread"))?;
        let Some(mut rx) = guard.take() else {
            return Ok(None);
        };
        loop {
            let (back, ev) = next_event(py, rx);
            rx = back;
            match ev {
                Ok(Event::Out(s, data)) => {
                    *guard = Some(rx);
                    return Ok(Some((stream_name(s), PyBytes::new(py, &data).unbind())));
                }
                Ok(Event::Done(res)) => {
                    let d = finish(py, res, self.timeout)?;
                    if let Ok(mut r) = self.result.lock() {
                        *r = Some(d.unbind());
                    }
                    return Ok(None);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(PyRuntimeError::new_err(
                        "the command's worker thread ended without a result",
                    ))
                }
            }
            if let Err(e) = py.check_signals() {
                cancel_and_drain(py, &self.token, rx);
                return Err(e);
            }
        }
    }

    /// The exit status once the output is exhausted (None before).
    fn result(&self, py: Python<'_>) -> Option<Py<PyDict>> {
        self.result
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|d| d.clone_ref(py)))
    }

    /// Kills the command (and its process group) in the guest.
    fn cancel(&self, py: Python<'_>) {
        let rx = self.rx.try_lock().ok().and_then(|mut g| g.take());
        match rx {
            Some(rx) => cancel_and_drain(py, &self.token, rx),
            None => self.token.cancel(),
        }
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        // Not read to its end: nobody wants the command any more.
        let finished = self.result.get_mut().map(|r| r.is_some()).unwrap_or(false);
        if !finished {
            self.token.cancel();
        }
    }
}
