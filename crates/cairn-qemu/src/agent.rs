//! A client of the QEMU guest agent (`qemu-ga`), over the host end of its virtio-serial port.
//!
//! Everything the agent sends is written by the guest, so every answer is read with a length
//! limit and a timeout, decoded without trusting it, and shown only through
//! [`wire::printable`]. The agent serves one client at a time and keeps no session: each
//! connection starts with `guest-sync-delimited`, whose answer comes after a 0xFF byte, so
//! whatever an earlier client left unread is skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::Error;
use crate::wire::{self, MAX_AGENT_LINE, Message};

/// How long a quick command (sync, ping, status, thaw) may take.
pub const QUICK: Duration = Duration::from_secs(10);

/// Reads of one guest file at most (64 KiB takes one or two).
const MAX_FILE_READS: usize = 4;

/// Bytes skipped at most while looking for the sync delimiter.
const MAX_SKIPPED: usize = 1 << 20;

/// A connection to a guest agent.
pub struct GuestAgent {
    socket: PathBuf,
    reader: BufReader<Timed>,
    writer: UnixStream,
    /// The id of the next command (each answer must carry its command's id).
    next_id: u64,
    /// A command timed out: its answer may still come, so nothing more is asked here.
    poisoned: bool,
}

/// Answers to other commands skipped at most while waiting for one.
const MAX_STRAY_ANSWERS: usize = 16;

/// A stream whose reads share one deadline: a guest that sends a byte now and then cannot
/// stretch a command past its timeout (a timeout per read would let it).
struct Timed {
    stream: UnixStream,
    deadline: Instant,
}

impl std::io::Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the guest agent did not answer in time",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl GuestAgent {
    /// Connects to the agent's socket and synchronises, within `timeout` for each step.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<GuestAgent, Error> {
        let stream = crate::socket::connect(socket, timeout)
            .map_err(Error::io("guest agent socket", socket))?;
        GuestAgent::over(stream, socket, timeout)
    }

    /// Synchronises with the agent at the other end of `stream` (`socket` names it in errors).
    pub fn over(stream: UnixStream, socket: &Path, timeout: Duration) -> Result<GuestAgent, Error> {
        let io = |e| Error::io("guest agent socket", socket)(e);
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let timed = Timed { stream, deadline: Instant::now() + timeout };
        let mut agent = GuestAgent {
            socket: socket.to_path_buf(),
            reader: BufReader::new(timed),
            writer,
            next_id: u64::from(rand::random::<u32>()),
            poisoned: false,
        };
        agent.sync()?;
        Ok(agent)
    }

    /// The socket this connection uses.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Resets the agent's parser and skips everything up to the answer to a fresh sync id.
    fn sync(&mut self) -> Result<(), Error> {
        let id: u32 = rand::random::<u32>() & 0x7fff_ffff;
        self.write(&[0xff])?;
        self.send("guest-sync-delimited", json!({ "id": id }))?;
        // Skip up to a delimiter (an earlier client's answers, or noise), then read the
        // answer after it; an answer to an earlier sync is skipped the same way.
        let mut budget = MAX_SKIPPED as u64;
        loop {
            let io = Error::io("guest agent socket", &self.socket);
            let mut skipped = Vec::new();
            let found = std::io::Read::take(&mut self.reader, budget)
                .read_until(0xff, &mut skipped)
                .map_err(io)?;
            budget = budget.saturating_sub(found as u64);
            if found == 0 || skipped.last() != Some(&0xff) {
                return Err(Error::Protocol(format!(
                    "the guest agent on {} did not answer guest-sync-delimited",
                    self.socket.display()
                )));
            }
            match self.read()? {
                Message::Return { value, .. } if value == json!(id) => return Ok(()),
                _ if budget > 0 => continue,
                other => {
                    return Err(Error::Protocol(format!(
                        "the guest agent answered sync {id} with {}",
                        wire::printable(&format!("{other:?}"), 200)
                    )));
                }
            }
        }
    }

    /// Runs `command` and returns its result, waiting at most `timeout` for it.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.execute_until(command, arguments, Instant::now() + timeout)
    }

    /// Runs `command` and returns its result, waiting for it until `deadline`. The answer must
    /// carry the command's id (the guest agent echoes it): a late answer to an earlier command
    /// is skipped, never taken for this one's. After a timeout the connection is not used
    /// again, since the late answer may still come.
    pub fn execute_until(
        &mut self,
        command: &str,
        arguments: Value,
        deadline: Instant,
    ) -> Result<Value, Error> {
        if self.poisoned {
            return Err(Error::Protocol(format!(
                "an earlier command to the guest agent on {} timed out: this connection is not \
                 used again",
                self.socket.display()
            )));
        }
        self.reader.get_mut().deadline = deadline;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.send_with_id(command, arguments, Some(id))?;
        for _ in 0..=MAX_STRAY_ANSWERS {
            let message = match self.read() {
                Ok(m) => m,
                Err(e) => {
                    self.poisoned = true;
                    return Err(e);
                }
            };
            let ours = |answer: &Option<Value>| match answer {
                Some(v) => v.as_u64() == Some(id),
                // An agent that echoes no ids (none does since QEMU 2.x): in order.
                None => true,
            };
            return match message {
                Message::Return { value, id: answer } if ours(&answer) => Ok(value),
                Message::Failure { class, desc, id: answer } if ours(&answer) => {
                    Err(Error::Command {
                        what: "the guest agent",
                        command: command.to_owned(),
                        class: wire::printable(&class, 64),
                        desc: wire::printable(&desc, 400),
                    })
                }
                Message::Return { .. } | Message::Failure { .. } => continue,
                other => Err(Error::Protocol(format!(
                    "the guest agent answered {command} with {}",
                    wire::printable(&format!("{other:?}"), 200)
                ))),
            };
        }
        self.poisoned = true;
        Err(Error::Protocol(format!(
            "the guest agent sent more than {MAX_STRAY_ANSWERS} answers to other commands while \
             {command} waited"
        )))
    }

    /// `guest-ping`: whether the agent answers at all.
    pub fn ping(&mut self) -> Result<(), Error> {
        self.execute("guest-ping", Value::Null, QUICK).map(|_| ())
    }

    /// `guest-fsfreeze-freeze`: runs the guest's fsfreeze hook (its pre-scripts) and freezes
    /// every file system it can; returns how many.
    pub fn freeze(&mut self, timeout: Duration) -> Result<u64, Error> {
        let value = self.execute("guest-fsfreeze-freeze", Value::Null, timeout)?;
        count("guest-fsfreeze-freeze", &value)
    }

    /// `guest-fsfreeze-thaw`: thaws, then runs the hook's post-scripts; returns how many file
    /// systems were thawed.
    pub fn thaw(&mut self, timeout: Duration) -> Result<u64, Error> {
        let value = self.execute("guest-fsfreeze-thaw", Value::Null, timeout)?;
        count("guest-fsfreeze-thaw", &value)
    }

    /// `guest-fsfreeze-status`: true when the guest says it is frozen.
    pub fn frozen(&mut self) -> Result<bool, Error> {
        match self.execute("guest-fsfreeze-status", Value::Null, QUICK)? {
            Value::String(s) if s == "frozen" => Ok(true),
            Value::String(s) if s == "thawed" => Ok(false),
            other => Err(Error::Protocol(format!(
                "the guest agent's fsfreeze status is {}",
                wire::printable(&other.to_string(), 64)
            ))),
        }
    }

    /// Reads the guest's file at `path` through `guest-file-*`, refusing more than `max`
    /// bytes. The guest agent may forbid these commands (`--block-rpcs`): that is an error.
    pub fn read_file(&mut self, path: &str, max: usize) -> Result<Vec<u8>, Error> {
        // One deadline for the whole file, and a few reads at most: a guest that dribbles a
        // byte per answer cannot stretch this.
        let deadline = Instant::now() + QUICK;
        let handle = self.open_file(path, "r", deadline)?;
        let mut bytes = Vec::new();
        let read = (|| {
            for _ in 0..MAX_FILE_READS {
                let chunk = self.execute_until(
                    "guest-file-read",
                    json!({ "handle": handle, "count": max + 1 - bytes.len() }),
                    deadline,
                )?;
                let data = chunk.get("buf-b64").and_then(Value::as_str).unwrap_or("");
                let data = base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| {
                    Error::Protocol(format!("the guest agent sent {path} as bad base64 ({e})"))
                })?;
                bytes.extend_from_slice(&data);
                if bytes.len() > max {
                    return Err(Error::Protocol(format!(
                        "{path} in the guest is larger than {max} bytes"
                    )));
                }
                if chunk.get("eof").and_then(Value::as_bool) != Some(false) || data.is_empty() {
                    return Ok(());
                }
            }
            Err(Error::Protocol(format!(
                "the guest agent sent {path} in more than {MAX_FILE_READS} pieces"
            )))
        })();
        let closed = self.execute_until("guest-file-close", json!({ "handle": handle }), deadline);
        read?;
        closed?;
        Ok(bytes)
    }

    fn open_file(&mut self, path: &str, mode: &str, deadline: Instant) -> Result<i64, Error> {
        let handle =
            self.execute_until("guest-file-open", json!({ "path": path, "mode": mode }), deadline)?;
        handle.as_i64().ok_or_else(|| {
            Error::Protocol(format!(
                "the guest agent opened {path} as {}",
                wire::printable(&handle.to_string(), 40)
            ))
        })
    }

    /// The agent's version, from `guest-info`.
    pub fn version(&mut self) -> Result<String, Error> {
        let info = self.execute("guest-info", Value::Null, QUICK)?;
        Ok(wire::printable(info.get("version").and_then(Value::as_str).unwrap_or("unknown"), 40))
    }

    fn send(&mut self, command: &str, arguments: Value) -> Result<(), Error> {
        self.send_with_id(command, arguments, None)
    }

    fn send_with_id(
        &mut self,
        command: &str,
        arguments: Value,
        id: Option<u64>,
    ) -> Result<(), Error> {
        let mut request = json!({ "execute": command });
        if let Some(id) = id {
            request["id"] = json!(id);
        }
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&request)
            .map_err(|e| Error::Protocol(format!("cannot encode {command}: {e}")))?;
        line.push(b'\n');
        self.write(&line)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.writer.write_all(bytes).map_err(Error::io("guest agent socket", &self.socket))
    }

    fn read(&mut self) -> Result<Message, Error> {
        let socket = self.socket.clone();
        let line = wire::read_line(&mut self.reader, MAX_AGENT_LINE)
            .map_err(Error::io("guest agent socket", &socket))?
            .ok_or_else(|| {
                Error::io("guest agent socket", &socket)(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection closed",
                ))
            })?;
        wire::decode(&line)
    }
}

fn count(command: &str, value: &Value) -> Result<u64, Error> {
    value.as_u64().ok_or_else(|| {
        Error::Protocol(format!(
            "the guest agent answered {command} with {}, not a count",
            wire::printable(&value.to_string(), 64)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A guest agent played by a thread: it reads lines and answers each with what `answer`
    /// returns for it (the sync's id is read from the request).
    fn agent(answer: impl Fn(&str, u64) -> Vec<u8> + Send + 'static) -> GuestAgent {
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut writer = theirs;
            let mut byte = [0u8; 1];
            // The client starts with a 0xFF to reset the agent's parser.
            let _ = reader.read_exact(&mut byte);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                let request: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
                let command = request["execute"].as_str().unwrap_or("").to_owned();
                let id = request["arguments"]["id"].as_u64().unwrap_or(0);
                if writer.write_all(&answer(&command, id)).is_err() {
                    return;
                }
                line.clear();
            }
        });
        GuestAgent::over(ours, Path::new("test"), Duration::from_millis(300)).unwrap()
    }

    #[test]
    fn sync_skips_what_an_earlier_client_left_and_commands_answer() {
        let mut a = agent(|command, id| match command {
            "guest-sync-delimited" => [
                &b"{\"return\": 7}\n\x1b[2J junk\xff"[..],
                format!("{{\"return\": {id}}}\n").as_bytes(),
            ]
            .concat(),
            "guest-fsfreeze-freeze" => b"{\"return\": 3}\n".to_vec(),
            "guest-fsfreeze-status" => b"{\"return\": \"thawed\"}\n".to_vec(),
            _ => b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no \\u001b[31m\"}}\n"
                .to_vec(),
        });
        assert_eq!(a.freeze(QUICK).unwrap(), 3);
        assert!(!a.frozen().unwrap());
        let refused = a.thaw(QUICK).unwrap_err().to_string();
        assert!(refused.contains("CommandNotFound") && !refused.contains('\u{1b}'), "{refused}");
    }

    #[test]
    fn hostile_answers_are_errors_not_panics() {
        let mut a = agent(|command, id| match command {
            "guest-sync-delimited" => {
                [&[0xffu8][..], format!("{{\"return\": {id}}}\n").as_bytes()].concat()
            }
            "guest-fsfreeze-freeze" => b"{\"return\": \"lots\"}\n".to_vec(),
            "guest-fsfreeze-status" => b"{\"return\": \"\\u001b]0;pwned\\u0007\"}\n".to_vec(),
            _ => vec![b'x'; MAX_AGENT_LINE + 10],
        });
        assert!(a.freeze(QUICK).unwrap_err().to_string().contains("not a count"));
        let status = a.frozen().unwrap_err().to_string();
        assert!(!status.contains('\u{7}') && !status.contains('\u{1b}'), "{status}");
        assert!(a.thaw(QUICK).is_err(), "a line past the limit is refused");
    }

    /// An agent that echoes ids: `answer` gets the command and the request's id.
    fn echoing(answer: impl Fn(&str, u64) -> Vec<u8> + Send + 'static) -> GuestAgent {
        agent(move |command, id| match command {
            "guest-sync-delimited" => {
                [&[0xffu8][..], format!("{{\"return\": {id}}}\n").as_bytes()].concat()
            }
            _ => answer(command, id),
        })
    }

    #[test]
    fn a_late_answer_to_an_earlier_command_is_not_taken_for_this_one() {
        // A stale answer carrying another command's id, then the answer (without an id, as
        // this fake does not echo them).
        let mut a = echoing(|command, _| match command {
            "guest-fsfreeze-thaw" => b"{\"return\": 5, \"id\": 1}\n{\"return\": 2}\n".to_vec(),
            _ => b"{\"return\": 0}\n".to_vec(),
        });
        assert_eq!(a.thaw(QUICK).unwrap(), 2, "the answer with another id is skipped");
    }

    #[test]
    fn a_command_that_timed_out_leaves_the_connection_unused() {
        let mut a = echoing(|command, _| match command {
            "guest-fsfreeze-freeze" => Vec::new(), // never answers
            _ => b"{\"return\": 1}\n".to_vec(),
        });
        assert!(a.freeze(Duration::from_millis(100)).is_err());
        let err = a.thaw(QUICK).unwrap_err().to_string();
        assert!(err.contains("not used again"), "{err}");
    }

    #[test]
    fn a_file_is_read_within_limits() {
        use base64::Engine;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let mut a = echoing(move |command, _| match command {
            "guest-file-open" => b"{\"return\": 1000}\n".to_vec(),
            "guest-file-close" => b"{\"return\": {}}\n".to_vec(),
            _ => format!(
                "{{\"return\": {{\"count\": 1, \"buf-b64\": \"{}\", \"eof\": false}}}}\n",
                b64(b"x")
            )
            .into_bytes(),
        });
        // A guest that dribbles a byte per read is cut off after a few reads.
        let err = a.read_file("/run/x", 1024).unwrap_err().to_string();
        assert!(err.contains("pieces"), "{err}");
        let mut a = echoing(move |command, _| match command {
            "guest-file-open" => b"{\"return\": 1000}\n".to_vec(),
            "guest-file-close" => b"{\"return\": {}}\n".to_vec(),
            _ => format!(
                "{{\"return\": {{\"count\": 9, \"buf-b64\": \"{}\", \"eof\": true}}}}\n",
                b64(&[7u8; 2000])
            )
            .into_bytes(),
        });
        assert!(a.read_file("/run/x", 1024).unwrap_err().to_string().contains("larger"));
    }

    #[test]
    fn a_silent_agent_times_out() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let started = std::time::Instant::now();
        let err = GuestAgent::over(ours, Path::new("test"), Duration::from_millis(200));
        assert!(err.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
