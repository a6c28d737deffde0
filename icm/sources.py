"""The label-free alternatives to ICM that a practitioner reaches for first, on the same candidates.

Each labels every candidate row as ``icm label`` does (``icm_label``, ``icm_score``, ``icm_searched`` False) and
returns a summary, so ``icm pairs``, ``icm push``, ``icm report`` and ``icm transfer``'s arms take them unchanged:

- ``majority`` (self-consistency; ScPO, Prasad et al. 2024): the labeller samples ``vote_samples`` answers per
  question; the candidates stating the most-voted final answer are True, the others False. ``icm_score`` is the
  vote share of the candidate's answer, so a pair's margin is ScPO's vote margin. A question whose top answers
  tie, or where no sample states an answer, gets no True candidate (it abstains).
- ``judge`` (the model as a judge; self-rewarding, Yuan et al. 2024; the ICM paper's zero-shot chat baseline):
  the labeller is asked, through its chat template where it has one, whether the candidate answers the question
  correctly; ``icm_score`` is log P(Yes) - log P(No) (centered over the candidates with ``balance="center"``, the
  collapse guard ICM uses). Per question, only the best-judged answer can be True (final answers exclude each
  other), and only when its score is above 0.
- ``confidence`` (self-certainty; INTUITOR): the policy's own mean token log-probability of each candidate given
  its prompt; per question the most confident answer is True, the others False. Needs the model in this process.

Candidates with the same final answer always get the same label, as ICM's consistency rules require.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from icm.backends import Backend, InProcessBackend
from icm.config import GenerationConfig, PromptTemplate, SourceConfig
from icm.data.answers import answers_match, extract_answer, normalize_answer
from icm.data.claims import Claim
from icm.data.io import InputError
from icm.sampling import build_prompt, has_chat_template, user_message
from icm.scoring import resolve_label_tokens

JUDGE_QUESTION = ("{question}\n\nProposed answer: {choice}\n\n"
                  "Is the proposed answer correct? Answer {true_word} or {false_word}.")
"""What the judge is asked; ``{question}`` is the task as the policy was asked it (the candidates' ``prompt``: the
instruction and the question), ``{choice}`` the candidate."""
JUDGE_WORDS = (("Yes", "No"), ("True", "False"))


def _groups(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(str(record.get("consistency_id", i)), []).append(i)
    return groups


def candidate_answer(record: dict[str, Any], extractor: str) -> str:
    """A candidate's final answer: its ``answer`` column, else extracted from its text."""
    answer = record.get("answer")
    return normalize_answer(answer) if answer else extract_answer(str(record["choice"]), extractor)


def _by_answer(members: list[int], answers: list[str]) -> dict[str, list[int]]:
    """The members of a question grouped by final answer (a candidate without one stands alone)."""
    out: dict[str, list[int]] = {}
    for i in members:
        key = next((a for a in out if answers[i] and answers_match(a, answers[i])), answers[i] or f"\0{i}")
        out.setdefault(key, []).append(i)
    return out


def _results(labels: list[bool], scores: list[float]) -> list[dict[str, Any]]:
    return [{"icm_label": bool(y), "icm_score": float(z), "icm_searched": False} for y, z in zip(labels, scores)]


def _summary(method: str, labels: list[bool], gold: list[bool | None] | None, started: float,
             **extra: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {"method": method, "claims": len(labels), "searched": 0,
                               "true_share": float(np.mean(labels)) if labels else 0.0,
                               "seconds": time.monotonic() - started, **extra}
    known = [(y, g) for y, g in zip(labels, gold or []) if g is not None]
    if known:
        summary["gold_accuracy"] = float(np.mean([y == g for y, g in known]))
        summary["gold_true_share"] = float(np.mean([g for _, g in known]))
    return summary


def majority_labels(records: list[dict[str, Any]], backend: Backend, generation: GenerationConfig,
                    config: SourceConfig, gold: list[bool | None] | None = None,
                    progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Self-consistency labels (see the module docstring); ``generation`` is how the candidates were sampled
    (prompt, extractor, length), ``config`` the vote's size and temperature. The votes are seeded apart from the
    candidates' own samples (``generation.seed + 1``)."""
    started = time.monotonic()
    groups = _groups(records)
    answers = [candidate_answer(r, generation.extractor) for r in records]
    prompts = [str(records[m[0]].get("prompt") or user_message(records[m[0]]["question"], generation.instruction))
               for m in groups.values()]
    temperature = generation.temperature if config.vote_temperature is None else config.vote_temperature
    samples = backend.sample_completions(
        prompts, num_samples=config.vote_samples, temperature=temperature, top_p=generation.top_p,
        max_new_tokens=generation.max_new_tokens, stop=generation.stop, batch_size=generation.batch_size,
        seed=generation.seed + 1, use_chat_template=generation.use_chat_template, progress=progress,
        description="majority vote")
    labels, scores = [False] * len(records), [0.0] * len(records)
    counts = Counter()
    for members, votes in zip(groups.values(), samples):
        stated = [a for a in (extract_answer(c.text, generation.extractor) for c in votes) if a]
        tally: Counter[str] = Counter()
        for a in stated:
            tally[next((k for k in tally if answers_match(k, a)), a)] += 1
        by_answer = _by_answer(members, answers)
        counts["single_answer"] += len(by_answer) == 1
        if not tally:
            counts["no_votes"] += 1
            continue
        top = tally.most_common()
        winner = top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else None
        counts["ties"] += winner is None
        counts["winner_not_a_candidate"] += winner is not None and not any(
            answers_match(winner, a) for a in by_answer)
        for answer, rows in by_answer.items():
            share = next((n for k, n in tally.items() if answers_match(k, answer)), 0) / config.vote_samples
            for i in rows:
                scores[i] = share
                labels[i] = winner is not None and answers_match(winner, answer)
    return _results(labels, scores), _summary(
        "majority", labels, gold, started, vote_samples=config.vote_samples, vote_temperature=temperature,
        questions=len(groups), **{k: counts[k] for k in ("ties", "no_votes", "single_answer",
                                                         "winner_not_a_candidate")})


def judge_template(tokenizer, question: str = JUDGE_QUESTION) -> PromptTemplate:
    """The judge's prompt as a claim template: the question in the tokenizer's chat template (the label word
    answers as the assistant's first token), or, without one, a plain prompt ending in ``Answer:``. The label words
    are Yes / No, or True / False where Yes and No are not single tokens; the question names the pair used."""
    marks = {"question": "\0question\0", "choice": "\0choice\0"}
    chat = has_chat_template(tokenizer)
    for true_word, false_word in JUDGE_WORDS:
        text = question.format(**marks, true_word=true_word, false_word=false_word)
        rendered = build_prompt(tokenizer, text, use_chat_template=True) if chat else f"{text}\nAnswer:"
        rendered = rendered.replace("{", "{{").replace("}", "}}")  # a literal brace in the chat template is text
        for name, mark in marks.items():
            rendered = rendered.replace(mark, "{" + name + "}")
        template = PromptTemplate(claim=rendered, true_word=true_word, false_word=false_word,
                                  space="prompt" if chat else "label")
        try:
            resolve_label_tokens(tokenizer, template)
        except ValueError:
            continue
        return template
    raise InputError("--method judge", f"none of the label word pairs {JUDGE_WORDS} are single tokens for this "
                     "tokenizer")


def judge_labels(records: list[dict[str, Any]], backend: Backend, extractor: str, balance: str = "center",
                 gold: list[bool | None] | None = None,
                 scoring_batch_size: int = 16) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The model as a judge (see the module docstring) of candidate rows (``question`` or ``prompt``, ``choice``)."""
    started = time.monotonic()
    template = judge_template(backend.tokenizer)
    claims = [Claim(question=str(r.get("prompt") or r["question"]), choice=str(r["choice"])) for r in records]
    scorer = backend.scorer(claims, template, None, scoring_batch_size)
    scores = scorer.score(list(range(len(claims))), demos=())
    if balance != "none" and len(scores):  # estimate: centered too (no zero-shot fit for a judge)
        scores = scores - scores.mean()
    labels = _best_answer_true(records, list(scores), extractor, need_positive=True)
    return _results(labels, list(scores)), _summary("judge", labels, gold, started,
                                                    forward_tokens=scorer.forward_tokens)


def _best_answer_true(records: list[dict[str, Any]], scores: list[float], extractor: str,
                      need_positive: bool) -> list[bool]:
    """Per question, the candidates of the best-scored final answer (by their mean score) True, the rest False;
    with ``need_positive`` only when that mean is above 0. A candidate that states no answer is never True."""
    answers = [candidate_answer(r, extractor) for r in records]
    labels = [False] * len(records)
    for members in _groups(records).values():
        stated = _by_answer([i for i in members if answers[i]], answers)
        if not stated:
            continue
        best = max(stated.values(), key=lambda rows: np.mean([scores[i] for i in rows]))
        if not need_positive or np.mean([scores[i] for i in best]) > 0:
            for i in best:
                labels[i] = True
    return labels


def confidence_labels(records: list[dict[str, Any]], backend: Backend, generation: GenerationConfig,
                      gold: list[bool | None] | None = None,
                      batch_size: int = 8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Self-certainty labels (see the module docstring): ``backend`` is the policy, in this process."""
    if not isinstance(backend, InProcessBackend):
        raise InputError("--method confidence", "scores the policy's own token log-probabilities in this process; "
                         "it cannot run through --base-url")
    started = time.monotonic()
    prompts = [str(r.get("prompt") or user_message(r["question"], generation.instruction)) for r in records]
    scores = mean_logprobs(backend, prompts, [str(r["choice"]) for r in records], generation.use_chat_template,
                           batch_size)
    labels = _best_answer_true(records, scores, generation.extractor, need_positive=False)
    return _results(labels, scores), _summary("confidence", labels, gold, started)


def mean_logprobs(backend: InProcessBackend, prompts: list[str], completions: list[str], use_chat_template: bool,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None) -> list[float]:
    """Mean log-probability per token of each completion after its prompt (the prompt as ``icm generate`` wrote
    it: the chat template applied to the user message), batched with right padding."""
    import torch

    model, tokenizer = backend.model, backend.tokenizer
    chat = use_chat_template and has_chat_template(tokenizer)
    out: list[float] = []
    for lo in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for prompt, completion in zip(prompts[lo:lo + batch_size], completions[lo:lo + batch_size]):
            head = tokenizer(build_prompt(tokenizer, prompt, use_chat_template), add_special_tokens=not chat).input_ids
            tail = tokenizer(completion, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
            rows.append(head + tail)
            spans.append((len(head), len(head) + len(tail)))
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        out += [float(logp[k, a - 1:b - 1].mean()) for k, (a, b) in enumerate(spans)]
        if progress is not None:
            progress(len(rows))
    return out
