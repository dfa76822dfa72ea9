"""PyTorch reference for `tenax bench train`: the same GPT and training step, for a
side-by-side speed comparison (issue 8). Not part of CI (PyTorch is ~5 GB).

The model is tenax's (model/src/gpt.rs): token + learned position embeddings, pre-LN
blocks with causal multi-head self-attention and a 4x MLP with exact (erf) GELU, a final
LayerNorm, the LM head tied to the token embedding, biases everywhere, no dropout, fp32.
The step: summed next-token cross-entropy over the batch divided by the token count,
backward, global gradient-norm clip 1.0, AdamW (betas 0.9/0.99, eps 1e-8, weight decay
0.1 on 2-D weights, PyTorch's own semantics, as tenax's AdamW), one pass per step.

    python3 bench/torch_nano.py --threads 1 --preset nano --steps 20 --warmup 3

prints one JSON line: tokens_per_s (median over the timed steps) and the step times.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {"tiny": (2, 2, 32, 16), "nano": (4, 4, 128, 64), "gpt2-small": (12, 12, 768, 1024)}


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x, mask):
        b, t, c = x.shape
        h = self.ln_1(x)
        q, k, v = self.c_attn(h).split(c, dim=2)
        q = q.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        k = k.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        v = v.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        att = (q * (1.0 / math.sqrt(c // self.nh))) @ k.transpose(-2, -1) + mask[:t, :t]
        y = F.softmax(att, dim=-1) @ v
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return x


class Gpt(nn.Module):
    def __init__(self, vocab, n_layer, n_head, n_embd, block):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        mask = torch.full((block, block), float("-inf")).triu(1)
        self.register_buffer("mask", mask)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[:t]
        for blk in self.blocks:
            x = blk(x, self.mask)
        return self.ln_f(x) @ self.wte.weight.t()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    n_layer, n_head, n_embd, block = PRESETS[a.preset]
    model = Gpt(a.vocab, n_layer, n_head, n_embd, block)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), eps=1e-8, foreach=False, fused=False,
    )
    data = torch.randint(0, a.vocab, (512, block + 1))
    times = []
    for i in range(a.warmup + a.steps):
        rows = data[torch.randint(0, 512, (a.batch_size,))]
        x, y = rows[:, :-1], rows[:, 1:]
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), y.reshape(-1), reduction="sum") / y.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch", "torch": torch.__version__, "preset": a.preset, "threads": a.threads,
        "batch_size": a.batch_size, "block": block, "step_s_median": step_s,
        "tokens_per_s": a.batch_size * block / step_s, "steps": a.steps,
    }))


if __name__ == "__main__":
    main()
