"""Iterative ICM: label a large set batch by batch, improving the labeller as it goes (Wen et al. 2025).

The claims are split, in input order and keeping consistency groups whole, into K batches. Batch 1 is searched
by the base model; after each batch the base model is fine-tuned (LoRA, a few steps) on every label found so far,
as supervised "claim -> True/False" next-token training in the prompt format the scorer uses, and that model
searches the next batch. With ``steps=0`` the same batches are searched in the same order by the base model:
plain batch-by-batch labelling, the baseline to compare with.

Resumable: the search's own checkpoint keeps finished batches (and the state of the current one), and the
labeller of batch ``b`` is saved as a LoRA adapter in ``RUN_DIR/labeller-b/``, reloaded on ``--resume``
instead of trained again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icm.backends import InProcessBackend
from icm.config import ICMConfig, IterativeConfig, PromptTemplate
from icm.data.claims import Claim
from icm.data.io import write_json
from icm.scoring import ClaimScorer
from icm.search import batch_labels, label_claims

FINETUNE_FILE = "icm_finetune.json"


def split_batches(claims: list[Claim], k: int) -> list[list[int]]:
    """K batches of claim indices in input order: consistency groups in order of first appearance, each whole,
    a group going to the batch its first claim's position falls in (near-equal sizes)."""
    groups: dict[Any, list[int]] = {}
    for idx, claim in enumerate(claims):
        groups.setdefault(claim.group if claim.group is not None else ("\0", idx), []).append(idx)
    batches: list[list[int]] = [[] for _ in range(k)]
    seen = 0
    for members in groups.values():
        batches[min(k - 1, seen * k // max(len(claims), 1))].extend(members)
        seen += len(members)
    return [sorted(b) for b in batches if b]


def finetune_labeller(model, tokenizer, claims: list[Claim], labels: dict[int, bool], config: IterativeConfig, *,
                      template: PromptTemplate | None = None, seed: int = 0,
                      output: Path | None = None, key: str = "") -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` fine-tuned with LoRA on ``labels`` (claim index -> label): cross-entropy of the label
    token after the claim's prompt, exactly as :class:`ClaimScorer` writes it (no demonstrations). Returns the
    merged model (``model`` is left as it was) and a summary; the adapter is saved to ``output`` when given, with
    the summary and ``key`` (what it was trained on, checked before a resume reuses it)."""
    from peft import LoraConfig, get_peft_model

    scorer = ClaimScorer(model, tokenizer, claims, template)  # the scorer's own prompt tokens and label ids
    items = sorted(labels.items())
    targets = {True: scorer.true_id, False: scorer.false_id}
    modules = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=modules if modules == "all-linear" else [m.strip() for m in modules.split(",")])
    torch.manual_seed(seed)
    student = get_peft_model(copy.deepcopy(model), lora)
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.learning_rate)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order += list(rng.permutation(len(items)))
        batch, order = order[:config.batch_size], order[config.batch_size:]
        seqs = [scorer.bos + scorer.prompt_ids[items[k][0]] for k in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [scorer.pad_id] * (width - len(s)) for s in seqs], device=scorer.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=scorer.device)
        logits = student(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])].float()
        loss = torch.nn.functional.cross_entropy(last, torch.tensor([targets[items[k][1]] for k in batch],
                                                                    device=last.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    summary = {"trained_on": len(items),
               "trained_true_share": float(np.mean([y for _, y in items])) if items else 0.0, "steps": config.steps,
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    if output is not None:
        _save_adapter(student, summary | {"key": key}, output)
    merged = student.merge_and_unload()
    merged.eval()
    return merged, summary


def _save_adapter(model, summary: dict[str, Any], output: Path) -> None:
    """The adapter and its summary, written to a temporary folder then renamed (a half-saved one is never loaded)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        write_json(tmp / FINETUNE_FILE, summary)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_labeller(model, adapter: Path) -> tuple[Any, dict[str, Any]]:
    """The labeller saved by :func:`finetune_labeller`: a copy of ``model`` with the adapter merged in."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(model), adapter).merge_and_unload()
    merged.eval()
    return merged, json.loads((adapter / FINETUNE_FILE).read_text())


def label_iteratively(claims: list[Claim], backend: InProcessBackend, config: ICMConfig | None = None,
                      iterative: IterativeConfig | None = None, *, template: PromptTemplate | None = None,
                      run_dir: Path | None = None, resume: bool = False, model_name: str = "",
                      progress=None) -> tuple[list[dict[str, Any]], dict]:
    """Label ``claims`` batch by batch (see the module docstring). Returns what :func:`label_claims` returns, the
    summary with ``iterative``: the settings and, per batch, its members, who labelled it and the fine-tuning.
    ``backend`` is the base labeller in this process (its model is fine-tuned)."""
    model, tokenizer = backend.model, backend.tokenizer
    config = config or ICMConfig()
    iterative = iterative or IterativeConfig()
    batches = split_batches(claims, iterative.batches)
    labellers: dict[int, dict[str, Any]] = {}
    settings = json.dumps(asdict(iterative), sort_keys=True)

    def labeller(b: int, done: dict[str, dict[str, Any]]):
        if b == 0 or iterative.steps == 0:
            labellers[b] = {"labeller": "base"}
            return backend
        adapter = Path(run_dir) / f"labeller-{b}" if run_dir else None
        labels = {i: y for k in sorted(done, key=int) if int(k) < b for i, y in batch_labels(done[k]).items()}
        key = hashlib.sha256(json.dumps([sorted(labels.items()), settings, config.seed + b]).encode()).hexdigest()[:16]
        saved = adapter / FINETUNE_FILE if adapter is not None else None
        if resume and saved is not None and saved.exists() and json.loads(saved.read_text()).get("key") == key:
            tuned, info = load_labeller(model, adapter)
        else:  # (an adapter saved for other labels or settings is trained again)
            tuned, info = finetune_labeller(model, tokenizer, claims, labels, iterative, template=template,
                                            seed=config.seed + b, output=adapter, key=key)
        labellers[b] = {"labeller": f"labeller-{b}", **info}
        return InProcessBackend(tuned, tokenizer)

    results, summary = label_claims(claims, backend, config, template=template, run_dir=run_dir,
                                    resume=resume, model_name=f"{model_name} iterative {settings}",
                                    progress=progress, batches=batches, labeller=labeller)
    for b in range(len(batches)):  # batches finished before a resume: their labeller's record is on disk
        adapter = Path(run_dir or ".") / f"labeller-{b}" / FINETUNE_FILE
        if b not in labellers:
            labellers[b] = {"labeller": "base"} if b == 0 or iterative.steps == 0 else \
                {"labeller": f"labeller-{b}", **(json.loads(adapter.read_text()) if adapter.exists() else {})}
    summary["iterative"] = {"config": asdict(iterative), "batches": [
        {**labellers[b], "members": members, "claims": len(members),
         "true_share": float(np.mean([results[i]["icm_label"] for i in members]))}
        for b, members in enumerate(batches)]}
    return results, summary
