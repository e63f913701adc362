//! A minimal HTTP/1.1 endpoint serving an instance's counters in the Prometheus text format.
//!
//! One thread, one blocking [`TcpListener`], one request per connection (`Connection:
//! close`), read and write timeouts so a client that stalls cannot hold the thread for long.
//! Each `GET /metrics` maps the instance's stats segment and rings read-only and renders
//! [`report::prometheus`] — the same read path as `relayctl`, so a scrape never touches the
//! data path. Anything else gets a 4xx answer; a malformed request never panics the thread.
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` (any query string) | 200, `text/plain; version=0.0.4` |
//! | `HEAD /metrics` | 200, headers only |
//! | another method on `/metrics` | 405 |
//! | another path | 404 |
//! | not HTTP, or headers over 8 KiB | 400 |
//! | the stats segment cannot be read | 503 with the reason |

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::report::{self, InstanceReport};

/// Per-connection read and write timeout.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;

/// Binds `addr` and serves `GET /metrics` for `instance` from a new thread.
///
/// Returns the bound address (useful with port 0) and the thread's handle; the thread runs
/// until the process exits.
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
        .spawn(move || serve(&listener, &instance))?;
    Ok((local, thread))
}

fn serve(listener: &TcpListener, instance: &str) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // A failed exchange concerns only that client.
                let _ = handle(stream, instance);
            }
            // EMFILE and the like: back off instead of spinning.
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => {}
        }
    }
}

fn handle(mut stream: TcpStream, instance: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = match read_head(&mut stream) {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return respond(
                &mut stream,
                400,
                "Bad Request",
                "text/plain",
                b"bad request\n",
                true,
            );
        }
        Err(e) => return Err(e),
    };
    let (status, reason, ctype, body, with_body) = route(&head, instance);
    respond(
        &mut stream,
        status,
        reason,
        ctype,
        body.as_bytes(),
        with_body,
    )
}

type Answer = (u16, &'static str, &'static str, String, bool);

/// Decides the answer to a request head (the bytes up to the blank line).
fn route(head: &[u8], instance: &str) -> Answer {
    let text = |s: &str| s.to_owned();
    let plain = "text/plain; charset=utf-8";
    let Some(line) = head
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
    else {
        return (400, "Bad Request", plain, text("bad request\n"), true);
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (400, "Bad Request", plain, text("bad request line\n"), true);
    };
    if !version.starts_with("HTTP/1.") {
        return (400, "Bad Request", plain, text("HTTP/1.x only\n"), true);
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return (
            404,
            "Not Found",
            plain,
            text("not found: try /metrics\n"),
            method != "HEAD",
        );
    }
    if method != "GET" && method != "HEAD" {
        return (405, "Method Not Allowed", plain, text("GET only\n"), true);
    }
    match InstanceReport::read(instance) {
        Ok(r) => (
            200,
            "OK",
            report::PROMETHEUS_CONTENT_TYPE,
            report::prometheus(&r),
            method == "GET",
        ),
        Err(e) => (
            503,
            "Service Unavailable",
            plain,
            format!("{e}\n"),
            method == "GET",
        ),
    }
}

/// Reads up to the end of the request head. `InvalidData` if the peer closes first or the
/// head is too long.
fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "closed mid-request",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n").or_else(|| find(&buf, b"\n\n")) {
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
    ctype: &str,
    body: &[u8],
    with_body: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if with_body {
        bytes.extend_from_slice(body);
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
                .env("SHMRELAY_SHM_DIR", &tmp.0)
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
