//! One line per event on stdout: JSON objects with `--json`, `key=value` text without.

use serde_json::{Map, Value};
use tokio::io::{AsyncWriteExt, BufWriter, Stdout};
use tokio::sync::mpsc;

/// Lines waiting for stdout. When stdout is slow, writers wait, and a subscription
/// that falls behind gets a resync instead of growing memory.
const BACKLOG: usize = 65_536;

/// A cloneable handle that prints lines in the order they are sent.
#[derive(Clone)]
pub(crate) struct Output {
    json: bool,
    lines: mpsc::Sender<String>,
}

impl Output {
    /// Starts the writer task.
    pub(crate) fn start(json: bool) -> (Output, tokio::task::JoinHandle<()>) {
        let (lines, queue) = mpsc::channel(BACKLOG);
        let writer = tokio::spawn(write_lines(queue, BufWriter::new(tokio::io::stdout())));
        (Output { json, lines }, writer)
    }

    /// Prints one record; `kind` becomes the `type` field.
    pub(crate) async fn print(&self, kind: &str, fields: Value) {
        let line = if self.json {
            let mut object = Map::new();
            object.insert("type".into(), kind.into());
            if let Value::Object(fields) = fields {
                object.extend(fields);
            }
            Value::Object(object).to_string()
        } else {
            human(kind, &fields)
        };
        // The writer only stops when the process does.
        let _ = self.lines.send(line).await;
    }
}

fn human(kind: &str, fields: &Value) -> String {
    let mut line = kind.to_owned();
    if let Value::Object(fields) = fields {
        for (name, value) in fields {
            match value {
                Value::Null => continue,
                // Keys come from the network: control characters (a terminal escape,
                // a newline) are shown escaped, never sent to the terminal.
                Value::String(text) if text.chars().any(char::is_control) => {
                    line.push_str(&format!(" {name}={}", text.escape_default()));
                }
                Value::String(text) => line.push_str(&format!(" {name}={text}")),
                other => line.push_str(&format!(" {name}={other}")),
            }
        }
    }
    line
}

async fn write_lines(mut queue: mpsc::Receiver<String>, mut out: BufWriter<Stdout>) {
    while let Some(line) = queue.recv().await {
        let mut batch = line;
        batch.push('\n');
        // Write everything already queued before flushing once.
        while let Ok(more) = queue.try_recv() {
            batch.push_str(&more);
            batch.push('\n');
        }
        if out.write_all(batch.as_bytes()).await.is_err() || out.flush().await.is_err() {
            return;
        }
    }
}

/// Nanoseconds since the Unix epoch, for latency measured across processes.
pub(crate) fn unix_nanos() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u64::try_from(now.unwrap_or_default().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_the_network_are_escaped_in_text_lines() {
        let line = human("event", &serde_json::json!({"key": "a\u{1b}[31mred\nnext"}));
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("\\u{1b}[31mred\\nnext"), "{line}");
        assert_eq!(
            human("event", &serde_json::json!({"key": "plain"})),
            "event key=plain"
        );
    }
}
