//! frame-client's exit status against a scripted server: an error frame (with or without the
//! close that usually follows it) makes it exit 1, plain replies 0.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};

/// Serves one connection with `script` on a free loopback port; returns HOST:PORT.
fn serve(script: fn(&mut TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            script(&mut s);
        }
    });
    addr
}

/// Reads one frame's payload (`None` at EOF).
fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).ok()?;
    Some(payload)
}

fn write_frame(s: &mut TcpStream, payload: &[u8]) {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    s.write_all(&frame).unwrap();
}

const ERROR: &str = "shmrelay-error: frame of 5000 bytes exceeds the maximum of 1000";

fn client(addr: &str, args: &[&str]) -> (Output, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_frame-client"))
        .args(["--addr", addr, "--timeout", "10"])
        .args(args)
        .output()
        .expect("run frame-client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Answers the first frame with an error frame and closes, as the relay does for bad input.
fn error_then_close(s: &mut TcpStream) {
    if read_frame(s).is_some() {
        write_frame(s, ERROR.as_bytes());
    }
}

#[test]
fn an_error_frame_and_a_close_exit_non_zero() {
    let addr = serve(error_then_close);
    let (out, stdout, stderr) = client(&addr, &["hello"]);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stdout, format!("{ERROR}\n"), "the reply is still printed");
    assert!(
        stderr.contains("answered message 1 with an error frame: shmrelay-error:"),
        "{stderr}"
    );
}

#[test]
fn a_message_after_the_error_frame_names_both() {
    let addr = serve(error_then_close);
    let (out, _, stderr) = client(&addr, &["bad", "next"]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("answered message 1 with an error frame"),
        "{stderr}"
    );
    assert!(
        stderr.contains("closed the connection before replying to message 2")
            || stderr.contains("cannot send"),
        "{stderr}"
    );
}

#[test]
fn an_error_frame_pushed_while_waiting_exits_non_zero() {
    let addr = serve(|s| {
        if read_frame(s).is_some() {
            write_frame(s, b"ok");
            write_frame(s, ERROR.as_bytes());
        }
    });
    let (out, stdout, stderr) = client(&addr, &["--wait", "2", "hello"]);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stdout, format!("ok\n{ERROR}\n"));
    assert!(stderr.contains("sent an error frame"), "{stderr}");
}

#[test]
fn plain_replies_exit_zero() {
    let addr = serve(|s| {
        while let Some(f) = read_frame(s) {
            write_frame(s, &f);
        }
    });
    let (out, stdout, stderr) = client(&addr, &["one", "two"]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "one\ntwo\n");
}
