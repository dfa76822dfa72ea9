//! Streaming a prepared dataset (`tenax data prepare`'s shards and manifest) from its
//! store URL during training: the shell around `tenax_core::mixture::MixtureSampler`.
//!
//! [`StreamData::open`] reads and checks `manifest.json`, loads the validation shards
//! (held out: the **first shard of every source that has at least two shards**, at most
//! [`VAL_TOKENS_PER_SOURCE`] tokens of each), and starts one prefetch thread with its own
//! runtime. The thread asks the sampler which shard groups the next samples read and
//! fetches them in that order while the shards it holds stay within the byte budget
//! (`--prefetch-mb`); shards no longer wanted are dropped. The current group of every
//! source is always admitted (a budget below it is refused at open). Every shard is
//! checked against the manifest's SHA-256 and size, and its header against the manifest,
//! before any window of it is read: a tampered or missing shard is refused by name.
//!
//! Ranks read samples through [`StreamData`]'s `SampleSource` impl: sample `s` is
//! located by the sampler (a pure function of the seed and `s`), its shard waited for
//! (bounded by [`StreamOptions::wait_timeout`]) and the window decoded from the shard's
//! bytes. The prefetch never changes what a sample reads, only when it is at hand.
//!
//! The loader infers how far training has got from the samples asked for: the runtime
//! steps in lockstep, so once sample `m` is asked no sample below `m + 1 - lookback`
//! (`lookback` = the global batch) will be; [`StreamData::seek`] says where a run starts.
//! A sample asked below that mark is still served (its shard is fetched again).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tenax_actors::SampleSource;
use tenax_core::mixture::{MixtureConfig, MixtureSampler, SourcePlan};
use tenax_data::prepare::manifest::Manifest;
use tenax_data::prepare::MANIFEST_FILE;
use tenax_storage::{HashAlg, Store};

/// Tokens of each held-out validation shard loaded (its first ones).
pub const VAL_TOKENS_PER_SOURCE: usize = 1 << 20;

/// Bytes of a token shard's header (`tenax_data::shard`).
const HEADER_BYTES: usize = tenax_data::shard::SHARD_HEADER_BYTES;

/// How a dataset is streamed.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Byte budget of the shards held (fetched ahead or being read).
    pub prefetch_bytes: u64,
    /// K: shards whose windows are shuffled together.
    pub shuffle_shards: u32,
    /// Data-order seed.
    pub seed: u64,
    /// Tokens per sample (a window is `block_size + 1` tokens).
    pub block_size: usize,
    /// Samples that may still be asked below the highest asked (the global batch).
    pub lookback: u64,
    /// Deadline of one shard GET.
    pub fetch_timeout: Duration,
    /// Attempts per shard before it is refused (at least 1).
    pub fetch_attempts: u32,
    /// How long a rank waits for a shard before the step fails.
    pub wait_timeout: Duration,
}

impl StreamOptions {
    /// Defaults for a run: 120 s per GET, 3 attempts, 600 s wait.
    pub fn new(seed: u64, block_size: usize, lookback: u64, prefetch_bytes: u64, k: u32) -> Self {
        Self {
            prefetch_bytes,
            shuffle_shards: k,
            seed,
            block_size,
            lookback,
            fetch_timeout: Duration::from_secs(120),
            fetch_attempts: 3,
            wait_timeout: Duration::from_secs(600),
        }
    }
}

/// The URL of a prepared dataset, if `data` names one: a single store URL
/// (`s3://...`, `file://...`, `memory://...`), or a single local folder holding
/// `manifest.json`.
pub fn dataset_url(data: &[std::path::PathBuf]) -> Result<Option<String>> {
    let [one] = data else { return Ok(None) };
    let text = one.to_string_lossy();
    if text.contains("://") {
        return Ok(Some(text.into_owned()));
    }
    if one.join(MANIFEST_FILE).is_file() {
        let abs = std::path::absolute(one)
            .with_context(|| format!("--data {}: cannot resolve it", one.display()))?;
        return Ok(Some(format!("file://{}", abs.display())));
    }
    Ok(None)
}

/// One shard as the manifest describes it.
#[derive(Clone, Debug)]
struct ShardInfo {
    file: String,
    sha256: String,
    bytes: u64,
    tokens: u64,
}

/// A shard's verified bytes.
#[derive(Debug)]
struct Loaded {
    bytes: Bytes,
    /// Bytes per token.
    width: usize,
}

/// `(source, shard)`.
type Key = (u32, u32);

/// What the prefetch thread and the ranks share.
#[derive(Debug, Default)]
struct State {
    /// Shards held.
    resident: HashMap<Key, Arc<Loaded>>,
    /// Their bytes.
    resident_bytes: u64,
    /// The most bytes ever held.
    peak_bytes: u64,
    /// Shards fetched (a shard fetched twice counts twice).
    fetches: u64,
    /// No sample below this will be asked (as far as the loader knows).
    low: u64,
    /// The highest sample asked.
    max_asked: Option<u64>,
    /// Shards a rank waits for.
    demand: BTreeSet<Key>,
    /// Shards refused, with the one-line reason.
    failed: HashMap<Key, String>,
    /// Set when the loader is dropped.
    stop: bool,
    /// Bumped whenever `low` or `demand` changes.
    epoch: u64,
}

/// Shared between the ranks, the prefetch thread and the loader handle.
#[derive(Debug)]
struct Shared {
    url: String,
    opts: StreamOptions,
    shards: Vec<Vec<ShardInfo>>,
    vocab_size: usize,
    state: Mutex<State>,
    changed: Condvar,
    /// The ranks' sampler (the prefetch thread has its own copy).
    sampler: Mutex<MixtureSampler>,
}

/// A prepared dataset streamed from its store URL.
#[derive(Debug)]
pub struct StreamData {
    shared: Arc<Shared>,
    /// The dataset's manifest.
    pub manifest: Manifest,
    /// The held-out validation tokens (see the module doc).
    pub val: Vec<u32>,
    /// The sampler's reason line (quotas, K).
    pub reason: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Loader statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes of shards held now.
    pub resident_bytes: u64,
    /// The most bytes held at once.
    pub peak_bytes: u64,
    /// Shard GETs that succeeded.
    pub fetches: u64,
}

impl StreamData {
    /// Opens the dataset at `url` (blocking: run it off the async workers or before).
    ///
    /// Errors (one line each, naming the URL or shard): no manifest, a manifest that
    /// does not check out, a budget below one group of shards per source, a held-out
    /// shard that is missing or tampered, a source without training windows.
    pub fn open(url: &str, opts: StreamOptions) -> Result<StreamData> {
        let url = url.trim_end_matches('/').to_string();
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<(Arc<Shared>, Manifest, Vec<u32>, String)>>(1);
        let thread_url = url.clone();
        let thread = std::thread::Builder::new()
            .name("tenax-prefetch".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!("cannot start the prefetch runtime: {e}")));
                        return;
                    }
                };
                let opened = rt.block_on(open_on_thread(&thread_url, opts));
                let (store, shared, prefetch_sampler) = match opened {
                    Ok((store, shared, manifest, val, reason, sampler)) => {
                        let _ = tx.send(Ok((shared.clone(), manifest, val, reason)));
                        (store, shared, sampler)
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(prefetch_loop(&store, &shared, prefetch_sampler));
            })
            .context("cannot start the prefetch thread")?;
        let (shared, manifest, val, reason) = rx.recv().map_err(|_| {
            anyhow!("dataset {url}: the prefetch thread stopped while opening it")
        })??;
        Ok(StreamData {
            shared,
            manifest,
            val,
            reason,
            thread: Some(thread),
        })
    }

    /// Says the run's next sample is `cursor` (a fresh run: 0; a resumed one: its
    /// checkpoint's cursor), so the first shards fetched are the ones it reads.
    pub fn seek(&self, cursor: u64) {
        let mut st = self.shared.state.lock().expect("stream state");
        st.low = cursor;
        st.max_asked = None;
        st.epoch += 1;
        self.shared.changed.notify_all();
    }

    /// Identity of what this loader feeds training: the dataset hash, K and the
    /// validation rule. A resumed run must see the same.
    pub fn identity(&self) -> String {
        let text = format!(
            "tenax-stream-v1\n{}\nshuffle_shards {}\nval first-shard-of-multi-shard-sources {VAL_TOKENS_PER_SOURCE}\n",
            self.manifest.dataset_hash, self.shared.opts.shuffle_shards
        );
        hex::encode(Sha256::digest(text.as_bytes()))
    }

    /// Statistics so far.
    pub fn stats(&self) -> StreamStats {
        let st = self.shared.state.lock().expect("stream state");
        StreamStats {
            resident_bytes: st.resident_bytes,
            peak_bytes: st.peak_bytes,
            fetches: st.fetches,
        }
    }

    /// Where sample `s` reads: `(source name, shard file, window)`.
    pub fn locate(&self, s: u64) -> (String, String, u64) {
        let loc = self.shared.sampler.lock().expect("sampler").locate(s);
        let info = &self.shared.shards[loc.source as usize][loc.shard as usize];
        (
            self.manifest.sources[loc.source as usize].name.clone(),
            info.file.clone(),
            loc.window,
        )
    }
}

impl Drop for StreamData {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock().expect("stream state");
            st.stop = true;
            self.shared.changed.notify_all();
        }
        // Detached, not joined: a GET in flight may take up to `fetch_timeout`, and the
        // last handle may be dropped on an async worker. The thread stops after it.
        drop(self.thread.take());
    }
}

impl SampleSource for StreamData {
    fn sample(
        &self,
        s: u64,
        block_size: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) -> Result<(), String> {
        let sh = &self.shared;
        if block_size != sh.opts.block_size {
            return Err(format!(
                "dataset {}: opened for block size {}, asked for {block_size}",
                sh.url, sh.opts.block_size
            ));
        }
        let loc = sh.sampler.lock().expect("sampler").locate(s);
        let key = (loc.source, loc.shard);
        let info = &sh.shards[loc.source as usize][loc.shard as usize];
        let deadline = Instant::now() + sh.opts.wait_timeout;
        let loaded = {
            let mut st = sh.state.lock().expect("stream state");
            let max = st.max_asked.map_or(s, |m| m.max(s));
            st.max_asked = Some(max);
            let low = (max + 1).saturating_sub(sh.opts.lookback);
            if low > st.low {
                // The prefetch thread re-plans once the mark has moved a batch.
                st.low = low;
                sh.changed.notify_all();
            }
            loop {
                if let Some(l) = st.resident.get(&key).cloned() {
                    if st.demand.remove(&key) {
                        st.epoch += 1;
                        sh.changed.notify_all();
                    }
                    break l;
                }
                if let Some(e) = st.failed.get(&key) {
                    return Err(e.clone());
                }
                if st.demand.insert(key) {
                    st.epoch += 1;
                    sh.changed.notify_all();
                }
                let now = Instant::now();
                if now >= deadline || st.stop {
                    return Err(format!(
                        "dataset {}: shard {} did not arrive within {} s: check that the store is reachable, or raise --prefetch-mb",
                        sh.url,
                        info.file,
                        sh.opts.wait_timeout.as_secs()
                    ));
                }
                st = sh
                    .changed
                    .wait_timeout(st, deadline - now)
                    .expect("stream state")
                    .0;
            }
        };
        // Window w is tokens w*bs ..= w*bs + bs, as in `tenax_data::window`.
        let n = block_size + 1;
        let start = HEADER_BYTES + loc.window as usize * block_size * loaded.width;
        let bytes = &loaded.bytes[start..start + n * loaded.width];
        let token = |i: usize| -> u32 {
            match loaded.width {
                2 => u32::from(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
                _ => u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")),
            }
        };
        inputs.extend((0..block_size).map(token));
        targets.extend((1..n).map(token));
        Ok(())
    }
}

/// What the prefetch thread keeps: the store, the shared state and its own sampler.
type Opened = (
    Store,
    Arc<Shared>,
    Manifest,
    Vec<u32>,
    String,
    MixtureSampler,
);

/// Opens the dataset on the prefetch thread's runtime.
async fn open_on_thread(url: &str, opts: StreamOptions) -> Result<Opened> {
    let store = Store::open(url).map_err(|e| anyhow!("--data {url}: {e}"))?;
    let manifest_bytes = timeout(opts.fetch_timeout, store.get(MANIFEST_FILE))
        .await
        .map_err(|e| anyhow!("dataset {url}: cannot read {MANIFEST_FILE}: {e}"))?
        .ok_or_else(|| {
            anyhow!(
                "dataset {url}: no {MANIFEST_FILE}: point --data at a folder written by `tenax data prepare`"
            )
        })?;
    let manifest = Manifest::from_bytes(
        &manifest_bytes,
        Path::new(&format!("{url}/{MANIFEST_FILE}")),
    )
    .map_err(|e| anyhow!("{e}: prepare the dataset again"))?;
    let n = opts.block_size as u64 + 1;
    let shards: Vec<Vec<ShardInfo>> = manifest
        .sources
        .iter()
        .map(|s| {
            s.shards
                .iter()
                .map(|e| ShardInfo {
                    file: e.file.clone(),
                    sha256: e.sha256.clone(),
                    bytes: e.bytes,
                    tokens: e.tokens,
                })
                .collect()
        })
        .collect();
    // Validation: the first shard of every source with two shards or more.
    let held_out = |shards: &[ShardInfo], i: usize| shards.len() >= 2 && i == 0;
    let plans: Vec<SourcePlan> = manifest
        .sources
        .iter()
        .zip(&shards)
        .map(|(s, sh)| SourcePlan {
            name: s.name.clone(),
            weight: s.weight,
            shard_windows: sh
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    if held_out(sh.as_slice(), i) {
                        0
                    } else {
                        tenax_data::num_windows(e.tokens as usize, opts.block_size) as u64
                    }
                })
                .collect(),
        })
        .collect();
    let sampler = MixtureSampler::new(MixtureConfig {
        seed: opts.seed,
        shuffle_shards: opts.shuffle_shards,
        sources: plans,
    })
    .map_err(|e| anyhow!("dataset {url}: {e}"))?;
    // The current group of every source is always held: the budget must cover them.
    let mut group_bytes = 0u64;
    for (src, sh) in shards.iter().enumerate() {
        if sampler.quotas()[src] == 0 {
            continue;
        }
        let mut sizes: Vec<u64> = sh.iter().map(|e| e.bytes).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        group_bytes += sizes.iter().take(opts.shuffle_shards as usize).sum::<u64>();
    }
    if opts.prefetch_bytes < group_bytes {
        bail!(
            "dataset {url}: the prefetch budget ({} bytes, --prefetch-mb) is below the {} bytes that one group of {} shards per source needs: raise --prefetch-mb or lower --shuffle-shards",
            opts.prefetch_bytes,
            group_bytes,
            opts.shuffle_shards
        );
    }
    let shared = Arc::new(Shared {
        url: url.to_string(),
        opts: opts.clone(),
        shards,
        vocab_size: manifest.vocab_size,
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        sampler: Mutex::new(sampler.clone()),
    });
    let mut val = Vec::new();
    for (src, sh) in shared.shards.iter().enumerate() {
        if sh.len() < 2 || sampler.quotas()[src] == 0 {
            continue;
        }
        let loaded = fetch_verified(&store, &shared, (src as u32, 0)).await?;
        let count = (sh[0].tokens as usize).min(VAL_TOKENS_PER_SOURCE);
        let b = &loaded.bytes[HEADER_BYTES..];
        val.extend((0..count).map(|i| match loaded.width {
            2 => u32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])),
            _ => u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        }));
    }
    if tenax_data::num_windows(val.len(), opts.block_size) == 0 {
        bail!(
            "dataset {url}: no validation data: the first shard of every source with two shards or more is held out, \
             and there are {} such tokens, fewer than one sample of {n}: prepare with a smaller --shard-tokens",
            val.len()
        );
    }
    let reason = sampler.reason();
    Ok((store, shared, manifest, val, reason, sampler))
}

/// `fut` with a deadline, errors as text.
async fn timeout<T, E: std::fmt::Display>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("timed out after {} s", limit.as_secs())),
    }
}

/// Fetches one shard, retrying transient errors, and checks it against the manifest.
/// The error is one line naming the shard and what to do.
async fn fetch_verified(store: &Store, sh: &Shared, key: Key) -> Result<Loaded> {
    let info = &sh.shards[key.0 as usize][key.1 as usize];
    let name = format!("{}/{}", sh.url, info.file);
    let mut last = String::new();
    for attempt in 0..sh.opts.fetch_attempts.max(1) {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(6))).await;
        }
        let got = timeout(
            sh.opts.fetch_timeout,
            store.get_hashed(&info.file, Some(info.bytes), HashAlg::Sha256),
        )
        .await;
        match got {
            Ok(None) => {
                bail!("dataset shard {name} is missing: restore it or prepare the dataset again")
            }
            Ok(Some((bytes, sha))) => return check_shard(&name, info, sh.vocab_size, bytes, &sha),
            Err(e) => last = e,
        }
    }
    bail!(
        "dataset shard {name}: cannot fetch it after {} attempts ({last}): check the store and its credentials",
        sh.opts.fetch_attempts.max(1)
    )
}

/// Checks a fetched shard against its manifest entry: SHA-256, size and header.
fn check_shard(
    name: &str,
    info: &ShardInfo,
    vocab: usize,
    bytes: Bytes,
    sha: &str,
) -> Result<Loaded> {
    let tampered = |what: String| {
        anyhow!("dataset shard {name} is tampered or corrupt ({what}): restore it or prepare the dataset again")
    };
    if sha != info.sha256 {
        return Err(tampered(format!(
            "SHA-256 {sha}, the manifest says {}",
            info.sha256
        )));
    }
    if bytes.len() as u64 != info.bytes || bytes.len() < HEADER_BYTES {
        return Err(tampered(format!(
            "{} bytes, the manifest says {}",
            bytes.len(),
            info.bytes
        )));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let width = u32_at(12) as usize;
    let count = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let want_width = if vocab <= 1 << 16 { 2 } else { 4 };
    if bytes[..8] != tenax_data::shard::SHARD_MAGIC[..]
        || width != want_width
        || count != info.tokens
        || u32_at(24) as usize != vocab
        || (bytes.len() - HEADER_BYTES) as u64 != count * width as u64
    {
        return Err(tampered("its header does not match the manifest".into()));
    }
    Ok(Loaded { bytes, width })
}

/// The shards to hold, in the order they are needed: the current group of every
/// source, then later groups while the budget lasts; demanded shards first.
fn wanted(sampler: &mut MixtureSampler, sh: &Shared, low: u64, demand: &BTreeSet<Key>) -> Vec<Key> {
    let mut out: Vec<Key> = demand.iter().copied().collect();
    let mut seen: HashSet<Key> = out.iter().copied().collect();
    let mut bytes: u64 = out
        .iter()
        .map(|k| sh.shards[k.0 as usize][k.1 as usize].bytes)
        .sum();
    // Enough groups per source to fill the budget with full-size shards.
    let largest = sh
        .shards
        .iter()
        .flatten()
        .map(|s| s.bytes)
        .max()
        .unwrap_or(1)
        .max(1);
    let per_source =
        (sh.opts.prefetch_bytes / largest / u64::from(sh.opts.shuffle_shards) + 2).min(64) as usize;
    let needs = sampler.upcoming(low, per_source);
    let first_of_source: HashSet<(u32, u64)> = {
        let mut firsts = HashSet::new();
        let mut sources = HashSet::new();
        for g in &needs {
            if sources.insert(g.source) {
                firsts.insert((g.source, g.group));
            }
        }
        firsts
    };
    for g in &needs {
        let current = first_of_source.contains(&(g.source, g.group));
        let group: Vec<Key> = g
            .shards
            .iter()
            .map(|&s| (g.source, s))
            .filter(|k| !seen.contains(k))
            .collect();
        let group_bytes: u64 = group
            .iter()
            .map(|k| sh.shards[k.0 as usize][k.1 as usize].bytes)
            .sum();
        if !current && bytes + group_bytes > sh.opts.prefetch_bytes {
            break;
        }
        bytes += group_bytes;
        for k in group {
            seen.insert(k);
            out.push(k);
        }
    }
    out
}

/// The prefetch thread's loop: plan, drop what is no longer wanted, fetch the next
/// shard, until the loader is dropped.
async fn prefetch_loop(store: &Store, sh: &Shared, mut sampler: MixtureSampler) {
    let (mut planned_epoch, mut planned_low) = (u64::MAX, 0u64);
    let lookback = sh.opts.lookback.max(1);
    let mut plan: Vec<Key> = Vec::new();
    loop {
        let next = {
            let mut st = sh.state.lock().expect("stream state");
            loop {
                if st.stop {
                    return;
                }
                // Re-plan when the demand changed or training moved on by a batch (a plan
                // costs O(sources x groups x 1024)).
                if st.epoch != planned_epoch
                    || st.low < planned_low
                    || st.low >= planned_low + lookback
                {
                    planned_epoch = st.epoch;
                    planned_low = st.low;
                    plan = wanted(&mut sampler, sh, st.low, &st.demand);
                    let keep: HashSet<Key> = plan.iter().copied().collect();
                    let dropped: Vec<Key> = st
                        .resident
                        .keys()
                        .filter(|k| !keep.contains(k))
                        .copied()
                        .collect();
                    for k in dropped {
                        st.resident.remove(&k);
                        st.resident_bytes -= sh.shards[k.0 as usize][k.1 as usize].bytes;
                    }
                }
                let next = plan
                    .iter()
                    .find(|k| !st.resident.contains_key(*k) && !st.failed.contains_key(*k))
                    .copied();
                match next {
                    Some(k) => break k,
                    None => {
                        st = sh
                            .changed
                            .wait_timeout(st, Duration::from_secs(1))
                            .expect("stream state")
                            .0
                    }
                }
            }
        };
        let got = fetch_verified(store, sh, next).await;
        let mut st = sh.state.lock().expect("stream state");
        match got {
            Ok(loaded) => {
                st.resident_bytes += sh.shards[next.0 as usize][next.1 as usize].bytes;
                st.peak_bytes = st.peak_bytes.max(st.resident_bytes);
                st.fetches += 1;
                st.resident.insert(next, Arc::new(loaded));
            }
            Err(e) => {
                st.failed.insert(next, format!("{e:#}"));
            }
        }
        // A demanded shard stays demanded (and held) until a rank takes it; the plan
        // stays valid, the next shard of it is fetched.
        sh.changed.notify_all();
    }
}

#[cfg(test)]
pub(crate) mod tests;
