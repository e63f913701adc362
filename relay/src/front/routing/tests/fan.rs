//! Pool-wide commands in a routed connection's reply order: one merged reply, in its turn
//! (random arrival orders with pool-wide commands among the requests: `tests.rs`).

use super::*;

#[test]
fn a_fan_out_between_single_requests_comes_out_merged_in_its_turn() {
    // GET a (worker 3), DBSIZE (3 and 4), GET b (worker 4).
    let mut f = Front::sent(&[(3, 10)]);
    f.push_fan(PoolWide::Dbsize, &[(3, 20), (4, 5)]);
    f.push(4, 15);
    assert_eq!(f.reply(4, 5, b":2\r\n"), Reply::Merge);
    assert_eq!(f.reply(4, 15, b"$1\r\nb\r\n"), Reply::Hold);
    f.end_batch();
    assert_eq!(f.out, b"", "nothing before GET a's reply");
    assert_eq!(f.reply(3, 10, b"$1\r\na\r\n"), Reply::Write);
    assert_eq!(f.reply(3, 20, b":3\r\n"), Reply::Merge);
    f.end_batch();
    assert_eq!(
        f.out, b"$1\r\na\r\n",
        "worker 3's part may have more replies coming"
    );
    f.complete(3, 20);
    assert_eq!(f.out, b"$1\r\na\r\n:5\r\n$1\r\nb\r\n");
    f.complete(4, 15);
    assert!(f.route.idle());
    assert_eq!(
        f.route.state_bytes(),
        0,
        "the fan-out's memory is given back"
    );
}

#[test]
fn a_fan_out_alone_waits_on_every_part() {
    let mut f = Front::new();
    f.push_fan(PoolWide::Flushall, &[(3, 7), (4, 9), (5, 2)]);
    assert!(f.route.state_bytes() > 0);
    assert_eq!(f.reply(5, 2, b"+OK\r\n"), Reply::Merge);
    assert_eq!(f.reply(3, 7, b"+OK\r\n"), Reply::Merge);
    f.end_batch();
    f.complete(3, 7);
    f.complete(5, 2);
    assert_eq!(f.out, b"", "worker 4 has not answered");
    assert!(f.routing.has_waiters(4));
    assert_eq!(f.reply(4, 9, b"+OK\r\n"), Reply::Merge);
    f.complete(4, 9);
    assert_eq!(f.out, b"+OK\r\n");
    assert!(f.route.idle());
    assert_eq!(f.route.state_bytes(), 0);
}

#[test]
fn a_part_answered_without_a_reply_is_an_error_not_a_hang() {
    // Worker 4 was replaced and its frames were not carried: its positions restart past the
    // request, which counts as answered, with no reply.
    let mut f = Front::new();
    f.push_fan(PoolWide::Dbsize, &[(3, 7), (4, 9)]);
    f.push(3, 12);
    assert_eq!(f.reply(3, 7, b":1\r\n"), Reply::Merge);
    f.complete(3, 7);
    f.routing.restart(4, 30);
    f.advance();
    let out = String::from_utf8(f.out.clone()).unwrap();
    assert!(
        out.starts_with("-ERR DBSIZE: worker 2 of 2 in the pool did not answer"),
        "{out}"
    );
    assert_eq!(f.reply(3, 12, b"+x\r\n"), Reply::Write);
    f.complete(3, 12);
    assert!(f.route.idle());
}
