//! The `syncbus` command as a user runs it: separate node processes on loopback.

mod support;

use std::process::Stdio;

use serde_json::Value;
use support::within;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const EXE: &str = env!("CARGO_BIN_EXE_syncbus");

/// One `syncbus node --json` process.
struct NodeProcess {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Lines read while looking for another type, kept for later lookups.
    unread: Vec<Value>,
    id: String,
    addr: String,
}

impl NodeProcess {
    async fn start(zone: &str, seed: Option<&str>) -> NodeProcess {
        NodeProcess::start_with(zone, seed, &[]).await
    }

    /// Like `start`, with more arguments.
    async fn start_with(zone: &str, seed: Option<&str>, extra: &[&str]) -> NodeProcess {
        let mut command = Command::new(EXE);
        command.args([
            "node",
            "--bind",
            "127.0.0.1:0",
            "--zone",
            zone,
            "--preset",
            "local",
            "--json",
        ]);
        if let Some(seed) = seed {
            command.args(["--seed", seed]);
        }
        command.args(extra);
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("syncbus node starts");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut node = NodeProcess {
            child,
            stdin,
            lines,
            unread: Vec::new(),
            id: String::new(),
            addr: String::new(),
        };
        let ready = node.next_of("ready").await;
        node.id = ready["id"].as_str().unwrap().to_owned();
        node.addr = ready["addr"].as_str().unwrap().to_owned();
        node
    }

    async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
    }

    /// The first line of type `kind` not taken yet; lines of other types stay for later.
    async fn next_of(&mut self, kind: &str) -> Value {
        if let Some(at) = self.unread.iter().position(|line| line["type"] == kind) {
            return self.unread.remove(at);
        }
        within(&format!("a {kind} line"), async {
            loop {
                let line = self
                    .lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("node output ended");
                let value: Value = serde_json::from_str(&line).unwrap();
                if value["type"] == kind {
                    return value;
                }
                self.unread.push(value);
            }
        })
        .await
    }

    async fn quit(mut self) {
        self.send("quit").await;
        let status = within("exit", self.child.wait()).await.unwrap();
        assert!(status.success(), "{status}");
    }
}

#[tokio::test]
async fn three_node_processes_exchange_invalidations() {
    let mut a = NodeProcess::start("a", None).await;
    let mut b = NodeProcess::start("b", Some(&a.addr.clone())).await;
    let mut c = NodeProcess::start("c", Some(&a.addr.clone())).await;
    for node in [&mut a, &mut b, &mut c] {
        node.next_of("member_up").await;
        node.next_of("member_up").await;
        node.send("sub order:*").await;
        node.next_of("subscribed").await;
    }

    b.send("pub order:7").await;
    let published = b.next_of("published").await;
    assert_eq!(published["key"], "order:7");
    // When the publish was called, for latency measured from then: before the line.
    let called = published["called_ns"].as_u64().unwrap();
    assert!(
        called <= published["at_ns"].as_u64().unwrap(),
        "{published}"
    );
    for node in [&mut a, &mut b, &mut c] {
        let event = node.next_of("event").await;
        assert_eq!(event["kind"], "invalidate");
        assert_eq!(event["key"], "order:7");
        assert_eq!(event["zone"], "b");
    }

    a.send("members").await;
    let members = a.next_of("members").await;
    assert_eq!(members["members"].as_array().unwrap().len(), 2);
    assert_eq!(members["healthy"], true);

    a.send("await 2 order:8").await;
    let awaited = a.next_of("await").await;
    assert_eq!(awaited["key"], "order:8");
    assert_eq!(awaited["replicas"], 2);
    a.send("zones 2 order:9").await;
    let zoned = a.next_of("zones").await;
    assert_eq!(zoned["zones"].as_array().unwrap().len(), 2, "{zoned}");
    a.send("await 3 order:10").await;
    let refused = a.next_of("error").await;
    assert_eq!(refused["command"], "await");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("nothing was published"), "{refused}");

    a.stdin.write_all(b"pub caf\xe9\n").await.unwrap();
    let not_utf8 = a.next_of("error").await;
    assert!(
        not_utf8["message"].as_str().unwrap().contains("UTF-8"),
        "{not_utf8}"
    );
    a.send("sublease l1").await;
    assert_eq!(a.next_of("subscribed").await["key"], "lease l1");
    a.send("unsublease l1").await;
    assert_eq!(a.next_of("unsubscribed").await["key"], "lease l1");
    a.send("loss 0.25").await;
    assert_eq!(a.next_of("loss").await["rate"], 0.25);
    a.send("loss 0").await;
    a.next_of("loss").await;

    a.send("publish order:8").await;
    assert!(
        a.next_of("error").await["message"]
            .as_str()
            .unwrap()
            .contains("commands:")
    );

    let leaving = c.id.clone();
    c.quit().await;
    for node in [&mut a, &mut b] {
        assert_eq!(node.next_of("member_down").await["id"], leaving.as_str());
    }
    a.quit().await;
    b.quit().await;
}

#[tokio::test]
async fn sigterm_stops_a_node_whose_stdin_is_still_open() {
    let mut node = NodeProcess::start("a", None).await;
    let pid = node.child.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    node.next_of("stopped").await;
    let status = within("exit after SIGTERM", node.child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

async fn run_expecting_failure(args: &[&str]) -> (i32, String) {
    let output = within(
        "the command",
        Command::new(EXE).args(args).stdin(Stdio::null()).output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

#[tokio::test]
async fn wrong_arguments_say_what_is_wrong() {
    let (code, stderr) = run_expecting_failure(&["node"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--bind"), "{stderr}");

    let (code, stderr) = run_expecting_failure(&["node", "--bind", "localhost"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("expected IP:PORT"), "{stderr}");

    let (code, stderr) =
        run_expecting_failure(&["node", "--bind", "127.0.0.1:0", "--zone", "a b"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("printable"), "{stderr}");

    let (code, stderr) = run_expecting_failure(&["node", "--bind", "0.0.0.0:0"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("advertise"), "{stderr}");

    let (code, stderr) = run_expecting_failure(&["demo", "--nodes", "1"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--nodes"), "{stderr}");

    let (code, _) = run_expecting_failure(&["frobnicate"]).await;
    assert_eq!(code, 2);

    let bind = ["node", "--bind", "127.0.0.1:0"];
    let (code, stderr) =
        run_expecting_failure(&[&bind[..], &["--seal-mode", "open"]].concat()).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--key-file"), "{stderr}");
    let dir = scratch_dir();
    let bad = dir.join("bad.key");
    std::fs::write(&bad, "# the cluster key\nnot-a-key\n").unwrap();
    let bad = bad.to_str().unwrap();
    let (code, stderr) = run_expecting_failure(&[&bind[..], &["--key-file", bad]].concat()).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("line 2") && stderr.contains("64 hexadecimal"),
        "{stderr}"
    );
    let missing = dir.join("missing.key");
    let missing = missing.to_str().unwrap();
    let (code, stderr) =
        run_expecting_failure(&[&bind[..], &["--key-file", missing]].concat()).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read the key file"), "{stderr}");
}

/// A directory of this test run's own for key files.
fn scratch_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "syncbus-cli-{}-{:x}",
        std::process::id(),
        getrandom::u64().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn keygen() -> String {
    let output = within("keygen", Command::new(EXE).arg("keygen").output())
        .await
        .unwrap();
    assert!(output.status.success());
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert_eq!(key.len(), 64, "{key}");
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()), "{key}");
    key
}

#[tokio::test]
async fn sealed_nodes_join_and_rotate_their_key_from_stdin() {
    let (old, new) = (keygen().await, keygen().await);
    assert_ne!(old, new);
    let file = scratch_dir().join("cluster.key");
    std::fs::write(&file, format!("{old}\n")).unwrap();
    let key_file = ["--key-file", file.to_str().unwrap()];
    let mut a = NodeProcess::start_with("a", None, &key_file).await;
    let mut b = NodeProcess::start_with("b", Some(&a.addr.clone()), &key_file).await;
    let mut fingerprints = Vec::new();
    for node in [&mut a, &mut b] {
        node.next_of("member_up").await;
        node.send("keys").await;
        let keys = node.next_of("keys").await;
        assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys}");
        assert_eq!(keys["primary"], keys["keys"][0], "{keys}");
        assert_eq!(keys["mode"], "require", "{keys}");
        fingerprints.push(keys["primary"].clone());
    }
    for step in [format!("key install {new}"), format!("key use {new}")] {
        for node in [&mut a, &mut b] {
            node.send(&step).await;
            let keys = node.next_of("keys").await;
            assert!(
                !keys.to_string().contains(&new),
                "a key was printed: {keys}"
            );
        }
    }
    // After `key use`, the new key's fingerprint is the primary.
    a.send("keys").await;
    let keys = a.next_of("keys").await;
    assert_ne!(keys["primary"], fingerprints[0], "{keys}");
    assert_eq!(keys["keys"][1], fingerprints[0], "{keys}");
    a.send("seal seal").await;
    assert_eq!(a.next_of("keys").await["mode"], "seal");
    a.send("seal require").await;
    assert_eq!(a.next_of("keys").await["mode"], "require");
    for node in [&mut a, &mut b] {
        node.send(&format!("key remove {old}")).await;
        assert_eq!(
            node.next_of("keys").await["keys"].as_array().unwrap().len(),
            1
        );
        node.send(&format!("key remove {new}")).await;
        let refused = node.next_of("error").await;
        assert!(refused.to_string().contains("primary"), "{refused}");
    }
    b.send("sub k").await;
    b.next_of("subscribed").await;
    a.send("pub k").await;
    assert_eq!(b.next_of("event").await["key"], "k");
    a.send("metrics").await;
    let metrics = a.next_of("metrics").await;
    assert_eq!(metrics["dropped"]["unauthenticated"], 0, "{metrics}");
    a.quit().await;
    b.quit().await;
}

#[cfg(feature = "quic")]
#[tokio::test]
async fn node_processes_join_over_quic() {
    let authority = support::tls::Authority::new("cli");
    let args = |name: &str| -> Vec<String> {
        let quic = authority.node(name);
        let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        vec![
            "--quic-cert".into(),
            path(&quic.cert_chain),
            "--quic-key".into(),
            path(&quic.private_key),
            "--quic-trust".into(),
            path(&quic.trust),
        ]
    };
    let a_args = args("a");
    let a_refs: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = NodeProcess::start_with("a", None, &a_refs).await;
    let b_args = args("b");
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = NodeProcess::start_with("b", Some(&a.addr.clone()), &b_refs).await;
    a.next_of("member_up").await;
    b.next_of("member_up").await;
    b.send("sub k").await;
    b.next_of("subscribed").await;
    a.send("await 1 k").await;
    let done = a.next_of("await").await;
    assert_eq!(done["replicas"], 1, "{done}");
    assert_eq!(b.next_of("event").await["key"], "k");
    a.quit().await;
    b.quit().await;
}
