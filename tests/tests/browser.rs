//! A real browser chats through the relay (issue 16): Debian's `chromium`, headless, loads
//! `examples/web/chat.html` from a small HTTP server of this test, connects to a websocket
//! listener served by the chat worker (`shmrelay worker chat`), and pages talk to each other.
//! The test drives the pages and reads their DOM through the DevTools protocol (CDP, a JSON
//! protocol over a WebSocket: `tungstenite` is the client).
//!
//! Needs `chromium` (`bash tools/ws/ci-setup.sh`; `SHMRELAY_CHROMIUM` names another binary).
//! Without it the test prints `SKIPPED` and passes, unless `SHMRELAY_REQUIRE_CHROMIUM=1`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shmrelay_tests::{scratch, shmrelay_bin, Relay, Watchdog};
use tungstenite::{Message, WebSocket};

/// The chromium binary, or `None` (with a note) when it is missing and not required.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("SHMRELAY_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("chromium"))
                    .find(|p| p.is_file())
            })
        });
    match path {
        Some(p) if p.is_file() => Some(p),
        _ if std::env::var("SHMRELAY_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") => {
            panic!("SHMRELAY_REQUIRE_CHROMIUM=1 but no chromium (bash tools/ws/ci-setup.sh)")
        }
        _ => {
            eprintln!("SKIPPED: no chromium in PATH (bash tools/ws/ci-setup.sh installs it)");
            None
        }
    }
}

/// Serves `examples/web/chat.html` at `/chat.html` (404 for anything else) on a thread,
/// until the test process ends.
fn serve_page() -> SocketAddr {
    let page_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/web/chat.html");
    let page = std::fs::read(&page_path).expect("examples/web/chat.html");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer(stream, &page);
        }
    });
    addr
}

fn answer(mut stream: TcpStream, page: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let (status, body): (&str, &[u8]) = match request_line.split_whitespace().nth(1) {
        Some(p) if p.starts_with("/chat.html") => ("200 OK", page),
        _ => ("404 Not Found", b"not found"),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)
}

/// A headless chromium in its own process group, killed (the group) on drop.
struct Browser {
    child: Child,
    cdp: Cdp,
}

impl Browser {
    fn start(bin: &Path, profile: &Path) -> Browser {
        let child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox", // tests run as root in CI
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let mut browser = Browser {
            child,
            cdp: Cdp::none(),
        };
        // Chromium writes its DevTools port and browser path here once it listens.
        let file = profile.join("DevToolsActivePort");
        let end = Instant::now() + Duration::from_secs(60);
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break (port.trim().to_owned(), path.trim().to_owned());
                }
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                panic!("chromium exited at start: {status}");
            }
            assert!(
                Instant::now() < end,
                "chromium wrote no DevToolsActivePort in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        browser.cdp = Cdp::connect(&format!("127.0.0.1:{port}"), &path);
        browser
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test created (pgid = the child's pid).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A DevTools protocol client on the browser's endpoint; pages are reached through flat
/// sessions (`sessionId` on each command).
struct Cdp {
    ws: Option<WebSocket<TcpStream>>,
    next_id: u64,
}

impl Cdp {
    fn none() -> Cdp {
        Cdp {
            ws: None,
            next_id: 1,
        }
    }

    fn connect(addr: &str, path: &str) -> Cdp {
        let stream = TcpStream::connect(addr).expect("connect to DevTools");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream)
            .expect("DevTools websocket handshake");
        Cdp {
            ws: Some(ws),
            next_id: 1,
        }
    }

    /// Sends one command and returns its `result` (events that arrive meanwhile are skipped).
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut cmd = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            cmd["sessionId"] = json!(s);
        }
        let ws = self.ws.as_mut().expect("connected");
        ws.send(Message::text(cmd.to_string())).expect("CDP send");
        loop {
            let msg = ws.read().expect("CDP read (30 s)");
            let Ok(text) = msg.to_text() else { continue };
            let v: Value = serde_json::from_str(text).expect("CDP JSON");
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }
}

/// The lines of a chat page's message list, as shown.
const LINES: &str = "[...document.querySelectorAll('#messages li')].map(li => li.textContent)";

/// A page (tab) of the browser, attached through a flat session.
struct Page {
    target: String,
    session: String,
}

impl Page {
    fn open(cdp: &mut Cdp, url: &str) -> Page {
        let r = cdp.call(None, "Target.createTarget", json!({"url": url}));
        let target = r["targetId"].as_str().expect("targetId").to_owned();
        let r = cdp.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        let session = r["sessionId"].as_str().expect("sessionId").to_owned();
        Page { target, session }
    }

    /// The value of a JavaScript expression evaluated in the page, or the exception it threw.
    fn try_eval(&self, cdp: &mut Cdp, expr: &str) -> Result<Value, Value> {
        let r = cdp.call(
            Some(&self.session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// The value of a JavaScript expression evaluated in the page.
    fn eval(&self, cdp: &mut Cdp, expr: &str) -> Value {
        self.try_eval(cdp, expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    /// Polls `expr` until it is `true` (60 s at most; the page's lines in the message). An
    /// exception (the page is still loading) counts as not yet.
    fn wait_for(&self, cdp: &mut Cdp, what: &str, expr: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        while self.try_eval(cdp, expr) != Ok(json!(true)) {
            assert!(
                Instant::now() < end,
                "{what}: not within 60 s; state {:?}, lines {:?}",
                self.try_eval(cdp, "document.body.dataset.state"),
                self.try_eval(cdp, LINES)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The page's message list, one string per line as shown.
    fn lines(&self, cdp: &mut Cdp) -> Vec<String> {
        let v = self.eval(cdp, LINES);
        serde_json::from_value(v).expect("a list of strings")
    }

    /// The chat messages the page shows (`FROM:TEXT`), without joins and leaves.
    fn messages(&self, cdp: &mut Cdp) -> Vec<String> {
        let v = self.eval(
            cdp,
            "[...document.querySelectorAll('#messages li.message')].map(li => li.textContent)",
        );
        serde_json::from_value(v).expect("a list of strings")
    }

    fn wait_line(&self, cdp: &mut Cdp, line: &str) {
        let expr = format!(
            "[...document.querySelectorAll('#messages li')].some(li => li.textContent === {})",
            json!(line)
        );
        self.wait_for(cdp, &format!("the line {line:?}"), &expr);
    }

    /// Types `text` into the message box and clicks send, as a person would.
    fn say(&self, cdp: &mut Cdp, text: &str) {
        let expr = format!(
            "document.getElementById('text').value = {}; document.getElementById('send').click(); true",
            json!(text)
        );
        assert_eq!(self.eval(cdp, &expr), json!(true));
    }
}

#[test]
fn browser_pages_join_a_room_and_chat_through_the_relay() {
    let Some(chromium) = chromium() else { return };
    let _dog = Watchdog::new("browser", Duration::from_secs(240));
    let http = serve_page();
    let origin = format!("http://{http}");
    let bin = shmrelay_bin().display().to_string();
    // Only the page's origin may connect: the browser sends it, the listener checks it.
    let config = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
codec = "websocket"
path = "/chat"
origins = [{origin:?}]
workers = 1
worker_cmd = [{bin:?}, "worker", "chat"]
"#
    );
    let (relay, addrs) = Relay::start_config("browser", &config, 1, &[]);
    let ws_url = format!("ws://{}/chat", addrs[0]);
    let page_url = |name: &str| format!("{origin}/chat.html?ws={ws_url}&room=lobby&name={name}");

    let dir = scratch("browser");
    let mut browser = Browser::start(&chromium, &dir.join("profile"));
    let cdp = &mut browser.cdp;
    let joined = "document.body.dataset.state === 'joined'";

    let ada = Page::open(cdp, &page_url("ada"));
    ada.wait_for(cdp, "ada joins", joined);
    let bob = Page::open(cdp, &page_url("bob"));
    bob.wait_for(cdp, "bob joins", joined);
    ada.wait_line(cdp, "bob joined");

    ada.say(cdp, "hello bob");
    bob.wait_line(cdp, "ada:hello bob");
    // Text beyond ASCII crosses the relay as it was typed (UTF-8 validated by the front).
    bob.say(cdp, "hé ada 👋");
    ada.wait_line(cdp, "bob:hé ada 👋");
    bob.wait_line(cdp, "bob:hé ada 👋");

    // Both pages show the room's messages in the same order.
    let want = ["ada:hello bob", "bob:hé ada 👋"];
    assert_eq!(ada.messages(cdp), want);
    assert_eq!(bob.messages(cdp), want);

    // A page that joins later gets the room's history.
    let cy = Page::open(cdp, &page_url("cy"));
    cy.wait_for(cdp, "cy joins", joined);
    assert_eq!(cy.messages(cdp), want, "history for a late joiner");
    let here = cy
        .lines(cdp)
        .into_iter()
        .find(|l| l.starts_with("joined lobby"));
    assert_eq!(
        here.as_deref(),
        Some("joined lobby as cy (3 here: ada, bob, cy)")
    );

    // Closing bob's tab closes his connection: the others see him leave.
    cdp.call(None, "Target.closeTarget", json!({"targetId": bob.target}));
    ada.wait_line(cdp, "bob left");
    cy.wait_line(cdp, "bob left");
    cy.say(cdp, "bye");
    ada.wait_line(cdp, "cy:bye");

    // A page from another origin is refused by the listener (403) and never joins.
    let stranger = format!(
        "http://localhost:{}/chat.html?ws={ws_url}&name=eve",
        http.port()
    );
    let eve = Page::open(cdp, &stranger);
    eve.wait_for(
        cdp,
        "eve's connection fails",
        "document.body.dataset.state === 'closed'",
    );
    assert!(
        relay.front(0, |f| &f.ws_refused[1]) >= 1,
        "the front counted no 403: {}",
        relay.close_summary()
    );
    assert_eq!(
        relay.front(0, |f| &f.ws_upgrades),
        3,
        "ada, bob and cy only"
    );
    // The refusal cost nobody else anything.
    ada.say(cdp, "still here");
    cy.wait_line(cdp, "ada:still here");
    assert!(!cy.lines(cdp).iter().any(|l| l.contains("eve")));
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}
