//! The cluster settings a worker gets from the supervisor's environment (the relay's
//! `[cluster]` section, see `shmrelay_worker::protocol::env::CLUSTER_URLS` and its siblings).

use std::path::PathBuf;

use shmrelay_worker::protocol::env;

use crate::id::{check_name, check_prefix};

/// How the worker authenticates to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    None,
    /// A credentials file (JWT and nkey seed).
    CredsFile(PathBuf),
    /// User name and password.
    UserPassword { user: String, password: String },
    /// A token.
    Token(String),
}

/// What a cluster worker needs to join the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// NATS server URLs (the client tries them all, and reconnects to any).
    pub urls: Vec<String>,
    /// This node's name.
    pub node: String,
    /// The first token(s) of every subject.
    pub prefix: String,
    /// Credentials.
    pub auth: Auth,
}

/// A cluster setting missing or malformed in the environment.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {var}: {problem} (is this worker started by shmrelay with a [cluster] section?)")]
pub struct SettingsError {
    /// The variable.
    pub var: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl Settings {
    /// Reads the settings from the process environment.
    ///
    /// # Errors
    ///
    /// [`SettingsError`] naming the variable.
    pub fn from_env() -> Result<Settings, SettingsError> {
        Settings::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the settings through `get` (the environment, or a map in tests).
    ///
    /// # Errors
    ///
    /// [`SettingsError`] naming the variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let err = |var, problem: String| SettingsError { var, problem };
        let urls: Vec<String> = get(env::CLUSTER_URLS)
            .ok_or_else(|| err(env::CLUSTER_URLS, "missing".into()))?
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(err(env::CLUSTER_URLS, "no URL".into()));
        }
        let node =
            get(env::CLUSTER_NODE).ok_or_else(|| err(env::CLUSTER_NODE, "missing".into()))?;
        check_name("node", &node).map_err(|e| err(env::CLUSTER_NODE, e.to_string()))?;
        let prefix = get(env::CLUSTER_PREFIX).unwrap_or_else(|| "shmrelay".into());
        check_prefix(&prefix).map_err(|e| err(env::CLUSTER_PREFIX, e.to_string()))?;
        let creds = get(env::CLUSTER_CREDS);
        let user = get(env::CLUSTER_USER);
        let password = get(env::CLUSTER_PASSWORD);
        let token = get(env::CLUSTER_TOKEN);
        let auth = match (creds, user, password, token) {
            (None, None, None, None) => Auth::None,
            (Some(path), None, None, None) => Auth::CredsFile(path.into()),
            (None, Some(user), Some(password), None) => Auth::UserPassword { user, password },
            (None, None, None, Some(token)) => Auth::Token(token),
            (None, Some(_), None, None) => {
                return Err(err(env::CLUSTER_PASSWORD, "a user needs a password".into()))
            }
            (None, None, Some(_), None) => {
                return Err(err(env::CLUSTER_USER, "a password needs a user".into()))
            }
            _ => {
                return Err(err(
                    env::CLUSTER_CREDS,
                    "give one of: a credentials file, a user and password, a token".into(),
                ))
            }
        };
        Ok(Settings {
            urls,
            node,
            prefix,
            auth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn minimal_and_full() {
        let s = read(&[
            (env::CLUSTER_URLS, "nats://a:4222, nats://b:4222"),
            (env::CLUSTER_NODE, "n1"),
        ])
        .unwrap();
        assert_eq!(s.urls, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!((s.prefix.as_str(), s.auth), ("shmrelay", Auth::None));
        let s = read(&[
            (env::CLUSTER_URLS, "a:1"),
            (env::CLUSTER_NODE, "n1"),
            (env::CLUSTER_USER, "u"),
            (env::CLUSTER_PASSWORD, "p"),
        ])
        .unwrap();
        assert!(matches!(s.auth, Auth::UserPassword { .. }));
    }

    #[test]
    fn refusals_name_the_variable() {
        let e = read(&[(env::CLUSTER_NODE, "n1")]).unwrap_err();
        assert_eq!(e.var, env::CLUSTER_URLS);
        let e = read(&[(env::CLUSTER_URLS, "a:1"), (env::CLUSTER_NODE, "n.1")]).unwrap_err();
        assert_eq!(e.var, env::CLUSTER_NODE);
        let e = read(&[
            (env::CLUSTER_URLS, "a:1"),
            (env::CLUSTER_NODE, "n1"),
            (env::CLUSTER_TOKEN, "t"),
            (env::CLUSTER_USER, "u"),
            (env::CLUSTER_PASSWORD, "p"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("one of"), "{e}");
    }
}
