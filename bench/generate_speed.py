"""Generated tokens per second: batched (left padding) vs one prompt at a time, in the same run.

    .venv/bin/python -m bench.generate_speed [--model smollm2-135m] [--prompts 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse

from icm.config import DEFAULT_INSTRUCTION
from icm.data.candidates import GenerationStats
from icm.data.tasks import arithmetic_questions
from icm.models import DEFAULT_MODEL, load_model
from icm.sampling import sample_completions, user_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    prompts = [user_message(q.question, DEFAULT_INSTRUCTION) for q in arithmetic_questions(args.prompts)]
    results = {}
    for name, batch_size in [("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)]:
        stats = GenerationStats()
        sample_completions(model, tokenizer, prompts, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens,
                           stop=("\nQuestion:",), batch_size=batch_size, seed=0, progress=False, stats=stats)
        results[name] = stats.tokens / stats.seconds
        print(f"{name:>16}: {stats.tokens:5d} tokens in {stats.seconds:6.1f} s = {results[name]:7.1f} tokens/s")
    single, batched = results.values()
    print(f"{'speed-up':>16}: {batched / single:.2f}x  ({args.model}, {args.prompts} prompts, {args.dtype}, "
          f"max_new_tokens={args.max_new_tokens})")


if __name__ == "__main__":
    main()
