"""Speed of `icm label`, the previous search and today's side by side in one run: seconds and forward
tokens per labelled claim (and CPU seconds: on a shared machine the process's own time is the fairer
comparison), scoring throughput as a ratio of the model's raw forward throughput (both per CPU second), in tokens
and in FLOPs (a scored token attends over the whole demonstration prefix, a raw forward's over half its row on
average, so a token of the search costs more arithmetic), label accuracy when the claims have gold, a cost model
for large claim sets, and (``--memory``) peak RSS.

    python -m bench.label_speed --model smollm2-135m --claims sentiment -n 64
    python -m bench.label_speed --claims sentiment -n 256 --iterations 32 --polish-iterations 0 \
        --variants default --memory
    python -m bench.label_speed --claims sentiment -n 256 --initial-labels 200 --iterations 640 \
        --polish-iterations 0 --variants default --memory   # the steady state: context budget full from step 0
    python -m bench.label_speed --claims sentiment-pivot -n 400 --iterations 96 --polish-iterations 16 \
        --batch-size 512 --breakdown          # the demo's claims and search (scripts/demo.sh)

Variants: ``previous`` is the search before the speed-up (every proposal scored exactly, a fold's targets
re-scored whenever one is added, one prefix cache per fold, demonstrations in a fixed seeded order:
``ICMConfig(exact_every=1, reuse_scores=False, demo_order="fixed")``); ``exact`` adds score reuse (same labels as
``previous`` up to float rounding); ``checked`` is an approximate U whose exact steps all score their proposal
exactly (``check_every=1``); ``fixed-order`` is the default search with the fixed demonstration order;
``every-16`` is the default until 2026-12-02 (``exact_every=16``); ``default`` is ``ICMConfig()`` (approximate U
between exact steps, every ``check_every``-th exact step's proposal checked, demonstrations in labelling order;
``--exact-every`` and ``--check-every`` change how often).
``--breakdown`` splits each variant's time into prefix and target forwards by purpose (re-scoring the labelled
claims, predicting a sampled claim, the final predictions), ConsistencyFix and the rest (Python).

``--backend server --base-url URL [--base-url URL2 ...]`` labels through OpenAI-compatible servers serving
``--model`` instead (the default variant only): requests/s, prompt tokens/s, mean request latency, the share of
prompt tokens served from the server's prefix cache (when the server reports it), and with ``--compare`` the
agreement of labels and scores with the in-process model on the same claims and seed:

    python -m bench.label_speed --backend server --base-url http://127.0.0.1:8080/v1 --claims capitals -n 64 --compare

The in-process side loads ``--model`` with ``--dtype``. For the same weights on both sides, serve the F32 copy of the
GGUF (``python -c "from icm.models import float_gguf; print(float_gguf('smollm2-135m'))"``) and pass ``--dtype
fp32``; ``--separator`` sets the text after each demonstration's label.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.claimsets import CLAIM_SETS
from icm.backends import InProcessBackend
from icm.config import ICMConfig, PromptTemplate
from icm.data.claims import claims_from_records, gold_labels
from icm.data.io import read_records
from icm.label import accuracy
from icm.models import load_model
from icm.scoring import ClaimScorer, MutualPredictor, unescape
from icm.search import ICMSearch, label_claims

VARIANTS = {
    "previous": {"exact_every": 1, "reuse_scores": False, "demo_order": "fixed"},
    "exact": {"exact_every": 1, "demo_order": "fixed"},
    "checked": {"check_every": 1, "demo_order": "fixed"},
    "fixed-order": {"demo_order": "fixed"},
    "every-16": {"exact_every": 16},
    "default": {},
}


@torch.inference_mode()
def raw_throughput(model, seq_len: int = 512, batch: int = 4, repeats: int = 3) -> float:
    """Tokens per CPU second of plain forward passes (last-position logits only)."""
    ids = torch.randint(100, 1000, (batch, seq_len), device=next(model.parameters()).device)
    model(ids[:, :32], logits_to_keep=1)  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        model(ids, logits_to_keep=1)
    return repeats * batch * seq_len / (time.process_time() - start)


def flop_costs(model) -> tuple[float, float] | None:
    """FLOPs per token run (the decoder layers' weights, 2 per weight) and per key position a token attends to
    (QK^T and AV over every head of every layer); None for a model with sliding-window layers, whose attention
    this count would overstate."""
    text = model.config.get_text_config()
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return None
    weights = sum(p.numel() for p in model.get_decoder().layers.parameters())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2.0 * weights, 4.0 * text.num_attention_heads * head_dim * text.num_hidden_layers


def raw_flops_per_token(model, costs: tuple[float, float], seq_len: int) -> float:
    """FLOPs per token of ``raw_throughput``'s causal rows: weights, attention over (L + 1) / 2 keys on average, and
    the vocabulary head at each row's last position."""
    per_token, per_key = costs
    head = 2.0 * model.get_output_embeddings().weight.numel()
    return per_token + (seq_len + 1) / 2 * per_key + head / seq_len


@contextlib.contextmanager
def breakdown() -> Iterator[dict[str, float]]:
    """CPU seconds and tokens of prefix and target forwards by purpose, and seconds in ConsistencyFix, while active:
    ``rescore`` (the labelled claims given the others), ``sampled`` (one claim's prediction), ``predict`` (the
    final predictions of every claim)."""
    stats: dict[str, float] = defaultdict(float)
    purpose = ["other"]
    originals = {(ClaimScorer, "_sync"): ClaimScorer._sync, (ClaimScorer, "_score_batch"): ClaimScorer._score_batch,
                 (MutualPredictor, "log_odds"): MutualPredictor.log_odds, (ICMSearch, "fix"): ICMSearch.fix}

    def forward(kind: str, counter: str):
        def run(self, *args):
            start, tokens = time.process_time(), getattr(self, counter)
            try:
                return originals[ClaimScorer, "_sync" if kind == "prefix" else "_score_batch"](self, *args)
            finally:
                stats[f"{purpose[-1]} {kind} s"] += time.process_time() - start
                stats[f"{purpose[-1]} {kind} tokens"] += getattr(self, counter) - tokens
        return run

    def log_odds(self, labels, targets=None):
        targets = None if targets is None else list(targets)
        purpose.append("rescore" if targets is None else "sampled" if len(targets) == 1 else "predict")
        try:
            return originals[MutualPredictor, "log_odds"](self, labels, targets)
        finally:
            purpose.pop()

    def fix(self, *args):
        start = time.process_time()
        try:
            return originals[ICMSearch, "fix"](self, *args)
        finally:
            stats["ConsistencyFix s"] += time.process_time() - start

    ClaimScorer._sync, ClaimScorer._score_batch = forward("prefix", "prefix_tokens"), forward("target", "target_tokens")
    MutualPredictor.log_odds, ICMSearch.fix = log_odds, fix
    try:
        yield stats
    finally:
        for (owner, name), method in originals.items():
            setattr(owner, name, method)


SCORERS: weakref.WeakSet[ClaimScorer] = weakref.WeakSet()  # the live ClaimScorers (see cache_mb); weak, so that
# tracking keeps no finished variant's caches alive
_scorer_init = ClaimScorer.__init__


CREATED: list[ClaimScorer] = []  # the scorers of the variant being run, for their counters; cleared after each


def _tracked_init(self, *args, **kwargs):
    _scorer_init(self, *args, **kwargs)
    SCORERS.add(self)
    CREATED.append(self)


ClaimScorer.__init__ = _tracked_init


def cache_mb() -> float:
    """MB of the buffers that the live scorers' prefix caches hold, the free ones (kept for reuse) included."""
    storages = {}
    for scorer in SCORERS:
        sets = [[layer.buffers for layer in prefix.layers if layer.buffers is not None]
                for versions in scorer._slots.values() for prefix in versions] + scorer._free
        for buffers in sets:
            for tensor in (t for pair in buffers for t in pair):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def print_breakdown(rows: dict[str, dict]) -> None:
    """Each variant's CPU seconds (share of its CPU time) and forward tokens per purpose."""
    parts = [(f"{purpose} {kind}", f"{purpose} {kind}") for purpose in ("rescore", "sampled", "predict")
             for kind in ("prefix", "target")]
    print("\nWhere the time goes: CPU seconds (share of the variant's CPU time) / forward tokens\n")
    print("| variant | " + " | ".join(name for name, _ in parts) + " | ConsistencyFix | rest (Python) |")
    print("|---|" + "---|" * (len(parts) + 2))
    for name, r in rows.items():
        b, total = r["breakdown"], r["cpu"]
        cells = [f"{b.get(key + ' s', 0):.1f} ({b.get(key + ' s', 0) / total:.0%}) / {b.get(key + ' tokens', 0):,.0f}"
                 for _, key in parts]
        fix = b.get("ConsistencyFix s", 0)
        rest = total - fix - sum(b.get(key + " s", 0) for _, key in parts)
        cells += [f"{fix:.1f} ({fix / total:.0%})", f"{rest:.1f} ({rest / total:.0%})"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--claims", default="sentiment", help=f"a claims file or one of {', '.join(CLAIM_SETS)}")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--polish-iterations", type=int, default=None)
    parser.add_argument("--initial-labels", type=int, default=ICMConfig.initial_labels,
                        help="claims labelled at random before the search (e.g. 200 of 256 fills the context budget "
                             "from the start: --memory then measures the steady state)")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=ICMConfig.batch_size, help="claims searched together")
    parser.add_argument("--exact-every", type=int, default=ICMConfig.exact_every, help="of the default variant")
    parser.add_argument("--check-every", type=int, default=ICMConfig.check_every, help="of the default variant")
    parser.add_argument("--breakdown", action="store_true", help="time per purpose of the forward passes")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine is shared)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--throughputs", type=float, nargs="+", default=[2e3, 2e4, 1e5],
                        help="forward throughputs (tokens/s) for the cost model, e.g. a GPU's")
    parser.add_argument("--memory", action="store_true", help="track RSS at every step of the default variant")
    parser.add_argument("--backend", default="in-process", choices=["in-process", "server"])
    parser.add_argument("--base-url", action="append", help="--backend server: an OpenAI-compatible endpoint")
    parser.add_argument("--concurrency", type=int, default=16, help="--backend server: requests in flight per server")
    parser.add_argument("--max-context-tokens", type=int, default=2048)
    parser.add_argument("--compare", action="store_true", help="--backend server: also label in-process and compare")
    parser.add_argument("--separator", default=PromptTemplate.separator,
                        help="text after each demonstration's label, with Python escapes (e.g. '\\n')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.template = PromptTemplate(separator=unescape(args.separator, "--separator"))

    records = CLAIM_SETS[args.claims](args.n, 0) if args.claims in CLAIM_SETS else read_records(args.claims)[:args.n]
    claims, gold = claims_from_records(records, args.claims), gold_labels(records, args.claims)
    if args.backend == "server":
        return bench_server(args, claims, gold)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    n = len(claims)
    raw = [raw_throughput(model)]
    # The same plain forward over one row as long as the search's context budget: its tokens attend over as much
    # context as the search's do, which the 512-token rows above leave out (attention grows with the context).
    long_rows = [raw_throughput(model, args.max_context_tokens, batch=1, repeats=2)]
    rows = {}
    for name in args.variants:
        settings = {"exact_every": args.exact_every, "check_every": args.check_every} | VARIANTS[name]
        config = ICMConfig(iterations=args.iterations, polish_iterations=args.polish_iterations, folds=args.folds,
                           batch_size=args.batch_size, max_context_tokens=args.max_context_tokens,
                           initial_labels=args.initial_labels, **settings)
        trace: list[float] = []
        held: list[float] = []
        progress = None
        if args.memory and name == "default":
            def progress(info, trace=trace, held=held):
                trace.append(rss_mb())
                held.append(cache_mb())
        with breakdown() if args.breakdown else contextlib.nullcontext({}) as stats:
            start, cpu = time.perf_counter(), time.process_time()
            results, summary = label_claims(claims, InProcessBackend(model, tokenizer), config,
                                            template=args.template, progress=progress)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        attended = sum(scorer.attended_keys for scorer in CREATED)
        CREATED.clear()
        raw.append(raw_throughput(model))
        long_rows.append(raw_throughput(model, args.max_context_tokens, batch=1, repeats=2))
        labels = [r["icm_label"] for r in results]
        rows[name] = {"seconds": seconds, "cpu": cpu, "tokens": summary["forward_tokens"], "labels": labels,
                      "attended": attended,
                      "accuracy": accuracy(labels, gold) if gold else None, "summary": summary, "trace": trace,
                      "breakdown": dict(stats), "held": held}
    raw_mean, long_mean = sum(raw) / len(raw), sum(long_rows) / len(long_rows)
    costs = flop_costs(model)
    raw_flops = [mean * raw_flops_per_token(model, costs, length) if costs else None
                 for mean, length in ((raw_mean, 512), (long_mean, args.max_context_tokens))]

    def flop_ratio(r: dict) -> str:
        """The variant's FLOPs per CPU second over the raw forwards' (512 / context-budget rows)."""
        if not costs:
            return "-"
        rate = (r["tokens"] * costs[0] + r["attended"] * costs[1]) / r["cpu"]
        return " / ".join(f"{rate / reference:.2f}" for reference in raw_flops)

    print(f"\n{args.model}, {args.claims}, {n} claims, folds={args.folds}, dtype={model.dtype}, "
          f"default: exact every {args.exact_every} steps, "
          f"{args.threads} thread(s), raw forward {raw_mean:,.0f} tokens per CPU second "
          f"on 4 x 512-token rows, {long_mean:,.0f} on 1 x {args.max_context_tokens:,}-token rows "
          f"(means of {len(raw)} measurements)\n")
    print(f"| variant | s / claim | CPU s / claim | forward tokens / claim | scoring / raw throughput (512 / "
          f"{args.max_context_tokens:,}-token rows) | the same in FLOPs per CPU second | "
          "speed-up (wall / CPU / tokens) | accuracy | approx. disagreements |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows.get("previous")
    for name, r in rows.items():
        s = r["summary"]
        speedup = "-" if not base else \
            " / ".join(f"{base[k] / r[k]:.1f}x" for k in ("seconds", "cpu", "tokens"))
        acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-"
        checks = f"{s['approximate_disagreements']}/{s['approximate_checks']}" if s["approximate_checks"] else "-"
        print(f"| {name} | {r['seconds'] / n:.2f} | {r['cpu'] / n:.2f} | {r['tokens'] / n:,.0f} | "
              f"{r['tokens'] / r['cpu'] / raw_mean:.2f} / {r['tokens'] / r['cpu'] / long_mean:.2f} | {flop_ratio(r)} | "
              f"{speedup} | "
              f"{acc} | {checks} |")
    if base:
        for name, r in rows.items():
            same = sum(a == b for a, b in zip(r["labels"], base["labels"])) / n
            print(f"{name}: {same:.0%} of labels equal to previous")

    if args.breakdown:
        print_breakdown(rows)

    print(f"\nCost model: hours to label 10k / 100k claims at the forward tokens per claim measured above "
          f"(batches of {n} claims; tokens per claim grow about linearly with the batch size, default 256), "
          "assuming scoring runs at the given forward throughput:\n")
    print("| variant | tokens / claim | " + " | ".join(f"{t:,.0f} tok/s: 10k / 100k" for t in args.throughputs) + " |")
    print("|---|---|" + "---|" * len(args.throughputs))
    for name, r in rows.items():
        per_claim = r["tokens"] / n
        cells = [f"{per_claim * 1e4 / t / 3600:,.1f} / {per_claim * 1e5 / t / 3600:,.1f}" for t in args.throughputs]
        print(f"| {name} | {per_claim:,.0f} | " + " | ".join(cells) + " |")

    trace, held = rows.get("default", {}).get("trace"), rows.get("default", {}).get("held")
    if trace:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        steps = [max(len(trace) * k // 8, 1) for k in range(1, 9)]
        print(f"\nMemory (default variant, {n} claims): peak RSS {peak:,.0f} MB; RSS after steps "
              + ", ".join(f"{step}: {trace[step - 1]:,.0f}" for step in steps) + " MB; growth over the second half "
              f"{trace[-1] - trace[len(trace) // 2 - 1]:+,.0f} MB. Held by the prefix caches at the same steps: "
              + ", ".join(f"{held[step - 1]:,.0f}" for step in steps) + " MB")


def bench_server(args: argparse.Namespace, claims: list, gold: list | None) -> None:
    """The default search through servers: throughput, latency, prefix-cache share, agreement with in-process."""
    from icm.config import ServerConfig
    from icm.server import connect

    if not args.base_url:
        raise SystemExit("--backend server needs --base-url")
    backend = connect(ServerConfig(base_urls=tuple(args.base_url), model=args.model, concurrency=args.concurrency))
    config = ICMConfig(iterations=args.iterations, polish_iterations=args.polish_iterations, folds=args.folds,
                       max_context_tokens=args.max_context_tokens)
    start = time.perf_counter()
    results, summary = label_claims(claims, backend, config, template=args.template)
    seconds = time.perf_counter() - start
    report, n = backend.report(), len(claims)
    labels = [r["icm_label"] for r in results]
    cached = report["cached_prompt_tokens"]
    print(f"\n{args.model} through {len(args.base_url)} server(s) (concurrency {args.concurrency}), {args.claims}, "
          f"{n} claims, folds={args.folds}, separator {args.separator!r}\n")
    print("| s / claim | requests / claim | requests/s | prompt tokens/s | mean request latency | prefix-cache share |"
          " label word missing (one / both) | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    acc = accuracy(labels, gold) if gold else None
    print(f"| {seconds / n:.2f} | {report['requests'] / n:,.1f} | {report['requests'] / seconds:,.1f} | "
          f"{report['prompt_tokens'] / seconds:,.0f} | {report['mean_request_seconds']:.3f} s | "
          + (f"{cached / max(report['prompt_tokens'], 1):.1%}" if cached is not None else "not reported")
          + f" | {report['label_word_missing']} / {report['label_words_missing']} | "
          + (f"{acc:.1%}" if acc is not None else "-") + " |")
    per_claim = report["requests"] / n
    print(f"\nCost model: {per_claim:,.1f} requests and {report['prompt_tokens'] / n:,.0f} prompt tokens per claim "
          f"(batches of {n}); hours for 10k / 50k claims at the measured {report['requests'] / seconds:,.1f} "
          f"requests/s: {per_claim * 1e4 / (report['requests'] / seconds) / 3600:,.1f} / "
          f"{per_claim * 5e4 / (report['requests'] / seconds) / 3600:,.1f}")
    backend.close()
    if args.compare:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        local, _ = label_claims(claims, InProcessBackend(model, tokenizer), config, template=args.template)
        same = sum(a == r["icm_label"] for a, r in zip(labels, local)) / n
        diffs = [abs(a["icm_score"] - b["icm_score"]) for a, b in zip(results, local)]
        signs = sum((a["icm_score"] > 0) == (b["icm_score"] > 0) for a, b in zip(results, local)) / n
        local_acc = accuracy([r["icm_label"] for r in local], gold) if gold else None
        print(f"\nIn-process ({model.dtype}), same claims and seed: {same:.1%} of labels equal "
              f"({round(same * n)} of {n}); icm_score |server - in-process| "
              f"max {max(diffs):.3f}, median {sorted(diffs)[n // 2]:.3f}; score signs equal {signs:.1%}"
              + (f"; in-process accuracy {local_acc:.1%}" if local_acc is not None else ""))


if __name__ == "__main__":
    main()
