//! Prometheus metrics: the text exposition format (version 0.0.4), histograms, and a
//! tiny HTTP/1.1 server for `GET /metrics`.
//!
//! [`render`] turns a list of [`Sample`]s into the text format: one `# HELP` and one
//! `# TYPE` line per metric (family) name, the samples of one metric grouped together
//! (metrics in first-seen order), label values escaped, NaN and infinities spelled the
//! way Prometheus parses them.
//!
//! [`Histogram`] accumulates observations into fixed buckets (pure: no clock, no locks)
//! and turns them into the samples of one Prometheus histogram: cumulative
//! `NAME_bucket{le="..."}` series ending with `le="+Inf"`, then `NAME_sum` and
//! `NAME_count`.
//!
//! [`serve`] answers `GET /metrics` on a listener with whatever its render closure
//! returns, written by hand on top of tokio (no HTTP library): one request per
//! connection (`Connection: close`), at most [`MAX_CONNECTIONS`] connections at once, a
//! request head of at most [`MAX_HEAD_BYTES`], [`IO_TIMEOUT`] to send it. It ends when
//! its cancellation token is cancelled.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The `Content-Type` of a `/metrics` answer (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// At most this many connections are served at once; further ones wait in the
/// listener's backlog.
pub const MAX_CONNECTIONS: usize = 16;

/// The longest request head (request line and headers) read; a longer one gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// How long a client has to send its request head (and, separately, to take the
/// answer) before the connection is dropped.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The kind of a metric, written in its `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (resets to 0 on restart); by convention named `..._total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// One series of a histogram (`NAME_bucket`, `NAME_sum` or `NAME_count`, see
    /// [`Histogram::samples`]); its metric is `NAME`.
    Histogram,
}

impl MetricKind {
    /// The word of the `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One sample: a metric name, its labels and its value.
///
/// Samples that share a metric name are one metric: the `help` and `kind` of the first
/// one seen are used for all of them. The metric name is the sample's name, except for a
/// [`MetricKind::Histogram`] sample, whose `_bucket`, `_sum` or `_count` suffix is not
/// part of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name, `[a-zA-Z_:][a-zA-Z0-9_:]*` (other characters are written as `_`).
    pub name: String,
    /// One line of help text for the `# HELP` line.
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Label names (`[a-zA-Z_][a-zA-Z0-9_]*`, other characters written as `_`) and
    /// values (any text; escaped on output).
    pub labels: Vec<(String, String)>,
    /// The value; NaN and infinities are allowed.
    pub value: f64,
}

impl Sample {
    /// A sample without labels.
    pub fn new(name: impl Into<String>, help: &'static str, kind: MetricKind, value: f64) -> Self {
        Sample {
            name: name.into(),
            help,
            kind,
            labels: Vec::new(),
            value,
        }
    }

    /// This sample with one more label.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((name.into(), value.into()));
        self
    }

    /// The name of the metric this sample belongs to: its name, less the `_bucket`,
    /// `_sum` or `_count` suffix of a histogram's series.
    pub fn metric_name(&self) -> &str {
        if self.kind != MetricKind::Histogram {
            return &self.name;
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| self.name.strip_suffix(suffix))
            .unwrap_or(&self.name)
    }
}

/// A Prometheus histogram: counts of observations at or below each of a fixed list of
/// upper bounds, their sum and their number.
///
/// Pure accumulation (the caller measures and observes). The bounds are fixed when it is
/// made, chosen for the quantity it measures; an observation above the last bound counts
/// only in the implicit `+Inf` bucket. NaN observations are ignored (a histogram's sum
/// must stay a number).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, strictly increasing and finite.
    bounds: &'static [f64],
    /// Per bucket (same order as `bounds`), the observations that fell in it and in no
    /// lower one (not cumulative; [`Histogram::samples`] accumulates).
    counts: Vec<u64>,
    /// Sum of every observation.
    sum: f64,
    /// Number of observations (including those above the last bound).
    count: u64,
}

impl Histogram {
    /// An empty histogram with buckets of upper bounds `bounds`.
    ///
    /// # Panics
    /// If `bounds` is empty, not strictly increasing, or holds a non-finite value (a
    /// programming error: the bounds are constants).
    pub fn new(bounds: &'static [f64]) -> Self {
        assert!(
            !bounds.is_empty()
                && bounds.iter().all(|b| b.is_finite())
                && bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must be finite and strictly increasing: {bounds:?}"
        );
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts one observation `v` (NaN is ignored).
    pub fn observe(&mut self, v: f64) {
        if v.is_nan() {
            return;
        }
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// The samples of this histogram as metric `name`, each with `labels`: one
    /// cumulative `name_bucket` per bound (label `le`) and one for `le="+Inf"`, then
    /// `name_sum` and `name_count`.
    pub fn samples(&self, name: &str, help: &'static str, labels: &[(&str, &str)]) -> Vec<Sample> {
        let series = |suffix: &str, value: f64| {
            let mut s = Sample::new(
                format!("{name}{suffix}"),
                help,
                MetricKind::Histogram,
                value,
            );
            for (k, v) in labels {
                s = s.label(*k, *v);
            }
            s
        };
        let mut out = Vec::with_capacity(self.bounds.len() + 3);
        let mut cumulative = 0u64;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            out.push(series("_bucket", cumulative as f64).label("le", format_value(*bound)));
        }
        out.push(series("_bucket", self.count as f64).label("le", "+Inf"));
        out.push(series("_sum", self.sum));
        out.push(series("_count", self.count as f64));
        out
    }
}

/// Renders `samples` in the Prometheus text exposition format 0.0.4.
///
/// One `# HELP` and one `# TYPE` line per metric name ([`Sample::metric_name`]), then
/// every sample of that metric; metrics appear in the order their first sample does. Label values escape `\`, `"` and
/// newlines; help text escapes `\` and newlines. NaN is `NaN`, infinities `+Inf` and
/// `-Inf`. An empty list renders as an empty string.
pub fn render(samples: &[Sample]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<&Sample>> = HashMap::new();
    for s in samples {
        let group = groups.entry(s.metric_name()).or_insert_with(|| {
            order.push(s.metric_name());
            Vec::new()
        });
        group.push(s);
    }
    let mut out = String::new();
    for metric in order {
        let group = &groups[metric];
        let first = group[0];
        let metric = sanitize(metric, true);
        let _ = writeln!(out, "# HELP {metric} {}", escape_help(first.help));
        let _ = writeln!(out, "# TYPE {metric} {}", first.kind.as_str());
        for s in group {
            out.push_str(&sanitize(&s.name, true));
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{}=\"{}\"", sanitize(k, false), escape_label(v));
                }
                out.push('}');
            }
            out.push(' ');
            out.push_str(&format_value(s.value));
            out.push('\n');
        }
    }
    out
}

/// A metric name (`colons`: `:` allowed) or label name with every character outside
/// the allowed set replaced by `_`, and a leading digit prefixed with `_`.
fn sanitize(name: &str, colons: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for (i, c) in name.chars().enumerate() {
        let ok = c.is_ascii_alphabetic()
            || c == '_'
            || (colons && c == ':')
            || (i > 0 && c.is_ascii_digit());
        if ok {
            out.push(c);
        } else if i == 0 && c.is_ascii_digit() {
            out.push('_');
            out.push(c);
        } else {
            out.push('_');
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// Help text with `\` and newlines escaped.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A value as Prometheus (Go's `strconv.ParseFloat`) reads it: `NaN`, `+Inf`, `-Inf`,
/// plain decimals for ordinary magnitudes, exponent notation for very large or small.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v == 0.0 || (1e-5..1e16).contains(&v.abs()) {
        // `Display` is the shortest decimal that reads back exactly (`3`, `0.25`).
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled, answering with
/// `render()` (called once per request).
///
/// One request per connection, answered with `Connection: close`: `GET /metrics`
/// (a query string is ignored) gets 200 with [`CONTENT_TYPE`]; another path gets 404,
/// another method 405, a malformed request 400, a head over [`MAX_HEAD_BYTES`] 431.
/// At most [`MAX_CONNECTIONS`] connections are open at once; a client that does not
/// send its head within [`IO_TIMEOUT`] is dropped. On cancellation the server stops
/// accepting, aborts the connections in flight and returns. Accept errors (e.g. too
/// many open files) are logged and retried after a short pause; they never end it.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!("metrics server: accept failed: {e}; retrying in 100 ms");
                    drop(permit);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let render = render.clone();
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = handle(stream, render.as_ref()).await {
                tracing::debug!("metrics server: connection ended with an error: {e}");
            }
        });
    }
    tasks.shutdown().await;
}

/// Reads one request head from `stream` and writes the answer.
async fn handle(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()), // too slow: drop the connection
    };
    let (status, extra, body) = match head {
        Head::TooLarge => (
            "431 Request Header Fields Too Large",
            "",
            "request head too large\n".to_string(),
        ),
        Head::Closed => return Ok(()),
        Head::Complete(text) => respond(&text, render),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" },
        body.len(),
    )
    .into_bytes();
    response.extend_from_slice(body.as_bytes());
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// What [`read_head`] got.
enum Head {
    /// The head, up to (not including) the blank line, as text (invalid UTF-8 replaced).
    Complete(String),
    /// More than [`MAX_HEAD_BYTES`] without the end of the head.
    TooLarge,
    /// The client closed before sending a whole head.
    Closed,
}

/// Reads until `\r\n\r\n` (or `\n\n`), at most [`MAX_HEAD_BYTES`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf[scan_from..]) {
            let end = scan_from + end;
            if end > MAX_HEAD_BYTES {
                return Ok(Head::TooLarge);
            }
            return Ok(Head::Complete(
                String::from_utf8_lossy(&buf[..end]).into_owned(),
            ));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

/// The offset where the blank line ending a head starts, if there is one.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find(|&i| buf[i..].starts_with(b"\r\n\r\n") || buf[i..].starts_with(b"\n\n"))
}

/// Status line, extra headers and body for a request head.
fn respond(
    head: &str,
    render: &(dyn Fn() -> String + Send + Sync),
) -> (&'static str, &'static str, String) {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (
            "400 Bad Request",
            "",
            "malformed request line\n".to_string(),
        );
    };
    if !version.starts_with("HTTP/1.") {
        return (
            "400 Bad Request",
            "",
            "only HTTP/1.x is served\n".to_string(),
        );
    }
    if method != "GET" {
        return (
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "only GET is allowed\n".to_string(),
        );
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path != "/metrics" {
        return ("404 Not Found", "", "not found: try /metrics\n".to_string());
    }
    ("200 OK", "", render())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(name: &str, value: f64) -> Sample {
        Sample::new(name, "A gauge.", MetricKind::Gauge, value)
    }

    #[test]
    fn render_table() {
        let cases: Vec<(&str, Vec<Sample>, &str)> = vec![
            ("empty", vec![], ""),
            (
                "one counter",
                vec![Sample::new("tenax_steps_total", "Steps done.", MetricKind::Counter, 3.0)],
                "# HELP tenax_steps_total Steps done.\n# TYPE tenax_steps_total counter\ntenax_steps_total 3\n",
            ),
            (
                "grouping in first-seen order",
                vec![
                    gauge("b", 1.0).label("rank", "0"),
                    gauge("a", 0.5),
                    gauge("b", 2.0).label("rank", "1"),
                ],
                "# HELP b A gauge.\n# TYPE b gauge\nb{rank=\"0\"} 1\nb{rank=\"1\"} 2\n\
                 # HELP a A gauge.\n# TYPE a gauge\na 0.5\n",
            ),
            (
                "label escaping and several labels",
                vec![gauge("x", -1.25)
                    .label("path", "C:\\tmp")
                    .label("q", "say \"hi\"\nbye")],
                "# HELP x A gauge.\n# TYPE x gauge\nx{path=\"C:\\\\tmp\",q=\"say \\\"hi\\\"\\nbye\"} -1.25\n",
            ),
            (
                "nan and infinities",
                vec![gauge("v", f64::NAN), gauge("v", f64::INFINITY), gauge("v", f64::NEG_INFINITY)],
                "# HELP v A gauge.\n# TYPE v gauge\nv NaN\nv +Inf\nv -Inf\n",
            ),
            (
                "large, small and negative zero",
                vec![gauge("v", 1e300), gauge("v", 2.5e-9), gauge("v", 1234567.0), gauge("v", -0.0)],
                "# HELP v A gauge.\n# TYPE v gauge\nv 1e300\nv 2.5e-9\nv 1234567\nv -0\n",
            ),
            (
                "help escaping, bad names",
                vec![Sample::new("my-metric", "a\\b\nc", MetricKind::Gauge, 1.0).label("0bad-key", "v")],
                "# HELP my_metric a\\\\b\\nc\n# TYPE my_metric gauge\nmy_metric{_0bad_key=\"v\"} 1\n",
            ),
        ];
        for (what, samples, want) in cases {
            assert_eq!(render(&samples), want, "case {what}");
        }
    }

    const BOUNDS: &[f64] = &[0.1, 1.0, 10.0];

    /// Observations in, `(le, cumulative count)` of every bucket, sum and count out.
    #[test]
    fn histogram_table() {
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Vec<f64>, Vec<(&str, f64)>, f64, f64)> = vec![
            (
                "empty",
                vec![],
                vec![("0.1", 0.0), ("1", 0.0), ("10", 0.0), ("+Inf", 0.0)],
                0.0,
                0.0,
            ),
            (
                "on a bound counts in that bucket",
                vec![0.1, 1.0, 10.0],
                vec![("0.1", 1.0), ("1", 2.0), ("10", 3.0), ("+Inf", 3.0)],
                11.1,
                3.0,
            ),
            (
                "between bounds, cumulative",
                vec![0.05, 0.5, 0.5, 5.0],
                vec![("0.1", 1.0), ("1", 3.0), ("10", 4.0), ("+Inf", 4.0)],
                6.05,
                4.0,
            ),
            (
                "above the last bound: only +Inf",
                vec![11.0, 1e9],
                vec![("0.1", 0.0), ("1", 0.0), ("10", 0.0), ("+Inf", 2.0)],
                1e9 + 11.0,
                2.0,
            ),
            (
                "zero and negative fall in the first bucket",
                vec![0.0, -1.0],
                vec![("0.1", 2.0), ("1", 2.0), ("10", 2.0), ("+Inf", 2.0)],
                -1.0,
                2.0,
            ),
            (
                "NaN is ignored",
                vec![f64::NAN, 2.0],
                vec![("0.1", 0.0), ("1", 0.0), ("10", 1.0), ("+Inf", 1.0)],
                2.0,
                1.0,
            ),
            (
                "+Inf counts above every bound",
                vec![f64::INFINITY],
                vec![("0.1", 0.0), ("1", 0.0), ("10", 0.0), ("+Inf", 1.0)],
                f64::INFINITY,
                1.0,
            ),
        ];
        for (what, observed, buckets, sum, count) in cases {
            let mut h = Histogram::new(BOUNDS);
            for v in &observed {
                h.observe(*v);
            }
            let samples = h.samples("t_seconds", "T.", &[("node", "n")]);
            let got: Vec<(&str, f64)> = samples
                .iter()
                .filter(|s| s.name == "t_seconds_bucket")
                .map(|s| {
                    assert_eq!(s.labels[0], ("node".into(), "n".into()), "case {what}");
                    assert_eq!(s.labels[1].0, "le", "case {what}");
                    (s.labels[1].1.as_str(), s.value)
                })
                .collect();
            assert_eq!(got, buckets, "case {what}: buckets");
            let tail: Vec<(&str, f64)> = samples[buckets.len()..]
                .iter()
                .map(|s| (s.name.as_str(), s.value))
                .collect();
            assert_eq!(
                tail,
                [("t_seconds_sum", sum), ("t_seconds_count", count)],
                "case {what}"
            );
            assert!(
                samples.iter().all(|s| s.metric_name() == "t_seconds"),
                "case {what}"
            );
        }
    }

    #[test]
    fn histogram_renders_as_one_metric() {
        let mut h = Histogram::new(&[0.005, 2.5]);
        h.observe(0.001);
        h.observe(3.0);
        let mut samples = vec![gauge("before", 1.0)];
        samples.extend(h.samples("x_seconds", "X.", &[("job", "j")]));
        samples.push(gauge("after", 2.0));
        let want = "# HELP before A gauge.\n# TYPE before gauge\nbefore 1\n\
                    # HELP x_seconds X.\n# TYPE x_seconds histogram\n\
                    x_seconds_bucket{job=\"j\",le=\"0.005\"} 1\n\
                    x_seconds_bucket{job=\"j\",le=\"2.5\"} 1\n\
                    x_seconds_bucket{job=\"j\",le=\"+Inf\"} 2\n\
                    x_seconds_sum{job=\"j\"} 3.001\n\
                    x_seconds_count{job=\"j\"} 2\n\
                    # HELP after A gauge.\n# TYPE after gauge\nafter 2\n";
        assert_eq!(render(&samples), want);
        // A gauge that merely ends in `_sum` is its own metric.
        assert_eq!(gauge("y_sum", 1.0).metric_name(), "y_sum");
    }

    #[test]
    #[should_panic(expected = "strictly increasing")]
    fn histogram_refuses_unordered_bounds() {
        Histogram::new(&[1.0, 1.0]);
    }

    /// Sends `request` on a fresh connection and reads the whole answer.
    async fn fetch(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("answer within 5 s")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    async fn start() -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let render: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(|| render(&[Sample::new("up", "Up.", MetricKind::Gauge, 1.0)]));
        let server = tokio::spawn(serve(listener, render, token.clone()));
        (addr, token, server)
    }

    #[tokio::test]
    async fn serve_answers_and_stops_on_cancel() {
        let (addr, token, server) = start().await;

        let ok = fetch(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let body = "# HELP up Up.\n# TYPE up gauge\nup 1\n";
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("\r\nContent-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(
            ok.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{ok}"
        );
        assert!(ok.contains("\r\nConnection: close\r\n"), "{ok}");
        assert!(ok.ends_with(&format!("\r\n\r\n{body}")), "{ok}");

        let with_query = fetch(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(
            with_query.starts_with("HTTP/1.1 200 OK\r\n"),
            "{with_query}"
        );

        let missing = fetch(addr, b"GET /x HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");

        let post = fetch(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("\r\nAllow: GET\r\n"), "{post}");

        let garbage = fetch(addr, b"hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");

        let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        big.extend_from_slice(b"\r\n\r\n");
        let too_big = fetch(addr, &big).await;
        assert!(too_big.starts_with("HTTP/1.1 431 "), "{too_big}");

        token.cancel();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("server stops within 2 s of cancel")
            .unwrap();
        // Nobody accepts any more.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn serve_bounds_connections() {
        let (addr, token, server) = start().await;
        // Fill every slot with a connection that sends nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut waiting = TcpStream::connect(addr).await.unwrap();
        waiting
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let early =
            tokio::time::timeout(Duration::from_millis(300), waiting.read_to_end(&mut out)).await;
        assert!(
            early.is_err(),
            "answered while every slot was busy: {out:?}"
        );
        // Free one slot: the waiting request is served.
        drop(idle.pop());
        tokio::time::timeout(Duration::from_secs(3), waiting.read_to_end(&mut out))
            .await
            .expect("served once a slot is free")
            .unwrap();
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200 OK"));
        token.cancel();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .unwrap()
            .unwrap();
    }
}
