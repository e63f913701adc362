//! The `[cluster]` section: how this relay's cluster workers join NATS, its checks, and the
//! worker environment it becomes (`shmrelay_worker::protocol::env::CLUSTER_URLS` and the rest).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shmrelay_worker::protocol::env;

use super::ConfigError;

/// `[cluster]`: the NATS servers and this node's name, for the `cluster-worker` pub/sub
/// workers (crate `shmrelay-cluster`). The relay itself never connects to NATS: it hands
/// these settings to every worker in its environment.
///
/// ```toml
/// [cluster]
/// urls = ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
/// node = "edge-1"            # unique per relay in the cluster
/// # prefix = "shmrelay"      # first token(s) of every subject
/// # credentials = "/etc/shmrelay/nats.creds"   # or user + password, or token
/// ```
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`, `tls://host:port`, or `host:port`).
    pub urls: Vec<String>,
    /// This node's name in the cluster (`[A-Za-z0-9_-]`, 1-64 bytes): part of every
    /// cluster-wide connection id, so unique per relay.
    pub node: String,
    /// The first token(s) of every NATS subject (dot-separated names): clusters sharing one
    /// NATS keep apart by prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// A NATS credentials file (JWT and nkey seed).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// NATS user (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// NATS password (with `user`). Workers get it in their environment: prefer
    /// `credentials` where other local users could read it.
    #[serde(default)]
    pub password: Option<String>,
    /// NATS authentication token (same caveat as `password`).
    #[serde(default)]
    pub token: Option<String>,
}

fn default_prefix() -> String {
    "shmrelay".into()
}

impl ClusterConfig {
    /// Checks the URLs, the names and that at most one way to authenticate is given.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming `cluster.FIELD`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name, problem: String| Err(ConfigError::Invalid { name, problem });
        if self.urls.is_empty() {
            return bad("cluster.urls", "no NATS URL given".into());
        }
        for url in &self.urls {
            check_url(url).map_err(|problem| ConfigError::Invalid {
                name: "cluster.urls",
                problem: format!("{url:?}: {problem}"),
            })?;
        }
        if !crate::names::valid_instance(&self.node) {
            return bad(
                "cluster.node",
                format!("{:?}: use 1-64 of [A-Za-z0-9_-]", self.node),
            );
        }
        if !self.prefix.split('.').all(crate::names::valid_instance) {
            return bad(
                "cluster.prefix",
                format!(
                    "{:?}: dot-separated names of 1-64 of [A-Za-z0-9_-]",
                    self.prefix
                ),
            );
        }
        match (&self.user, &self.password) {
            (Some(_), None) => return bad("cluster.password", "user is set without it".into()),
            (None, Some(_)) => return bad("cluster.user", "password is set without it".into()),
            _ => {}
        }
        let ways = [
            self.credentials.is_some(),
            self.user.is_some(),
            self.token.is_some(),
        ];
        if ways.iter().filter(|&&w| w).count() > 1 {
            return bad(
                "cluster.credentials",
                "give one of: credentials, user and password, token".into(),
            );
        }
        if let Some(path) = &self.credentials {
            if !path.is_file() {
                return bad(
                    "cluster.credentials",
                    format!("{}: not a readable file", path.display()),
                );
            }
        }
        Ok(())
    }

    /// The worker environment these settings become.
    pub fn worker_env(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (env::CLUSTER_URLS, self.urls.join(",")),
            (env::CLUSTER_NODE, self.node.clone()),
            (env::CLUSTER_PREFIX, self.prefix.clone()),
        ];
        if let Some(c) = &self.credentials {
            v.push((env::CLUSTER_CREDS, c.display().to_string()));
        }
        for (var, value) in [
            (env::CLUSTER_USER, &self.user),
            (env::CLUSTER_PASSWORD, &self.password),
            (env::CLUSTER_TOKEN, &self.token),
        ] {
            if let Some(value) = value {
                v.push((var, value.clone()));
            }
        }
        v
    }
}

/// `[nats|tls|ws|wss://][user[:pass]@]host[:port]` with a non-empty host and a numeric port.
fn check_url(url: &str) -> Result<(), String> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => {
            if !["nats", "tls", "ws", "wss"].contains(&scheme) {
                return Err(format!("scheme {scheme:?} is not nats, tls, ws or wss"));
            }
            rest
        }
        None => url,
    };
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.trim_end_matches('/');
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        // [v6]:port
        let (h, p) = h.split_once(']').ok_or("unterminated [IPv6] address")?;
        (h, p.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains(['/', ' ', ',']) {
        return Err("no host".into());
    }
    if let Some(p) = port {
        p.parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number in 0..=65535"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(extra: &str) -> Result<ClusterConfig, String> {
        let text = format!("urls = [\"nats://127.0.0.1:4222\"]\nnode = \"a\"\n{extra}");
        toml::from_str(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn urls() {
        for ok in [
            "nats://h:4222",
            "h:4222",
            "h",
            "tls://u:p@h:1",
            "nats://[::1]:4222",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://h:1",
            "nats://:1",
            "nats://h:x",
            "",
            "nats://h:70000",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let c = cluster("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.prefix, "shmrelay");
        let name = |c: ClusterConfig| match c.validate() {
            Err(ConfigError::Invalid { name, .. }) => name,
            other => panic!("{other:?}"),
        };
        assert_eq!(name(cluster("user = \"u\"").unwrap()), "cluster.password");
        assert_eq!(
            name(cluster("user = \"u\"\npassword = \"p\"\ntoken = \"t\"").unwrap()),
            "cluster.credentials"
        );
        assert_eq!(
            name(cluster("credentials = \"/nonexistent/x.creds\"").unwrap()),
            "cluster.credentials"
        );
        assert_eq!(
            name(cluster("prefix = \"a..b\"").unwrap()),
            "cluster.prefix"
        );
        let mut c = cluster("").unwrap();
        c.node = "a.b".into();
        assert_eq!(name(c), "cluster.node");
        assert!(cluster("nodes = 3").is_err(), "unknown keys are refused");
    }

    #[test]
    fn a_relay_config_with_a_cluster_section_survives_overrides() {
        let text = "fronts = 1\n[cluster]\nurls = [\"nats://n:4222\"]\nnode = \"edge-1\"\n";
        let cfg: crate::config::Config = toml::from_str(text).unwrap();
        cfg.validate().unwrap();
        let over = cfg.with_overrides(&["fronts=2".into()]).unwrap();
        assert_eq!(over.cluster, cfg.cluster);
        assert_eq!(over.cluster.unwrap().node, "edge-1");
        let mut bad = cfg.clone();
        bad.cluster.as_mut().unwrap().urls.clear();
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                name: "cluster.urls",
                ..
            })
        ));
        assert!(crate::config::Config::default().cluster.is_none());
    }

    #[test]
    fn worker_env_carries_every_setting() {
        let c = cluster("token = \"t\"").unwrap();
        let env: Vec<_> = c.worker_env();
        assert!(env.contains(&(env::CLUSTER_URLS, "nats://127.0.0.1:4222".into())));
        assert!(env.contains(&(env::CLUSTER_NODE, "a".into())));
        assert!(env.contains(&(env::CLUSTER_TOKEN, "t".into())));
        assert!(!env.iter().any(|(k, _)| *k == env::CLUSTER_USER));
    }
}
