//! The JSON messages QEMU and its guest agent send, decoded without trusting them.
//!
//! QMP (the monitor) and the guest agent both send one JSON object per line. The monitor is
//! QEMU itself; the guest agent runs inside the guest, so everything it sends is written by
//! whoever controls the guest. Lines are read with a length limit ([`read_line`]) and decoded
//! into [`Message`] with no panics on any input (fuzzed: `fuzz/fuzz_targets/qmp_message.rs`).

use std::io::BufRead;

use serde_json::{Map, Value};

use crate::Error;

/// The longest line read from QEMU's monitor: `query-named-block-nodes` on a VM with many
/// disks runs to a few hundred KiB.
pub const MAX_MONITOR_LINE: usize = 16 << 20;

/// The longest line read from a guest agent (its answers here are a few numbers and names).
pub const MAX_AGENT_LINE: usize = 1 << 20;

/// One message from QMP or a guest agent.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// QMP's greeting: QEMU's version.
    Greeting {
        /// Major, minor and micro version (0 where QEMU left one out).
        version: (u64, u64, u64),
    },
    /// A command's result.
    Return {
        /// The value returned.
        value: Value,
        /// The id the command carried, if any.
        id: Option<Value>,
    },
    /// A command's failure.
    Failure {
        /// QEMU's error class, such as `GenericError`.
        class: String,
        /// Its description.
        desc: String,
        /// The id the command carried, if any.
        id: Option<Value>,
    },
    /// An asynchronous event (QMP only).
    Event {
        /// Its name, such as `BLOCK_JOB_ERROR`.
        name: String,
        /// Its data (`null` when it has none).
        data: Value,
    },
}

/// Decodes one line. Anything but one of the four kinds of message is an error naming what
/// was wrong (never a panic, whatever the bytes).
pub fn decode(line: &[u8]) -> Result<Message, Error> {
    let bad = |what: String| Error::Protocol(what);
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| bad(format!("a message that is not JSON ({e})")))?;
    let Value::Object(mut object) = value else {
        return Err(bad("a message that is not a JSON object".into()));
    };
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(Message::Return { value, id });
    }
    if let Some(error) = object.remove("error") {
        let Value::Object(error) = error else {
            return Err(bad("an error that is not an object".into()));
        };
        return Ok(Message::Failure {
            class: string(&error, "class").unwrap_or("GenericError").to_owned(),
            desc: string(&error, "desc").unwrap_or("(no description)").to_owned(),
            id,
        });
    }
    if let Some(Value::String(name)) = object.remove("event") {
        let data = object.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event { name, data });
    }
    if let Some(Value::Object(qmp)) = object.remove("QMP") {
        let version = qmp.get("version").and_then(|v| v.get("qemu"));
        let part = |k: &str| version.and_then(|v| v.get(k)).and_then(Value::as_u64).unwrap_or(0);
        return Ok(Message::Greeting { version: (part("major"), part("minor"), part("micro")) });
    }
    Err(bad(format!("a message of no known kind (keys: {})", keys(&object))))
}

fn string<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    object.get(key).and_then(Value::as_str)
}

fn keys(object: &Map<String, Value>) -> String {
    let mut names: Vec<String> = object.keys().take(8).map(|k| printable(k, 32)).collect();
    if names.is_empty() {
        names.push("none".into());
    }
    names.join(", ")
}

/// `text` cut to `max` characters with control characters escaped: what a guest wrote, made
/// safe to put in a log line, an error or a point's evidence.
pub fn printable(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).flat_map(char::escape_default).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// Reads one line (without its `\n`) of at most `max` bytes. `Ok(None)` at the end of the
/// stream; a longer line is an error, and nothing past `max` is kept in memory.
pub fn read_line(reader: &mut impl BufRead, max: usize) -> Result<Option<Vec<u8>>, std::io::Error> {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return match line.is_empty() {
                true => Ok(None),
                false => Err(std::io::ErrorKind::UnexpectedEof.into()),
            };
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > max + usize::from(done) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn decodes_each_kind() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        assert_eq!(decode(greeting).unwrap(), Message::Greeting { version: (7, 2, 22) });
        assert_eq!(
            decode(br#"{"return": {}, "id": 3}"#).unwrap(),
            Message::Return { value: json!({}), id: Some(json!(3)) }
        );
        assert_eq!(
            decode(br#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap(),
            Message::Failure { class: "GenericError".into(), desc: "no".into(), id: None }
        );
        assert_eq!(
            decode(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#)
                .unwrap(),
            Message::Event { name: "RESUME".into(), data: Value::Null }
        );
    }

    #[test]
    fn refuses_what_is_not_a_message() {
        for bad in [&b""[..], b"[]", b"3", b"{}", b"{\"error\": 3}", b"{\"event\": 3}", b"\xff{"] {
            assert!(matches!(decode(bad), Err(Error::Protocol(_))), "{bad:?}");
        }
    }

    #[test]
    fn lines_are_bounded() {
        let mut r = std::io::Cursor::new(b"abc\ndefgh\nij".to_vec());
        assert_eq!(read_line(&mut r, 4).unwrap().unwrap(), b"abc");
        assert!(read_line(&mut r, 4).is_err());
        let mut r = std::io::Cursor::new(b"abcd\n".to_vec());
        assert_eq!(read_line(&mut r, 4).unwrap().unwrap(), b"abcd");
        assert!(read_line(&mut r, 4).unwrap().is_none());
        let mut r = std::io::Cursor::new(b"ab".to_vec());
        assert!(read_line(&mut r, 4).is_err(), "a line cut short is an error");
    }

    #[test]
    fn printable_escapes_and_cuts() {
        assert_eq!(printable("a\nb\u{1b}", 10), "a\\nb\\u{1b}");
        assert_eq!(printable("abcdef", 3), "abc…");
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let mut r = std::io::Cursor::new(bytes);
            while let Ok(Some(_)) = read_line(&mut r, 16) {}
        }

        #[test]
        fn returns_keep_their_value(n in any::<i64>(), id in any::<u32>()) {
            let line = serde_json::to_vec(&json!({"return": n, "id": id})).unwrap();
            prop_assert_eq!(decode(&line).unwrap(), Message::Return { value: json!(n), id: Some(json!(id)) });
        }
    }
}
