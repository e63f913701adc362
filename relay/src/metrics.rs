//! A minimal HTTP/1.1 endpoint serving an instance's counters in the OpenMetrics text format.
//!
//! One accept thread hands each connection to a short-lived thread of its own, at most
//! [`MAX_CLIENTS`] at a time, so a client that stalls holds only its own thread (for at most
//! [`IO_TIMEOUT`]) while other scrapes go on. Requests are parsed with `httparse`; one request
//! per connection (`Connection: close`); the head must arrive whole, at most 8 KiB, within
//! [`IO_TIMEOUT`]. Each `GET /metrics` maps the instance's stats segment and rings read-only
//! and renders [`report::prometheus`] — the same read path as `relayctl`, so a scrape never
//! touches the data path. Anything else gets a 4xx answer; a malformed request never panics
//! a thread.
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` (any query string) | 200, [`report::PROMETHEUS_CONTENT_TYPE`] |
//! | `HEAD /metrics` | 200, headers only |
//! | another method on `/metrics` | 405 |
//! | another path | 404 |
//! | not HTTP/1.x, or headers over 8 KiB | 400 |
//! | the stats segment cannot be read | 503 with the reason |
//! | [`MAX_CLIENTS`] connections already being served | 503 `busy`, at once |

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::report::{self, InstanceReport};

/// How long a client has to send its request head, and the timeout of each write of the
/// answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; one more is answered 503 without being read.
pub const MAX_CLIENTS: usize = 8;
/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;

/// Binds `addr` and serves `GET /metrics` for `instance` from a new thread.
///
/// Returns the bound address (useful with port 0) and the accept thread's handle; it runs
/// until the process exits, and starts one short-lived thread per connection.
///
/// # Errors
///
/// Binding the listener or starting the thread failed.
///
/// # Examples
///
/// ```no_run
/// let (addr, _thread) = shmrelay::metrics::spawn("127.0.0.1:9464".parse()?, "default".into())?;
/// println!("metrics on http://{addr}/metrics");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn spawn(addr: SocketAddr, instance: String) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || serve(&listener, &Arc::from(instance)))?;
    Ok((local, thread))
}

fn serve(listener: &TcpListener, instance: &Arc<str>) {
    // Only a count of live handler threads: it guards no data, so Relaxed is enough.
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::Relaxed);
                    // A fresh socket's send buffer takes these few bytes without blocking.
                    let _ = busy(stream);
                    continue;
                }
                let (instance, done) = (Arc::clone(instance), Slot(Arc::clone(&active)));
                // Without a thread (out of memory or threads) the closure is dropped: that
                // client is closed and the slot given back.
                let _ = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || {
                        let _done = done;
                        // A failed exchange concerns only that client.
                        let _ = handle(stream, &instance);
                    });
            }
            // EMFILE and the like: back off instead of spinning.
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => {}
        }
    }
}

/// A handler's place among the [`MAX_CLIENTS`]; given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn busy(mut stream: TcpStream) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_millis(100)))?;
    let answer = Answer::plain(
        503,
        "Service Unavailable",
        "busy: too many scrapes at once\n",
    );
    respond(&mut stream, &answer)
}

fn handle(mut stream: TcpStream, instance: &str) -> io::Result<()> {
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let answer = match read_head(&mut stream, Instant::now() + IO_TIMEOUT) {
        Ok(head) => route(&head, instance),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Answer::plain(400, "Bad Request", "bad request\n")
        }
        Err(e) => return Err(e),
    };
    respond(&mut stream, &answer)
}

/// What to send back.
struct Answer {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// False for HEAD: headers only.
    with_body: bool,
}

impl Answer {
    fn plain(status: u16, reason: &'static str, body: impl Into<String>) -> Answer {
        Answer {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            with_body: true,
        }
    }
}

/// Decides the answer to a request head (the bytes up to and including the blank line).
fn route(head: &[u8], instance: &str) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let (Ok(httparse::Status::Complete(_)), Some(method), Some(target)) =
        (req.parse(head), req.method, req.path)
    else {
        return Answer::plain(400, "Bad Request", "bad request line\n");
    };
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        let mut a = Answer::plain(404, "Not Found", "not found: try /metrics\n");
        a.with_body = method != "HEAD";
        return a;
    }
    if method != "GET" && method != "HEAD" {
        return Answer::plain(405, "Method Not Allowed", "GET only\n");
    }
    let mut a = match InstanceReport::read(instance) {
        Ok(r) => Answer {
            content_type: report::PROMETHEUS_CONTENT_TYPE,
            ..Answer::plain(200, "OK", report::prometheus(&r))
        },
        Err(e) => Answer::plain(503, "Service Unavailable", format!("{e}\n")),
    };
    a.with_body = method == "GET";
    a
}

/// Reads up to the end of the request head, which must be complete by `deadline`.
/// `InvalidData` if it is not HTTP/1.x, the peer closes first or the head is too long;
/// `TimedOut` past the deadline.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_owned());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(invalid("closed mid-request"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        match httparse::Request::new(&mut headers).parse(&buf) {
            Ok(httparse::Status::Complete(end)) => {
                buf.truncate(end);
                return Ok(buf);
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(invalid("request head too long")),
            Err(e) => return Err(invalid(&e.to_string())),
        }
    }
}

fn respond(stream: &mut TcpStream, a: &Answer) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        a.status,
        a.reason,
        a.content_type,
        a.body.len()
    );
    if a.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if a.with_body {
        bytes.extend_from_slice(a.body.as_bytes());
    }
    stream.write_all(&bytes)?;
    stream.flush()?;
    // Tell the client we are done before the close, so it never sees a reset.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::TempShm;
    use crate::stats::{add, Stats};
    use std::time::Instant;

    fn get(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, head.to_owned(), body.to_owned())
    }

    /// Runs in a child process of the test binary (`--exact`), so that `SHMRELAY_SHM_DIR`
    /// is set from the start for that process only, never changed under other tests.
    #[test]
    fn serves_prometheus_text() {
        const CHILD: &str = "SHMRELAY_METRICS_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let tmp = TempShm::new("metrics");
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "metrics::tests::serves_prometheus_text",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .env(shmrelay_worker::protocol::env::SHM_DIR, &tmp.0)
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "child test failed:\n{log}");
            assert!(log.contains("1 passed"), "child ran no test:\n{log}");
            return;
        }
        let instance = "metrics-test";
        // A control segment and the view a supervisor publishes from it (and locks: up).
        let stats = Stats::create_memfd(1, 1).unwrap();
        add(&stats.front(0).accepts, 11);
        add(&stats.front(0).bytes_in, 4096);
        let path = crate::names::stats_path(instance);
        let mut view = crate::view::Publisher::create(&path, 1, &stats, 1, 1).unwrap();
        view.publish(&stats, &[]).unwrap();
        let (addr, _thread) = spawn("127.0.0.1:0".parse().unwrap(), instance.into()).unwrap();

        let (status, head, body) = get(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(status, 200, "{head}");
        assert!(
            head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
            "{head}"
        );
        let samples = report::prom::tests::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        let find = |name: &str| samples.iter().find(|s| s.0 == name).map(|s| s.2);
        assert_eq!(find("shmrelay_front_accepts_total"), Some(11.0));
        assert_eq!(find("shmrelay_front_bytes_in_total"), Some(4096.0));
        assert_eq!(find("shmrelay_up"), Some(1.0));
        assert!(samples
            .iter()
            .all(|s| s.1.iter().any(|(k, v)| k == "instance" && v == instance)));

        // A client that sends half a request and stalls holds only its own thread: another
        // scrape is answered at once, not after the stalled one's IO_TIMEOUT.
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(b"GET /metr").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").0, 200);
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "scrape behind a stalled client took {took:?}"
        );
        drop(stalled);
        // MAX_CLIENTS stalled clients: one more is told 503 at once; once they are gone,
        // scrapes are served again.
        let stalled: Vec<TcpStream> = (0..MAX_CLIENTS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
                s
            })
            .collect();
        let t0 = Instant::now();
        let mut status = 0;
        while t0.elapsed() < Duration::from_secs(4) {
            status = get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").0;
            if status == 503 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            status, 503,
            "no busy answer with {MAX_CLIENTS} stalled clients"
        );
        drop(stalled);
        let t0 = Instant::now();
        while get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(20), "never served again");
            std::thread::sleep(Duration::from_millis(20));
        }

        assert_eq!(get(addr, b"GET / HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(get(addr, b"garbage\r\n\r\n").0, 400);
        assert_eq!(get(addr, b"\xff\xfe\r\n\r\n").0, 400);
        let (status, _, body) = get(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert_eq!((status, body.as_str()), (200, ""));
        // A client that closes mid-request, then one that sends too much: the server lives.
        drop(TcpStream::connect(addr).unwrap());
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 3 * MAX_HEAD));
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&big);
        drop(s);
        assert_eq!(get(addr, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n").0, 200);

        // The segment goes away: 503, not a crash.
        assert!(view.remove());
        drop(stats);
        assert_eq!(get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").0, 503);
    }
}
