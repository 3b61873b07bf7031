//! A small blocking client for QEMU's machine protocol (QMP) on a Unix socket.
//!
//! One command at a time: [`Qmp::execute`] sends a command and reads until its reply;
//! events that arrive meanwhile are kept and handed out by [`Qmp::take_events`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::VmError;

/// A QMP event: its name and data.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Event>,
}

fn qmp_err(what: &str, e: impl std::fmt::Display) -> VmError {
    VmError::Qmp(format!("{what}: {e}"))
}

impl Qmp {
    /// Connects to `path`, retrying until `timeout` (QEMU creates the socket as it
    /// starts), reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmError> {
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(qmp_err(
                        &format!("cannot connect to QEMU's control socket {}", path.display()),
                        e,
                    ));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| qmp_err("set a timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| qmp_err("clone the socket", e))?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::Qmp(format!("unexpected greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| qmp_err("reading from QEMU failed", e))?;
        if n == 0 {
            return Err(VmError::Qmp(
                "QEMU closed its control socket (it exited)".into(),
            ));
        }
        serde_json::from_str(&line).map_err(|e| qmp_err("QEMU sent malformed JSON", e))
    }

    /// Runs `command` with `arguments`; returns its `return` value or its error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| qmp_err(&format!("sending {command} failed"), e))?;
        loop {
            let m = self.read_message()?;
            if let Some(name) = m.get("event").and_then(Value::as_str) {
                self.events.push(Event {
                    name: name.to_string(),
                    data: m.get("data").cloned().unwrap_or(Value::Null),
                });
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(VmError::Qmp(format!("{command}: {desc}")));
            }
        }
    }

    /// Waits up to `timeout` for an event to arrive, without sending anything.
    pub fn wait_event(&mut self, timeout: Duration) -> Result<Option<Event>, VmError> {
        if !self.events.is_empty() {
            return Ok(Some(self.events.remove(0)));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| qmp_err("set a timeout", e))?;
        let r = self.read_message();
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)));
        match r {
            Ok(m) => Ok(m.get("event").and_then(Value::as_str).map(|name| Event {
                name: name.to_string(),
                data: m.get("data").cloned().unwrap_or(Value::Null),
            })),
            Err(VmError::Qmp(s)) if s.contains("timed out") || s.contains("temporarily") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The migration status (`query-migrate`'s `status`, `none` before any) and the
    /// bytes transferred so far.
    pub fn migration(&mut self) -> Result<(String, u64, Option<String>), VmError> {
        let r = self.execute("query-migrate", None)?;
        let status = r
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        let bytes = r
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let err = r
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((status, bytes, err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP peer: greeting, then a reply per command, with an event between.
    #[test]
    fn commands_replies_and_events() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains(r#""execute":"query-status""#));
            writeln!(w, r#"{{"event": "STOP", "data": {{}}, "timestamp": {{}}}}"#).unwrap();
            writeln!(w, r#"{{"return": {{"status": "paused"}}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            writeln!(
                w,
                r#"{{"error": {{"class": "GenericError", "desc": "no such thing"}}}}"#
            )
            .unwrap();
            writeln!(w, r#"{{"event": "SHUTDOWN", "data": {{"guest": true}}}}"#).unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let r = q.execute("query-status", None).unwrap();
        assert_eq!(r["status"], "paused");
        let e = q.execute("bogus", Some(json!({"x": 1}))).unwrap_err();
        assert!(e.to_string().contains("bogus: no such thing"), "{e}");
        assert_eq!(q.take_events()[0].name, "STOP");
        let ev = q.wait_event(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(ev.name, "SHUTDOWN");
        assert_eq!(ev.data["guest"], true);
        server.join().unwrap();
        let e = q.wait_event(Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }
}
