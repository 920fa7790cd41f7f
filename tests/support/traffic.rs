//! What a real apiserver cannot give a test, added on the client side: a
//! tower layer in the operator's `kube::Client` that records every request
//! (verb, resource, namespace, name, answer) and injects faults — answers
//! such as 409 Conflict or 500 for chosen requests, and the end of every
//! watch stream in flight (as when an apiserver restarts or a load
//! balancer drops idle connections).
//!
//! ```ignore
//! let traffic = Traffic::default();
//! let client = traffic.client(config);             // the operator's client
//! traffic.reset();                                 // steady state from here:
//! tokio::time::sleep(Duration::from_secs(5)).await;
//! assert!(traffic.writes().is_empty());
//! traffic.inject(Fault::new("patch", "branches").subresource("status").code(409).times(3));
//! traffic.break_watches();
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use kube::client::{Body, ClientBuilder};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower::{BoxError, Layer, Service};

type DynBody = Box<dyn HttpBody<Data = Bytes, Error = BoxError> + Send + Unpin>;

/// One request as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`.
    pub verb: String,
    /// API group (`""` for core).
    pub group: String,
    /// Resource plural.
    pub resource: String,
    /// `Some("status")` for the status subresource.
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// HTTP status of the answer (0 when the request failed in transport).
    pub code: u16,
    /// Whether the answer was injected.
    pub injected: bool,
}

impl RequestRecord {
    /// Whether the verb writes.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// A fault: the next `times` requests that match answer `code` with a
/// `metav1.Status`, without reaching the apiserver.
#[derive(Debug, Clone)]
pub struct Fault {
    verb: String,
    resource: String,
    subresource: Option<String>,
    code: u16,
    times: usize,
}

impl Fault {
    /// Matches `verb` on `resource` (`"*"` matches any).
    pub fn new(verb: &str, resource: &str) -> Self {
        Self {
            verb: verb.into(),
            resource: resource.into(),
            subresource: None,
            code: 500,
            times: 1,
        }
    }
    /// Only requests to this subresource (e.g. `status`).
    pub fn subresource(mut self, s: &str) -> Self {
        self.subresource = Some(s.into());
        self
    }
    pub fn code(mut self, code: u16) -> Self {
        self.code = code;
        self
    }
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }
    fn matches(&self, r: &RequestRecord) -> bool {
        (self.verb == "*" || self.verb == r.verb)
            && (self.resource == "*" || self.resource == r.resource)
            && (self.subresource.is_none() || self.subresource == r.subresource)
    }
}

#[derive(Default)]
struct State {
    records: Mutex<Vec<RequestRecord>>,
    faults: Mutex<Vec<Fault>>,
    watches: Mutex<CancellationToken>,
}

/// Records and faults of one client (cheap to clone; clones share).
#[derive(Clone, Default)]
pub struct Traffic(Arc<State>);

impl Traffic {
    /// A client for `config` whose requests go through this recorder.
    pub fn client(&self, config: kube::Config) -> kube::Client {
        ClientBuilder::try_from(config)
            .expect("a client builder")
            .with_layer(self)
            .build()
    }

    /// Every request since the last [`Traffic::reset`].
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.0.records.lock().unwrap().clone()
    }

    /// The writes since the last [`Traffic::reset`].
    pub fn writes(&self) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_write())
            .collect()
    }

    /// Forgets what was recorded.
    pub fn reset(&self) {
        self.0.records.lock().unwrap().clear();
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.0.faults.lock().unwrap().push(fault);
    }

    /// Whether injected faults are still waiting for their requests.
    pub fn faults_pending(&self) -> usize {
        self.0.faults.lock().unwrap().iter().map(|f| f.times).sum()
    }

    /// Ends every watch stream in flight (the client sees a clean end and
    /// its watchers start over).
    pub fn break_watches(&self) {
        let old = std::mem::take(&mut *self.0.watches.lock().unwrap());
        old.cancel();
    }

    fn take_fault(&self, r: &RequestRecord) -> Option<u16> {
        let mut faults = self.0.faults.lock().unwrap();
        let f = faults.iter_mut().find(|f| f.times > 0 && f.matches(r))?;
        f.times -= 1;
        let code = f.code;
        faults.retain(|f| f.times > 0);
        Some(code)
    }

    fn record(&self, r: RequestRecord) {
        self.0.records.lock().unwrap().push(r);
    }
}

impl<S> Layer<S> for Traffic {
    type Service = Recorded<S>;
    fn layer(&self, inner: S) -> Recorded<S> {
        Recorded {
            inner,
            traffic: self.clone(),
        }
    }
}

/// The service of [`Traffic`]'s layer.
pub struct Recorded<S> {
    inner: S,
    traffic: Traffic,
}

impl<S> Service<Request<Body>> for Recorded<S>
where
    S: Service<Request<Body>, Response = Response<DynBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<DynBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let mut record = describe(&req);
        let traffic = self.traffic.clone();
        if let Some(code) = traffic.take_fault(&record) {
            record.code = code;
            record.injected = true;
            traffic.record(record);
            return Box::pin(async move { Ok(status_response(code)) });
        }
        let watch = record.verb == "watch";
        let stop = traffic.0.watches.lock().unwrap().clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            record.code = res.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
            traffic.record(record);
            let res = res?;
            if !watch {
                return Ok(res);
            }
            let (parts, body) = res.into_parts();
            let body: DynBody = Box::new(Breakable {
                inner: body,
                stop: Box::pin(stop.cancelled_owned()),
            });
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// A watch body that ends when its token is cancelled.
struct Breakable {
    inner: DynBody,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl HttpBody for Breakable {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}

fn status_response(code: u16) -> Response<DynBody> {
    let reason = match code {
        409 => "Conflict",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("injected by the test: {reason}"),
        "reason": reason, "code": code,
    })
    .to_string();
    let body: DynBody = Box::new(http_body_util::BodyExt::map_err(
        http_body_util::Full::new(Bytes::from(body)),
        |never| match never {},
    ));
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .expect("a response")
}

/// Verb, group, resource, namespace, name and subresource of a request.
fn describe<B>(req: &Request<B>) -> RequestRecord {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/{group}/{version}/...
    let (group, rest) = match segs.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => ("", &segs[..0]),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let resource = rest.first().map(|s| s.to_string()).unwrap_or_default();
    let name = rest.get(1).map(|s| s.to_string());
    let subresource = rest.get(2).map(|s| s.to_string());
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (req.method().as_str(), name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (m, _) => m,
    };
    RequestRecord {
        verb: verb.into(),
        group: group.into(),
        resource,
        subresource,
        namespace,
        name,
        code: 0,
        injected: false,
    }
}
