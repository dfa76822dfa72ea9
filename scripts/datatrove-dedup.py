"""datatrove 0.10.1 dedup on in/*.jsonl, offline: exact dedup (3 stages) or MinHash (4 stages).
Words are split on whitespace (a custom WordTokenizer: no spaCy/NLTK download), as tenax does."""
import sys, time, shutil, os
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupSignature, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupFilter)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature, ExactFindDedups, ExactDedupFilter
from datatrove.utils.word_tokenizers import WordTokenizer
from datatrove.utils.hashing import HashConfig

class Ws(WordTokenizer):
    def word_tokenize(self, text, **kw): return text.split()
    def sent_tokenize(self, text, **kw): return text.split("\n")
    def span_tokenize(self, text, **kw):
        raise NotImplementedError

def text_of(d):
    return d.text

if __name__ == '__main__':
    mode, W, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    IN = sys.argv[4] if len(sys.argv) > 4 else "in"
    shutil.rmtree(out, ignore_errors=True)
    T = 4
    def run(pipe, tasks, name, dep=None):
        return LocalPipelineExecutor(pipeline=pipe, tasks=tasks, workers=min(W, tasks), logging_dir=f"{out}/logs/{name}",
                                     depends=dep)
    t0 = time.time()
    if mode == "minhash":
        cfg = MinhashConfig(n_grams=5, num_buckets=20, hashes_per_bucket=6, hash_config=HashConfig(hash_fc="sha1"))
        s1 = run([JsonlReader(IN), MinhashDedupSignature(f"{out}/sigs", config=cfg, language=Ws())], T, "s1")
        s2 = run([MinhashDedupBuckets(f"{out}/sigs", f"{out}/buckets", config=cfg)], cfg.num_buckets, "s2", s1)
        s3 = run([MinhashDedupCluster(f"{out}/buckets", f"{out}/ids", config=cfg)], 1, "s3", s2)
        s4 = run([JsonlReader(IN), MinhashDedupFilter(f"{out}/ids"), JsonlWriter(f"{out}/kept", compression=None)], T, "s4", s3)
        s4.run()
    else:
        cfg = ExactDedupConfig(content_getter=text_of, hash_config=HashConfig(hash_fc="sha1"))
        s1 = run([JsonlReader(IN), ExactDedupSignature(f"{out}/sigs", config=cfg, finder_workers=1)], T, "s1")
        s2 = run([ExactFindDedups(f"{out}/sigs", f"{out}/dups", config=cfg)], 1, "s2", s1)
        s3 = run([JsonlReader(IN), ExactDedupFilter(f"{out}/dups", config=cfg), JsonlWriter(f"{out}/kept", compression=None)], T, "s3", s2)
        s3.run()
    wall = time.time() - t0
    kept = sum(sum(1 for _ in open(os.path.join(f"{out}/kept", f))) for f in os.listdir(f"{out}/kept"))
    print(f"datatrove {mode}: wall {wall:.1f} s, kept {kept} docs")
