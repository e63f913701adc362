//! The opening handshake of a websocket listener (RFC 6455 section 4.2): a request checked
//! against the listener's settings, and the response bytes (101 or an HTTP error). No I/O.

use base64::Engine;
use shmrelay_worker::codec::websocket::Upgrade;

/// Longest handshake request (request line and headers): more is refused with 400.
pub(in crate::front) const MAX_REQUEST: usize = 8 * 1024;
/// Most header lines in a handshake request.
const MAX_HEADERS: usize = 48;
/// The GUID of RFC 6455 section 1.3, appended to the client's key before hashing.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A listener's handshake settings (from its `path`, `origins` and `subprotocols`).
#[derive(Clone, Debug, Default)]
pub(in crate::front) struct Settings {
    pub path: Option<String>,
    pub origins: Vec<String>,
    pub subprotocols: Vec<String>,
}

/// Why a handshake was refused: the HTTP status it gets (each counted apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::front) enum Refusal {
    /// 400: malformed, too large, or a required header is missing or invalid.
    BadRequest(&'static str),
    /// 403: an `Origin` not in the allowlist.
    Forbidden,
    /// 404: another path than the listener's.
    NotFound,
    /// 405: not a `GET`.
    MethodNotAllowed,
    /// 426: not a websocket upgrade, or another protocol version than 13.
    UpgradeRequired(&'static str),
}

impl Refusal {
    /// The status code.
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::Forbidden => 403,
            Refusal::NotFound => 404,
            Refusal::MethodNotAllowed => 405,
            Refusal::UpgradeRequired(_) => 426,
        }
    }

    /// Index of its counter in `FrontStats::ws_refused`.
    pub fn index(self) -> usize {
        match self {
            Refusal::BadRequest(_) => 0,
            Refusal::Forbidden => 1,
            Refusal::NotFound => 2,
            Refusal::MethodNotAllowed => 3,
            Refusal::UpgradeRequired(_) => 4,
        }
    }

    /// The response: status line, the headers the status calls for, a one-line body.
    pub fn response(self) -> Vec<u8> {
        let (reason, extra, body) = match self {
            Refusal::BadRequest(why) => ("Bad Request", "", why),
            Refusal::Forbidden => ("Forbidden", "", "origin not allowed"),
            Refusal::NotFound => ("Not Found", "", "no websocket endpoint at this path"),
            Refusal::MethodNotAllowed => ("Method Not Allowed", "Allow: GET\r\n", "use GET"),
            Refusal::UpgradeRequired(why) => (
                "Upgrade Required",
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
                why,
            ),
        };
        format!(
            "HTTP/1.1 {} {reason}\r\n{extra}Connection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}\n",
            self.status(),
            body.len() + 1
        )
        .into_bytes()
    }
}

/// An accepted handshake: the 101 response, the OPEN payload for the worker, and how many
/// bytes of the buffer the request took (what follows is already websocket data).
#[derive(Debug, PartialEq, Eq)]
pub(in crate::front) struct Accepted {
    pub response: Vec<u8>,
    pub open: Vec<u8>,
    pub consumed: usize,
}

/// Checks the request at the start of `buf`: `Ok(None)` while it is incomplete (and within
/// [`MAX_REQUEST`]).
pub(in crate::front) fn check(
    buf: &[u8],
    settings: &Settings,
    peer: &str,
) -> Result<Option<Accepted>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(Refusal::BadRequest("request too large")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::BadRequest("too many headers"))
        }
        Err(_) => return Err(Refusal::BadRequest("malformed request")),
    };
    if consumed > MAX_REQUEST {
        return Err(Refusal::BadRequest("request too large"));
    }
    if req.method != Some("GET") {
        return Err(Refusal::MethodNotAllowed);
    }
    if req.version != Some(1) {
        return Err(Refusal::BadRequest("HTTP/1.1 required"));
    }
    let target = req.path.unwrap_or("");
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !target.starts_with('/') {
        return Err(Refusal::BadRequest("request target is not a path"));
    }
    if settings.path.as_deref().is_some_and(|p| p != path) {
        return Err(Refusal::NotFound);
    }
    let hs: &[httparse::Header<'_>] = req.headers;
    let all = |name: &'static str| {
        hs.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let one = |name: &'static str| -> Result<Option<&str>, Refusal> {
        let mut it = all(name);
        let first = it.next();
        if it.next().is_some() {
            return Err(Refusal::BadRequest(
                "a header that may appear once appears twice",
            ));
        }
        first
            .map(|v| std::str::from_utf8(v).map(str::trim))
            .transpose()
            .map_err(|_| Refusal::BadRequest("header value is not UTF-8"))
    };
    let has_token = |name: &'static str, token: &str| {
        all(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Refusal::UpgradeRequired(
            "a websocket upgrade request is required",
        ));
    }
    if one("sec-websocket-version")? != Some("13") {
        return Err(Refusal::UpgradeRequired(
            "Sec-WebSocket-Version 13 is required",
        ));
    }
    if one("host")?.is_none_or(str::is_empty) {
        return Err(Refusal::BadRequest("Host header missing"));
    }
    let key = one("sec-websocket-key")?.ok_or(Refusal::BadRequest("Sec-WebSocket-Key missing"))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if decoded.map(|k| k.len()) != Ok(16) {
        return Err(Refusal::BadRequest(
            "Sec-WebSocket-Key is not 16 bytes in base64",
        ));
    }
    if let Some(origin) = one("origin")? {
        if !settings.origins.is_empty() && !settings.origins.iter().any(|o| o == origin) {
            return Err(Refusal::Forbidden);
        }
    }
    let offered: Vec<&[u8]> = all("sec-websocket-protocol")
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .collect();
    let subprotocol = settings
        .subprotocols
        .iter()
        .find(|p| offered.contains(&p.as_bytes()))
        .map_or("", String::as_str);
    let authorization = one("authorization")?.unwrap_or("");
    let mut cookies = Vec::new();
    for v in all("cookie") {
        let v =
            std::str::from_utf8(v).map_err(|_| Refusal::BadRequest("header value is not UTF-8"))?;
        cookies.push(v.trim());
    }
    let cookie = cookies.join("; ");
    let upgrade = Upgrade {
        path: target,
        subprotocol,
        authorization,
        cookie: &cookie,
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if !subprotocol.is_empty() {
        response.push_str(&format!("Sec-WebSocket-Protocol: {subprotocol}\r\n"));
    }
    response.push_str("\r\n");
    Ok(Some(Accepted {
        response: response.into_bytes(),
        open: upgrade.encode_open(peer),
        consumed,
    }))
}

/// `Sec-WebSocket-Accept` for a client's key: base64 of the SHA-1 of the key and the GUID.
pub(in crate::front) fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://ok\r\nSec-WebSocket-Protocol: a, chat\r\nAuthorization: Bearer t\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n";

    fn settings() -> Settings {
        Settings {
            path: Some("/chat".into()),
            origins: vec!["https://ok".into()],
            subprotocols: vec!["chat".into(), "a".into()],
        }
    }

    #[test]
    fn the_rfc_example_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn a_good_request_is_accepted_with_what_the_worker_needs() {
        let mut buf = GOOD.as_bytes().to_vec();
        buf.extend_from_slice(b"\x81\x80abcd");
        let a = check(&buf, &settings(), "p:1").unwrap().unwrap();
        assert_eq!(a.consumed, GOOD.len());
        let text = String::from_utf8(a.response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        // The listener's preference wins: "chat" comes first in its list.
        assert!(text.contains("Sec-WebSocket-Protocol: chat\r\n"), "{text}");
        assert!(!text.contains("Extensions"), "nothing negotiated: {text}");
        let (peer, up) = Upgrade::decode_open(&a.open);
        assert_eq!(peer, "p:1");
        let up = up.unwrap();
        assert_eq!(
            (up.path, up.subprotocol, up.authorization, up.cookie),
            ("/chat?room=1", "chat", "Bearer t", "a=1; b=2")
        );
        for cut in 0..GOOD.len() {
            assert_eq!(check(&buf[..cut], &settings(), "p"), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn every_bad_request_gets_its_status() {
        let s = settings();
        let with = |from: &str, to: &str| GOOD.replacen(from, to, 1);
        let cases = [
            (with("GET", "POST"), 405),
            (with("/chat?", "/other?"), 404),
            (with("https://ok", "https://evil"), 403),
            (with("Upgrade: websocket\r\n", ""), 426),
            (with("keep-alive, Upgrade", "keep-alive"), 426),
            (with("Version: 13", "Version: 8"), 426),
            (
                with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                400,
            ),
            (with("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),
            (with("Host: x\r\n", ""), 400),
            (with("HTTP/1.1", "HTTP/1.0"), 400),
            (with("GET /chat", "GET chat"), 400),
            ("\x16\x03\x01garbage\r\n\r\n".to_string(), 400),
        ];
        for (req, status) in cases {
            let got = check(req.as_bytes(), &s, "p").map(|_| ()).unwrap_err();
            assert_eq!(got.status(), status, "{req:?}");
            let resp = String::from_utf8(got.response()).unwrap();
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
        }
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST));
        assert_eq!(
            check(big.as_bytes(), &s, "p").unwrap_err(),
            Refusal::BadRequest("request too large")
        );
        // No Origin: not a browser, allowed; no subprotocol in common: none selected.
        let open = Settings::default();
        let req = with("Origin: https://ok\r\n", "");
        let a = check(req.as_bytes(), &open, "p").unwrap().unwrap();
        assert!(!String::from_utf8(a.response)
            .unwrap()
            .contains("Sec-WebSocket-Protocol"));
    }
}
