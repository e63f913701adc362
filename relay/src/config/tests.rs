//! Unit tests of the settings: parsing, overrides and every refusal.

use super::*;

#[test]
fn defaults_are_valid_and_file_overrides() {
    let c = Config::default();
    c.validate().unwrap();
    assert_eq!(c.ring_capacity(), 4 << 20);
    let c: Config = toml::from_str("fronts = 3\nmax_frame = 4000000\n").unwrap();
    assert_eq!(c.fronts, 3);
    assert_eq!(c.ring_capacity(), 8 << 20);
    c.validate().unwrap();
    assert!(toml::from_str::<Config>("no_such_key = 1").is_err());
}

/// `text` parsed, checked valid, and kept whole through the text handed to the fronts.
fn valid(text: &str) -> Config {
    let c: Config = toml::from_str(text).unwrap();
    c.validate().unwrap();
    let back: Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    c
}

#[test]
fn listener_tables() {
    let c = valid(
        "fronts = 2\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworkers = 3\nworker_cmd = \"/bin/kv\"\n",
    );
    assert_eq!(c.total_workers(), 4);
    assert_eq!(c.worker_listeners(), [0, 1, 1, 1]);
    let ls = c.listeners();
    assert_eq!(ls[0].codec(), Codec::LengthPrefixed);
    assert_eq!(ls[1].codec(), Codec::Resp);
    // The default listener.
    let d = Config::default();
    assert_eq!(d.listeners().len(), 1);
    assert_eq!(d.total_workers(), 2);
    // An unknown codec is a parse error naming the valid ones, never a silent default.
    let err = |t: &str| toml::from_str::<Config>(t).unwrap_err().to_string();
    let bad = err("[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"xml\"\n");
    assert!(
        bad.contains("\"xml\" (length-prefixed, line, resp, websocket)"),
        "{bad}"
    );
    assert!(err("codec = \"Line\"\n").contains("unknown codec"));
    let set = |kv: &str| Config::default().with_overrides(&[kv.into()]);
    assert!(set("codec=xml").is_err());
    assert_eq!(set("codec=resp").unwrap().codec, Codec::Resp);
    assert!(set("codec=resp").unwrap().validate().is_ok());
}

#[test]
fn overrides_take_toml_values() {
    let c = Config::default()
        .with_overrides(&[
            "ping_min_ms=250".into(),
            "worker_cmd=/bin/cat".into(),
            "pause_accept_when_overloaded=false".into(),
        ])
        .unwrap();
    assert_eq!(c.ping_min_ms, 250);
    assert_eq!(c.worker_cmd, Some(WorkerCmd::Line("/bin/cat".into())));
    assert!(!c.pause_accept_when_overloaded);
    assert!(Config::default()
        .with_overrides(&["nope=1".into()])
        .is_err());
    assert!(Config::default()
        .with_overrides(&["fronts=many".into()])
        .is_err());
}

#[test]
fn a_worker_cmd_is_a_shell_word_line_or_an_array_and_a_bad_one_is_refused_at_start() {
    // Both forms survive the text handed to the fronts (`valid`).
    let c = valid("worker_cmd = \"/bin/sh -c 'exec cat -u'\"\n");
    let line = c.worker_cmd.as_ref().unwrap().argv().unwrap();
    assert_eq!(line, ["/bin/sh", "-c", "exec cat -u"]);
    let c = valid(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nworker_cmd = [\"/bin/sh\", \"-c\", \"exec cat\"]\n",
    );
    let array = c.listeners[0].worker_cmd.as_ref().unwrap().argv().unwrap();
    assert_eq!(array, ["/bin/sh", "-c", "exec cat"]);
    // Through --set too.
    let set = Config::default()
        .with_overrides(&["worker_cmd=[\"/bin/echo\", \"a b\"]".into()])
        .unwrap();
    assert_eq!(
        set.worker_cmd.unwrap().argv().unwrap(),
        ["/bin/echo", "a b"]
    );
    for bad in ["\"/bin/sh -c 'exec cat\"", "\"\"", "[]", "[\"\"]"] {
        let c: Config = toml::from_str(&format!("worker_cmd = {bad}\n")).unwrap();
        match c.validate() {
            Err(ConfigError::Invalid { name, problem }) => {
                assert_eq!(name, "worker_cmd", "{bad}: {problem}")
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn every_numeric_setting_out_of_range_is_refused_by_name() {
    for (set, name) in [
        ("max_frame=0", "max_frame"),
        ("max_frame=4000000000", "max_frame"),
        ("max_conns=0", "max_conns"),
        ("accept_rate=16777216", "accept_rate"),
        ("accept_burst=0", "accept_burst"),
        ("max_pending=0", "max_pending"),
        ("backlog=0", "backlog"),
        ("backlog=-1", "backlog"),
        ("crash_limit=0", "crash_limit"),
        ("ping_max_ms=0", "ping_max_ms"),
        ("ping_max_ms=700000000", "ping_max_ms"),
        ("heartbeat_timeout_ms=700000000", "heartbeat_timeout_ms"),
        ("idle_timeout_ms=700000000", "idle_timeout_ms"),
        ("drain_ms=700000000", "drain_ms"),
        ("crash_window_ms=0", "crash_window_ms"),
        ("hang_timeout_ms=0", "hang_timeout_ms"),
        ("failed_retry_max_ms=0", "failed_retry_max_ms"),
        ("frame_timeout_ms=700000000", "frame_timeout_ms"),
        ("ring_capacity=8589934592", "ring_capacity"),
    ] {
        let c = Config::default().with_overrides(&[set.into()]).unwrap();
        match c.validate() {
            Err(ConfigError::Invalid { name: n, problem }) => {
                assert_eq!(n, name, "{set}: {problem}");
                assert!(
                    problem.contains(':'),
                    "{set}: the reason is given: {problem}"
                );
            }
            other => panic!("{set}: {other:?}"),
        }
    }
    // The limits themselves are accepted.
    let ok = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::default().with_overrides(&sets).unwrap().validate()
    };
    ok(&["max_frame=1073741824", "partial_budget=1073741828"]).unwrap();
    ok(&[
        "max_frame=1",
        "idle_timeout_ms=0",
        "drain_ms=0",
        "frame_timeout_ms=0",
    ])
    .unwrap();
    ok(&[
        "accept_rate=16777215",
        "accept_burst=16777215",
        "backlog=65535",
    ])
    .unwrap();
}

#[test]
fn top_level_listener_settings_beside_listener_tables_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("shmrelay-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tables = "[[listener]]\nlisten = \"127.0.0.1:0\"\n";
    for (i, key) in [
        "listen = \"127.0.0.1:7000\"",
        "workers = 6",
        "codec = \"line\"",
        "worker_cmd = \"/bin/cat\"",
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("{i}.toml"));
        std::fs::write(&path, format!("{key}\n{tables}")).unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        let name = key.split(' ').next().unwrap();
        assert!(e.contains(&format!("top-level {name} is not used")), "{e}");
    }
    let path = dir.join("ok.toml");
    std::fs::write(&path, format!("fronts = 2\n{tables}")).unwrap();
    let c = Config::from_file(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // --set: a per-listener key beside tables, from the file or from --set itself.
    let e = c
        .with_overrides(&["workers=6".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("workers is not used with [[listener]] tables"),
        "{e}"
    );
    let both = Config::default().with_overrides(&[
        "listen=\"127.0.0.1:1\"".into(),
        "listener=[{listen=\"127.0.0.1:0\"}]".into(),
    ]);
    assert!(both.is_err());
    c.with_overrides(&["fronts=3".into()]).unwrap();
    // Whatever set it, a top-level value beside tables fails the validation too.
    let mut c = c;
    c.workers = 6;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::Invalid {
            name: "workers",
            ..
        })
    ));
    Config::default()
        .with_overrides(&["workers=6".into()])
        .unwrap();
}

#[test]
fn invalid_settings_are_named() {
    let c = Config {
        ring_capacity: Some(4096),
        ..Config::default()
    };
    assert!(matches!(
        c.validate(),
        Err(ConfigError::Invalid {
            name: "max_frame",
            ..
        })
    ));
    let c = Config {
        instance: "a/b".into(),
        ..Config::default()
    };
    assert!(matches!(
        c.validate(),
        Err(ConfigError::Invalid {
            name: "instance",
            ..
        })
    ));
    // Addresses are typed: a bad one is a parse error, from the file or from --set.
    assert!(toml::from_str::<Config>("listen = \"nowhere\"").is_err());
    assert!(toml::from_str::<Config>("metrics = \"localhost\"").is_err());
    let set = |kv: &str| Config::default().with_overrides(&[kv.into()]);
    assert!(set("listen=nowhere").is_err());
    assert_eq!(
        set("metrics=127.0.0.1:9187").unwrap().metrics,
        Some(([127, 0, 0, 1], 9187).into())
    );
    let c = Config {
        partial_budget: 1000,
        ..Config::default()
    };
    assert!(matches!(
        c.validate(),
        Err(ConfigError::Invalid {
            name: "partial_budget",
            ..
        })
    ));
}

#[test]
fn budgets_and_push_scope_from_toml() {
    let c: Config = toml::from_str(
        "push_scope = \"relay\"\npending_budget = 8388608\npartial_budget = 4194304\nframe_timeout_ms = 0\n",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.push_scope, PushScope::Relay);
    assert_eq!((c.pending_budget, c.partial_budget), (8 << 20, 4 << 20));
    assert_eq!(c.frame_timeout_ms, 0);
    assert_eq!(Config::default().push_scope, PushScope::Listener);
    assert!(toml::from_str::<Config>("push_scope = \"anywhere\"").is_err());
}

#[test]
fn websocket_settings_belong_to_websocket_listeners_and_are_checked() {
    let c = valid(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"websocket\"\npath = \"/chat\"\norigins = [\"https://a.example\"]\nsubprotocols = [\"chat.v1\"]\n",
    );
    let l = &c.listeners()[0];
    assert_eq!(l.codec(), Codec::WebSocket);
    assert_eq!(l.path.as_deref(), Some("/chat"));
    // The default listener takes them from the top level.
    let set = |kvs: &[&str]| {
        let kvs: Vec<String> = kvs.iter().map(|s| s.to_string()).collect();
        Config::default().with_overrides(&kvs).unwrap()
    };
    let d = set(&["codec=websocket", "path=/ws", "subprotocols=[\"v2\"]"]);
    d.validate().unwrap();
    assert_eq!(d.listeners()[0].subprotocols, ["v2"]);
    let invalid = |kvs: &[&str]| set(kvs).validate().unwrap_err().to_string();
    assert!(invalid(&["path=/ws"]).contains("path is for codec = \"websocket\""));
    assert!(invalid(&["codec=line", "origins=[\"https://a\"]"]).contains("origins"));
    assert!(invalid(&["codec=websocket", "path=chat"]).contains("starts with /"));
    assert!(invalid(&["codec=websocket", "path=/a?b=1"]).contains("no query"));
    assert!(invalid(&["codec=websocket", "subprotocols=[\"a b\"]"]).contains("not an HTTP token"));
    assert!(invalid(&["codec=websocket", "origins=[\"\"]"]).contains("not an origin"));
    // Beside [[listener]] tables they are per listener.
    let err = Config::default()
        .with_overrides(&[
            "listener=[{listen=\"127.0.0.1:0\"}]".into(),
            "path=/x".into(),
        ])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("path is not used with [[listener]] tables"),
        "{err}"
    );
}
