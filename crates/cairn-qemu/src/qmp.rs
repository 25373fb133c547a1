//! A QMP client: QEMU's monitor protocol over its unix socket.
//!
//! Synchronous and small: connect, read the greeting, leave capabilities negotiation, then
//! one command at a time, each with an id its answer must carry. Events that arrive while a
//! command waits are kept in order for [`Qmp::take_events`]. Every read has a timeout, so a
//! QEMU that hangs fails the call instead of the job.
//!
//! Why not a crate: `qapi` (the maintained QMP crate) generates types from one QEMU version's
//! schema and brings an async stack; Cairn sends a dozen commands, whose arguments read more
//! plainly as JSON next to QEMU's documentation, and must work across QEMU versions.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::Error;
use crate::wire::{self, MAX_MONITOR_LINE, Message};

/// How long a command may take unless its caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Events kept at most between two [`Qmp::take_events`].
const MAX_EVENTS: usize = 1024;

/// How long QEMU may take to greet a new client: longer means another client holds the socket.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// An event QEMU sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Its name, such as `BLOCK_EXPORT_DELETED`.
    pub name: String,
    /// Its data.
    pub data: Value,
}

/// A connection to one QEMU's monitor.
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    version: (u64, u64, u64),
    next_id: u64,
    events: Vec<Event>,
}

impl Qmp {
    /// The process at the other end of the socket (`SO_PEERCRED`): the QEMU that answers.
    pub fn peer_pid(&self) -> Option<u32> {
        let cred = rustix::net::sockopt::socket_peercred(&self.writer).ok()?;
        u32::try_from(cred.pid.as_raw_nonzero().get()).ok()
    }

    /// Connects to the QMP socket at `socket` and negotiates capabilities.
    pub fn connect(socket: &Path) -> Result<Qmp, Error> {
        let io = |e| Error::io("QMP socket", socket)(e);
        let stream = crate::socket::connect(socket, GREETING_TIMEOUT).map_err(io)?;
        stream.set_read_timeout(Some(GREETING_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            version: (0, 0, 0),
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = qmp.read().map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock => {
                Error::Vm(format!(
                    "QEMU did not greet on QMP socket {} within {} s: another client holds it \
                     (QEMU serves one client per QMP socket, and libvirt keeps its own to itself); \
                     give Cairn a QMP socket of its own (-qmp unix:PATH,server=on,wait=off)",
                    socket.display(),
                    GREETING_TIMEOUT.as_secs()
                ))
            }
            e => e,
        })?;
        match greeting {
            Message::Greeting { version } => qmp.version = version,
            other => {
                return Err(Error::Protocol(format!(
                    "QMP socket {} began with {} instead of QEMU's greeting: is it a QMP socket \
                     (not the guest agent's)?",
                    socket.display(),
                    crate::wire::printable(&format!("{other:?}"), 200)
                )));
            }
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// QEMU's version: major, minor, micro.
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// The socket this connection uses.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs `command` with `arguments` (an object, or `null` for none) and returns its result.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        self.execute_within(command, arguments, DEFAULT_TIMEOUT)
    }

    /// [`Qmp::execute`] with its own timeout.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() && arguments != json!({}) {
            request["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&request)
            .map_err(|e| Error::Protocol(format!("cannot encode {command}: {e}")))?;
        line.push(b'\n');
        let socket = self.socket.clone();
        let io = |e| Error::io("QMP socket", &socket)(e);
        self.reader.get_ref().set_read_timeout(Some(timeout)).map_err(io)?;
        tracing::debug!(socket = %self.socket.display(), "QMP > {}", String::from_utf8_lossy(&line).trim());
        self.writer.write_all(&line).map_err(io)?;
        loop {
            match self.read()? {
                Message::Event { name, data } => {
                    // Kept for the caller, but never without bound: QEMU sends events (some
                    // the guest causes) whether or not anyone reads them.
                    if self.events.len() < MAX_EVENTS {
                        self.events.push(Event { name, data });
                    }
                }
                // The late answer to an earlier command that timed out: skipped.
                Message::Return { id: Some(got), .. } | Message::Failure { id: Some(got), .. }
                    if got.as_u64().is_some_and(|g| g < id) => {}
                Message::Return { value, id: Some(got) } if got == json!(id) => return Ok(value),
                Message::Failure { class, desc, id: Some(got) } if got == json!(id) => {
                    return Err(Error::Command {
                        what: "QEMU",
                        command: command.to_owned(),
                        class,
                        desc,
                    });
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "QEMU answered {command} (id {id}) with {other:?}"
                    )));
                }
            }
        }
    }

    /// The events received so far, oldest first; they are forgotten here.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn read(&mut self) -> Result<Message, Error> {
        let line = wire::read_line(&mut self.reader, MAX_MONITOR_LINE)
            .map_err(Error::io("QMP socket", &self.socket))?
            .ok_or_else(|| {
                Error::io("QMP socket", &self.socket)(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QEMU closed the connection (did it exit?)",
                ))
            })?;
        wire::decode(&line)
    }
}
