//! The command line's side of the control API: HTTP over the daemon's Unix
//! socket.

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::ErrorBody;
use super::{LocalError, Paths};

/// A client of one local directory's daemon.
pub struct Client {
    http: reqwest::Client,
    paths: Paths,
}

impl Client {
    pub fn new(paths: &Paths) -> Result<Client, LocalError> {
        let http = reqwest::Client::builder()
            .unix_socket(paths.socket())
            .build()
            .map_err(|e| LocalError::io("building the control client", e))?;
        Ok(Client {
            http,
            paths: paths.clone(),
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, LocalError> {
        let mut req = self.http.request(method, format!("http://local{path}"));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                LocalError::Daemon(format!(
                    "the local daemon is not running for {} (run `pgbranch local up`)",
                    self.paths.dir.display()
                ))
            } else {
                LocalError::Daemon(format!("talking to the local daemon: {e}"))
            }
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| LocalError::Daemon(format!("reading the daemon's answer: {e}")))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(match status {
                StatusCode::NOT_FOUND => LocalError::NotFound(msg),
                StatusCode::BAD_REQUEST => LocalError::Invalid(msg),
                StatusCode::CONFLICT => LocalError::Conflict(msg),
                _ => LocalError::Daemon(msg),
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| LocalError::Daemon(format!("unexpected answer from the daemon: {e}")))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, LocalError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, LocalError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, LocalError> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, LocalError> {
        self.call::<(), T>(Method::DELETE, path, None).await
    }

    /// Whether a daemon answers on the socket.
    pub async fn alive(&self) -> bool {
        self.get::<serde_json::Value>("/status").await.is_ok()
    }
}
