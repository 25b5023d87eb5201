//! Serving `GET /metrics`: one thread and runtime of its own, admission (per peer and in
//! all), the head and answer deadlines, and the answers. HTTP/1 itself (parsing the
//! request head, writing the response) is hyper's; one request per connection.

use std::{
    convert::Infallible,
    future::poll_fn,
    io,
    net::{IpAddr, Ipv6Addr},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::AsyncWrite,
    net::{TcpListener, TcpStream},
    sync::Notify,
    time::Instant,
};

use super::{listen::canonical, render, Bound, CONTENT_TYPE};
use crate::{apply::Paths, status};

/// Largest request head (request line and headers) accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time from the accept to the end of the request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for collecting the counters and writing the answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections at once from one peer address.
pub const MAX_PER_PEER: usize = 4;

/// The body of a 500: no path, no OS error, nothing about the box's layout.
pub const INTERNAL_ERROR_BODY: &str = "reading the counters failed; the daemon's log says why\n";

/// How long a closing connection waits for the client's end.
const LINGER: Duration = Duration::from_secs(1);

/// The second half of the `shaper run` hook: serves `GET /metrics` on the bound socket
/// from a thread of its own with its own runtime, so that no scrape ever waits for the
/// daemon's loop and the loop never waits for a scrape. Called after the daemon dropped
/// the capabilities it does not need: the thread inherits what its creator holds.
pub fn spawn(bound: Bound, paths: &Paths) {
    let Bound {
        listener,
        addr,
        device,
    } = bound;
    let paths = paths.clone();
    let started = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("metrics endpoint stopped: starting its runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let served = match TcpListener::from_std(listener) {
                    Ok(l) => serve_on(l, paths).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = served {
                    log::error!("metrics endpoint stopped: {e:#}");
                }
            });
        });
    match started {
        Ok(_) => log::info!(
            "serving Prometheus metrics on http://{addr}/metrics (only to connections arriving on {device})"
        ),
        Err(e) => log::error!("metrics endpoint not started, shaping goes on: {e}"),
    }
}

/// Whose connection this is, for [`MAX_PER_PEER`]: an IPv4 address (IPv4-mapped ones
/// too), or an IPv6 /64 (one host may take any number of addresses in its /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (!0u128 << 64))),
        v4 => v4,
    }
}

/// Where a connection is in its exchange.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for the request head: may be closed to make room.
    Head,
    /// Collecting the counters and writing the answer.
    Answering,
    /// Answered, waiting for the client to close: may be closed to make room.
    Closing,
}

struct Conn {
    id: u64,
    peer: IpAddr,
    phase: Phase,
    /// Told when the connection is closed to make room.
    evict: Arc<Notify>,
}

/// The connections being served, oldest first: who gets in and who makes room.
#[derive(Default)]
struct Admission {
    next_id: u64,
    conns: Vec<Conn>,
}

impl Admission {
    /// Admits a connection from `peer`, or refuses it (`None`): a peer (an IPv4 address,
    /// an IPv6 /64) holding [`MAX_PER_PEER`] already is refused. At [`MAX_CONNECTIONS`]
    /// in all, the oldest connection that is not answering of the peer holding the most
    /// is closed to make room; if every one is answering, the new one is refused.
    fn admit(&mut self, peer: IpAddr) -> Option<(u64, Arc<Notify>)> {
        let peer = peer_key(peer);
        if self.held_by(peer) >= MAX_PER_PEER {
            return None;
        }
        if self.conns.len() >= MAX_CONNECTIONS && !self.make_room() {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let evict = Arc::new(Notify::new());
        self.conns.push(Conn {
            id,
            peer,
            phase: Phase::Head,
            evict: evict.clone(),
        });
        Some((id, evict))
    }

    fn held_by(&self, peer: IpAddr) -> usize {
        self.conns.iter().filter(|c| c.peer == peer).count()
    }

    /// Closes the oldest idle connection (waiting for its request, or answered) of the
    /// peer that holds the most: whoever spreads connections over many addresses pays
    /// before a peer with one.
    fn make_room(&mut self) -> bool {
        let mut victim: Option<(usize, usize)> = None;
        for (i, c) in self.conns.iter().enumerate() {
            if c.phase == Phase::Answering {
                continue;
            }
            let held = self.held_by(c.peer);
            // Oldest first: only a bigger holder displaces the one found.
            if victim.is_none_or(|(h, _)| held > h) {
                victim = Some((held, i));
            }
        }
        let Some((_, i)) = victim else {
            return false;
        };
        // notify_one keeps the wake-up for a task that is not waiting yet.
        self.conns.remove(i).evict.notify_one();
        true
    }

    fn set_phase(&mut self, id: u64, phase: Phase) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
            c.phase = phase;
        }
    }

    fn release(&mut self, id: u64) {
        self.conns.retain(|c| c.id != id);
    }
}

/// One admitted connection's place in the [`Admission`]; given back when dropped.
struct Slot {
    admission: Arc<Mutex<Admission>>,
    id: u64,
}

impl Slot {
    fn set_phase(&self, phase: Phase) {
        lock(&self.admission).set_phase(self.id, phase);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.admission).release(self.id);
    }
}

fn lock(a: &Mutex<Admission>) -> std::sync::MutexGuard<'_, Admission> {
    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The HTTP/1 side of every connection: one request (keep-alive off, so every answer says
/// `Connection: close` and the connection ends after it), a head of at most
/// [`MAX_REQUEST_BYTES`] and 100 header lines (hyper's default; 431 beyond either) within
/// [`HEAD_TIMEOUT`] (hyper's header read timeout starts at the connection's first poll,
/// right after the accept, and bytes do not extend it), no `Date` header, header names in
/// title case as before.
fn http() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_header_size(MAX_REQUEST_BYTES)
        .max_buf_size(MAX_REQUEST_BYTES)
        .keep_alive(false)
        // A client that shuts down its side after the request still gets the answer.
        .half_close(true)
        .auto_date_header(false)
        .title_case_headers(true);
    b
}

/// Serves `GET /metrics` on a bound listener until the task is dropped. Does not check
/// or bind the address: see [`bind`](super::bind).
pub async fn serve_on(listener: TcpListener, paths: Paths) -> Result<()> {
    let paths = Arc::new(paths);
    let admission = Arc::new(Mutex::new(Admission::default()));
    let http = Arc::new(http());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                log::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let accepted = Instant::now();
        let admitted = lock(&admission).admit(peer.ip());
        let Some((id, evict)) = admitted else {
            log::debug!("metrics endpoint: too many connections answering; closing {peer}");
            continue;
        };
        let slot = Slot {
            admission: admission.clone(),
            id,
        };
        let (paths, http) = (paths.clone(), http.clone());
        tokio::spawn(async move {
            let mut stream = stream;
            tokio::select! {
                r = handle(&mut stream, &http, &paths, &slot, accepted) => {
                    if let Err(e) = r {
                        log::debug!("metrics endpoint: {peer}: {e}");
                    }
                }
                () = evict.notified() => {
                    log::debug!("metrics endpoint: {peer}: closed to make room for a newer connection");
                }
            }
            drop(slot);
        });
    }
}

/// How a connection's exchange ended short of an answer.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("no request head within {HEAD_TIMEOUT:?}")]
    Head,
    #[error("not answered within {ANSWER_TIMEOUT:?}")]
    Answer,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// One connection: the exchange, then (once answered) a lingering close.
async fn handle(
    stream: &mut TcpStream,
    http: &http1::Builder,
    paths: &Paths,
    slot: &Slot,
    accepted: Instant,
) -> Result<(), Cut> {
    match exchange(stream, http, paths, slot, accepted).await {
        Ok(()) => {}
        // A head hyper could not take: it has answered 400 or 431 (a generic status line,
        // no body) and the connection closes as after any answer.
        Err(Cut::Http(e)) if e.is_parse() => {
            log::debug!("metrics endpoint: refused a request: {e}");
        }
        Err(e) => return Err(e),
    }
    slot.set_phase(Phase::Closing);
    // Half-close (hyper has already, when it ended the exchange itself), then read what
    // the client still sends (briefly, bounded): closing with unread input would reset
    // the connection and could lose the reply on the client's side.
    let _ = poll_fn(|cx| Pin::new(&mut *stream).poll_shutdown(cx)).await;
    let _ = tokio::time::timeout(LINGER, drain(stream)).await;
    Ok(())
}

/// hyper's exchange on the connection, within the deadlines: the head by [`HEAD_TIMEOUT`]
/// after the accept (hyper enforces it too; this one also holds if hyper's timer starts
/// late), then the counters collected and the answer written within [`ANSWER_TIMEOUT`].
async fn exchange(
    stream: &mut TcpStream,
    http: &http1::Builder,
    paths: &Paths,
    slot: &Slot,
    accepted: Instant,
) -> Result<(), Cut> {
    let head_in = Notify::new();
    let service = service_fn(|req: Request<hyper::body::Incoming>| {
        // The head is in: from here the connection is answering and not closed to make
        // room. notify_one keeps the wake-up until the deadline below waits for it.
        slot.set_phase(Phase::Answering);
        head_in.notify_one();
        async move { Ok::<_, Infallible>(answer(&req, paths).await) }
    });
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return Ok(r?),
        () = head_in.notified() => {}
        () = tokio::time::sleep_until(accepted + HEAD_TIMEOUT) => return Err(Cut::Head),
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, conn).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Cut::Answer),
    }
}

/// The response to a request whose head hyper parsed. Error bodies say what went wrong
/// in general terms only: which file or map failed is for the log, not for whoever asks.
/// hyper sends no body in answer to HEAD (the `Content-Length` stays the GET's).
async fn answer<B>(req: &Request<B>, paths: &Paths) -> Response<Full<Bytes>> {
    let uri = req.uri();
    // Only the origin form (`/path?query`): not `http://host/path`, `host:port` or `*`.
    if uri.scheme().is_some() || uri.authority().is_some() || !uri.path().starts_with('/') {
        return text(StatusCode::BAD_REQUEST, "bad request\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if uri.path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    match status::collect(paths, 0.0).await {
        Ok(Some(r)) => response(StatusCode::OK, CONTENT_TYPE, render(&r)),
        Ok(None) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "shaping is not applied; no counters to report\n",
        ),
        Err(e) => {
            log::warn!("metrics endpoint: reading the counters: {e:#}");
            text(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_ERROR_BODY)
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Also to an HTTP/1.0 client (hyper adds it to HTTP/1.1 answers by itself).
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.to_string())
}

/// Reads and discards up to 64 KiB until the client closes.
async fn drain(stream: &TcpStream) {
    let mut chunk = [0u8; 4096];
    let mut left = 64 * 1024usize;
    while left > 0 {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => left = left.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
