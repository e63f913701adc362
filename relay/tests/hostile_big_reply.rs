//! Issue 12.9: a reply longer than one ring record is neither dropped nor allowed to shift the
//! connection's stream of replies: the worker SDK splits it over records and the front writes
//! them out as one reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use shmrelay_tests::Relay;

fn kv_relay(name: &str) -> (Relay, SocketAddr) {
    let kv = format!("{} worker kv", env!("CARGO_BIN_EXE_shmrelay"));
    let (relay, addrs) = Relay::start_config(
        name,
        &format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworker_cmd = \"{kv}\"\n"
        ),
        1,
        &[],
    );
    (relay, addrs[0])
}

fn resp_cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Reads one RESP value, returned raw.
fn read_value(r: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).expect("reply line");
    assert!(line.ends_with(b"\r\n"), "unterminated reply line {line:?}");
    let n: i64 = std::str::from_utf8(&line[1..line.len() - 2])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    match line[0] {
        b'$' if n >= 0 => {
            let mut body = vec![0u8; n as usize + 2];
            r.read_exact(&mut body).expect("bulk body");
            assert_eq!(&body[n as usize..], b"\r\n", "bulk string not terminated");
            line.extend(body);
        }
        b'*' if n > 0 => {
            for _ in 0..n {
                line.extend(read_value(r));
            }
        }
        _ => {}
    }
    line
}

fn value(i: u8) -> Vec<u8> {
    (0..900 * 1024).map(|j| (j % 251) as u8 ^ i).collect()
}

#[test]
fn lpop_of_three_900k_values_is_one_whole_reply_and_the_stream_stays_in_step() {
    let (_relay, addr) = kv_relay("bigreply");
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for i in 0..3u8 {
        w.write_all(&resp_cmd(&[b"RPUSH", b"biglist", &value(i)]))
            .unwrap();
        assert_eq!(read_value(&mut r), format!(":{}\r\n", i + 1).as_bytes());
    }
    // The 2.7 MB reply, then two more commands pipelined behind it.
    let mut cmds = resp_cmd(&[b"LPOP", b"biglist", b"3"]);
    cmds.extend(resp_cmd(&[b"LLEN", b"biglist"]));
    cmds.extend(resp_cmd(&[b"PING"]));
    w.write_all(&cmds).unwrap();
    let mut want = b"*3\r\n".to_vec();
    for i in 0..3u8 {
        want.extend(format!("${}\r\n", 900 * 1024).as_bytes());
        want.extend(value(i));
        want.extend_from_slice(b"\r\n");
    }
    let got = read_value(&mut r);
    assert_eq!(got.len(), want.len(), "LPOP reply length");
    assert!(got == want, "LPOP reply differs");
    assert_eq!(read_value(&mut r), b":0\r\n", "LLEN after the LPOP");
    assert_eq!(read_value(&mut r), b"+PONG\r\n", "the stream shifted");
}
