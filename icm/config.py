"""The settings of every stage, one dataclass per stage (TRL's ``*Config`` pattern).

Each field's default and help are written here once: the command line (``cli.py``) builds its options from these
fields (default, help text, choices), recipes (``--config FILE.yaml``) are checked against them, and ``run.json``
records them. Nothing heavy is imported here, so ``icm --help`` stays fast.

- :class:`GenerationConfig`: how candidates are sampled (``icm generate``).
- :class:`PromptTemplate`, :class:`ICMConfig`, :class:`IterativeConfig`: how claims are written and searched
  (``icm label``).
- :class:`SourceConfig`: the label-free alternatives to ICM (``icm label --method``).
- :class:`PairsConfig`: how labels become preference pairs (``icm pairs``).
- :class:`DPOTrainingConfig`: DPO training (``icm dpo``); :class:`EvalConfig`: evaluation (``icm eval``).
- :class:`TransferConfig`: the whole loop (``icm transfer``), each stage's config nested.
- :class:`ServerConfig`, :class:`VLLMConfig`: where the model runs when not in this process.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, get_args

from icm.data.answers import check_extractor, closed_answers

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
ClaimMode = Literal["candidates", "answers", "pivot"]
Balance = Literal["center", "estimate", "none"]
DemoOrder = Literal["labelling", "fixed"]
LabelSpace = Literal["auto", "label", "prompt"]
PairStrategy = Literal["all", "best-margin"]
PairFormat = Literal["standard", "conversational", "kto"]
Generator = Literal["policy", "labeller"]
RoundsFrom = Literal["previous", "base"]
LabelMethod = Literal["icm", "zero_shot", "majority", "judge", "confidence"]
Arm = Literal["icm", "gold", "random", "zero_shot", "majority", "judge", "confidence"]
Stage = Literal["eval_before", "generate", "label", "pairs", "dpo", "eval_after"]

DTYPES: tuple[str, ...] = get_args(Dtype)
CLAIM_MODES: tuple[str, ...] = get_args(ClaimMode)
DEMO_ORDERS: tuple[str, ...] = get_args(DemoOrder)
STRATEGIES: tuple[str, ...] = get_args(PairStrategy)
FORMATS: tuple[str, ...] = get_args(PairFormat)
LABEL_METHODS: tuple[str, ...] = get_args(LabelMethod)
ARMS: tuple[str, ...] = get_args(Arm)
STAGES: tuple[str, ...] = get_args(Stage)  # in the order they run
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""TRL's DPO losses (``DPOConfig.loss_type``)."""
UNPAIRED_LOSS_TYPES = ("kto",)
"""Losses trained with TRL's ``KTOTrainer`` (``KTOConfig.loss_type``) instead: alone, on unpaired examples
(``prompt``/``completion``/``label``, ``icm pairs --format kto``) or on pairs, which TRL unpairs."""

DEFAULT_INSTRUCTION = (  # for open math questions; the default of ``icm generate`` and ``icm eval``
    "Solve the following math problem step by step. End your response with 'The answer is N', "
    "where N is the final number."
)


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A config field with its help text (what ``icm CMD --help`` shows for the option built from it)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def field_help(config: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(config) if f.name == name)


def _choose(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_claim_mode(mode: str, options: tuple[str, ...] | None) -> None:
    """Raise ValueError unless ``mode`` is a claim mode that the answer set ``options`` allows."""
    _choose("claims", mode, CLAIM_MODES)
    if mode == "pivot" and (options is None or len(options) != 2):
        raise ValueError("--claims pivot needs a closed two-way answer set (an extractor like 'positive|negative')")


SEED_MAX = 2**32 - 1
"""Largest seed (numpy's legacy seeding, which transformers' ``set_seed`` calls, takes [0, 2**32 - 1])."""


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                above: bool = False, below: bool = False) -> None:
    """Raise ValueError unless ``value`` (None passes: an unset optional field) is a finite number, >= ``low``
    (> with ``above``) and <= ``high`` (< with ``below``). NaN and infinities never pass."""
    if value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if above else value >= low))
    ok = ok and (high is None or (value < high if below else value <= high))
    if not ok:
        if low is not None and high is not None:
            bounds = f"in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
        elif low is not None:
            bounds = f"{'>' if above else '>='} {low:g}"
        else:
            bounds = f"{'<' if below else '<='} {high:g}" if high is not None else "a finite number"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _check_seed(value: Any) -> None:
    check_range("seed", value, 0, SEED_MAX)


def _check_size(name: str, value: float | None) -> None:
    """A held-out share: a fraction in (0, 1) or a whole count >= 1."""
    if value is not None and not (0 < value < 1 or (value >= 1 and float(value).is_integer())):
        raise ValueError(f"{name} must be a fraction in (0, 1) or a whole count >= 1, got {value}")


@dataclass
class GenerationConfig:
    """How candidate solutions are sampled (``icm generate``, and ``icm label`` on a file of questions)."""

    num_candidates: int = setting(4, "Solutions sampled per question (before exact duplicates are removed).")
    temperature: float = setting(0.8, "Sampling temperature; 0 is greedy decoding (then every sample is the same).")
    top_p: float = setting(0.95, "Nucleus sampling threshold (1 disables it; there is no top-k cut).")
    max_new_tokens: int = setting(256, "Most tokens generated per candidate.")
    stop: tuple[str, ...] = setting(("\nQuestion:",), "Strings that end a candidate (cut there, not kept).")
    instruction: str = setting(DEFAULT_INSTRUCTION, "Text before each question in the user message (empty: the "
                               "bare question).")
    use_chat_template: bool = setting(True, "Wrap the user message in the model's chat template when it has one; "
                                      "otherwise the prompt is the message followed by a new line and 'Answer:'.")
    batch_size: int = setting(8, "Sequences generated together; batch i is seeded with seed + i, so the same seed "
                              "and batch size give the same candidates.")
    seed: int = setting(0, "Sampling seed.")
    extractor: str = setting("auto", "Answer extractor: auto, gsm8k, boxed, answer_is, last_number, choice, text, "
                             "or allowed answers 'a|b' (a closed answer set: the first allowed answer stated).")
    include_reference: bool = setting(False, "Also add each question's reference solution as a candidate.")
    enumerate_answers: bool = setting(False, "Closed answer sets: add every allowed answer no sample gave, as each "
                                      "sample with its answer word swapped, so a question always has a right and "
                                      "a wrong candidate that differ only in the answer.")

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        check_extractor(self.extractor)
        for name in ("num_candidates", "max_new_tokens", "batch_size"):
            check_range(name, getattr(self, name), 1)
        check_range("temperature", self.temperature, 0)
        check_range("top_p", self.top_p, 0, 1)
        _check_seed(self.seed)


@dataclass
class PromptTemplate:
    """How a claim is written for the model. ``{question}``, ``{choice}``, ``{choice_2}`` are filled in."""

    claim: str = setting("Question: {question}\nClaim: {choice}\nI think this claim is ",
                         "Template of a plain claim (the paper's wording, trailing space included).")
    comparison: str = setting("Question: {question}\nResponse 1: {choice}\nResponse 2: {choice_2}\n"
                              "Claim: Response 1 is better than Response 2.\nI think this claim is ",
                              "Template of a comparison claim (rows with choice_2).")
    true_word: str = setting("True", "Label word of True.")
    false_word: str = setting("False", "Label word of False.")
    separator: str = setting("\n\n", "Text after each demonstration's label.")
    space: LabelSpace = setting("auto", "Where the space before the label word goes: label scores ' True' / "
                                "' False' after a prompt ending in 'is' (natural for BPE vocabularies), prompt keeps "
                                "the paper's 'is ' + 'True' split, auto picks label when ' True' and ' False' are "
                                "single tokens.")

    def __post_init__(self) -> None:
        _choose("label space", self.space, get_args(LabelSpace))

    def render(self, claim: Any) -> str:
        """The prompt of an ``icm.data.claims.Claim`` (without its label)."""
        template = self.comparison if claim.choice_2 is not None else self.claim
        return template.format(question=claim.question, choice=claim.choice, choice_2=claim.choice_2 or "")


@dataclass
class ICMConfig:
    """The ICM search (defaults from the paper where it gives one)."""

    alpha: float = setting(50.0, "Weight of mutual predictability against the number of inconsistencies.")
    initial_labels: int = setting(8, "K: claims labelled at random (half True, half False) before the search.")
    iterations: int | None = setting(None, "Search steps per batch [default: 4 x the batch's claims].")
    initial_temperature: float = setting(10.0, "T0 of the schedule T = max(Tmin, T0 / (1 + beta log n)).")
    final_temperature: float = setting(0.01, "Tmin of the annealing schedule.")
    cooling: float = setting(0.99, "beta of the annealing schedule.")
    polish_iterations: int | None = setting(
        None, "Greedy steps after annealing (T = 0): the labelled claim whose label its prediction contradicts most "
        "confidently is flipped (then ConsistencyFix) if that raises U; stops early when no such flip helps "
        "[default: a quarter of the batch's claims].")
    consistency_fix_iterations: int = setting(10, "M: pairs repaired per ConsistencyFix call.")
    group_weight: float = setting(100.0, "Sampling weight of an unlabelled claim whose consistency group already has "
                                  "a labelled member.")
    batch_size: int = setting(256, "Claims searched together (whole consistency groups); the claims a search does "
                              "not reach are labelled by their prediction given the searched ones.")
    folds: int = setting(2, "Context folds for mutual predictability: a claim is scored with the labelled claims of "
                         "the other folds as context; 0 = exact leave-one-out.")
    see_group: bool = setting(True, "Whether a claim's context holds the other claims of its consistency group (the "
                              "paper's prompts do).")
    max_context_tokens: int | None = setting(2048, "Token budget of demonstrations plus target (capped by the "
                                             "model's context length).")
    balance: Balance = setting("center", "Collapse guard: center subtracts each fold's mean log-odds before labels "
                               "are scored and predicted (an all-True labelling no longer predicts itself; it pulls "
                               "the labels towards half True); estimate cuts each fold at a threshold moved from "
                               "the mean by the True share a two-class fit of the zero-shot log-odds estimates "
                               "(clipped to 5-95%); none is the paper's raw objective.")
    average: bool = setting(True, "Average the predictability term over |D|, as the paper's code does (with the sum, "
                            "one label change moves U by about alpha >> T0 and the search turns greedy).")
    scoring_batch_size: int = setting(16, "Targets scored together on one shared prefix.")
    exact_every: int = setting(32, "Search steps per exact evaluation of U; in between, a proposal's U is "
                               "approximate and costs at most one target's forward pass (every claim keeps the "
                               "log-odds of its last exact scoring). 1 = every step exact, the paper's search.")
    check_every: int = setting(4, "Exact steps per exact evaluation of their proposal (the others decide it with "
                               "the approximate U on fresh scores). 1 = every exact step's proposal.")
    demo_order: DemoOrder = setting("labelling", "Order of the demonstrations in the prompt: labelling (the order "
                                    "the claims were first labelled; a new label appends to the cached prefix) or "
                                    "fixed (a seeded order grouped by consistency group).")
    reuse_scores: bool = setting(True, "Re-score only the targets whose context or group changed, and keep each "
                                 "fold's previous prefix cache so a rejected proposal costs nothing to undo (exact).")
    seed: int = setting(0, "Seed of the search (same seed, same labels).")
    restarts: int = setting(1, "Independent searches (seeds seed, seed+1, ...); the final label is their vote (a tie: "
                            "the sign of the mean icm_score), icm_score the mean, and icm_agreement the fraction of "
                            "restarts agreeing with the final label.")

    def __post_init__(self) -> None:
        _choose("balance", self.balance, get_args(Balance))
        _choose("demo_order", self.demo_order, DEMO_ORDERS)
        for name in ("alpha", "initial_labels", "iterations", "polish_iterations", "consistency_fix_iterations",
                     "folds", "cooling"):
            check_range(name, getattr(self, name), 0)
        for name in ("batch_size", "scoring_batch_size", "exact_every", "check_every", "max_context_tokens",
                     "restarts"):
            check_range(name, getattr(self, name), 1)
        for name in ("initial_temperature", "final_temperature", "group_weight"):
            check_range(name, getattr(self, name), 0, above=True)
        _check_seed(self.seed)
        if self.seed + self.restarts - 1 > SEED_MAX:
            raise ValueError(f"seed + restarts - 1 must be <= {SEED_MAX} (restart r uses seed + r)")


@dataclass
class IterativeConfig:
    """Iterative ICM: how the claims are split and the labeller fine-tuned between batches."""

    batches: int = setting(4, "K: batches the claims are split into, in input order, whole consistency groups.")
    steps: int = setting(16, "Optimizer steps of each fine-tuning (0: plain batch-by-batch labelling).")
    batch_size: int = setting(8, "Claims per fine-tuning step.")
    learning_rate: float = setting(2e-4, "AdamW learning rate of the LoRA adapters.")
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA alpha.")
    lora_target_modules: str = setting("all-linear", "Modules that get adapters: comma-separated names, or "
                                       "all-linear.")

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size", "lora_r", "lora_alpha"):
            check_range(name, getattr(self, name), 1)
        check_range("steps", self.steps, 0)
        check_range("learning_rate", self.learning_rate, 0, above=True)
        if not self.lora_target_modules.strip(" ,"):
            raise ValueError("lora_target_modules must name at least one module (or all-linear)")


@dataclass
class SourceConfig:
    """Where labels come from: the ICM search, its zero-shot baseline, or a label-free alternative
    (``icm.sources``: majority vote, the model as a judge, confidence)."""

    method: LabelMethod = setting("icm", "How to label: icm (the search), zero_shot (the model without "
                                  "demonstrations), or a label-free alternative: majority (the model's majority vote "
                                  "over sampled answers), judge (the model asked whether each candidate is correct), "
                                  "confidence (the model's own log-probability of each candidate; give the policy "
                                  "as --model).")
    vote_samples: int = setting(8, "majority: answers the labeller samples per question.")
    vote_temperature: float | None = setting(None, "majority: their sampling temperature [default: the "
                                             "candidates' generation temperature].")

    def __post_init__(self) -> None:
        _choose("method", self.method, LABEL_METHODS)
        check_range("vote_samples", self.vote_samples, 1)
        check_range("vote_temperature", self.vote_temperature, 0)


@dataclass
class PairsConfig:
    """How ICM labels become preference pairs (``icm pairs``)."""

    strategy: PairStrategy = setting("all", "all: every True x False candidate pair of a question; best-margin: the "
                                     "most confident True (highest icm_score) vs the most confident False, then the "
                                     "next ones if --max-per-question allows, each response used once.")
    max_per_question: int | None = setting(None, "Most pairs kept per question, highest margin first [default: no "
                                           "limit for all, 1 for best-margin].")
    min_margin: float | None = setting(None, "Drop pairs whose margin (chosen icm_score - rejected icm_score) is "
                                       "below this.")
    margin_quantile: float | None = setting(None, "Drop the pairs whose margin is below this quantile of all "
                                           "candidate pairs' margins (0.25: the least confident quarter), a floor "
                                           "that does not depend on the scale of the labels' scores.")
    min_agreement: float | None = setting(None, "Leave out of the pairs the candidates whose icm_agreement (fraction "
                                          "of `icm label --restarts` agreeing with the label) is below this (1: "
                                          "only claims every restart agrees on).")
    format: PairFormat = setting("standard", "standard: prompt/chosen/rejected strings (the prompt ends with a new "
                                 "line); conversational: lists of {role, content} messages (TRL's chat format); kto: "
                                 "TRL's unpaired format, prompt/completion/label (a bool) strings, one example per "
                                 "labelled candidate, questions whose candidates are all True or all False included "
                                 "(for icm dpo --loss-type kto; the pair options do not apply).")
    test_size: float | None = setting(None, "Questions held out for a test split: a fraction (0-1) or a count; the "
                                      "split is by question, so no question is in both.")
    seed: int = setting(0, "Seed of the train/test split.")

    def __post_init__(self) -> None:
        _choose("strategy", self.strategy, STRATEGIES)
        _choose("format", self.format, FORMATS)
        if self.format == "kto" and (self.strategy != "all" or self.max_per_question is not None
                                     or self.min_margin is not None or self.margin_quantile is not None):
            raise ValueError("format kto writes every labelled candidate: strategy, max_per_question, min_margin and "
                             "margin_quantile choose pairs and do not apply")
        check_range("max_per_question", self.max_per_question, 1)
        check_range("min_margin", self.min_margin)
        _check_size("test_size", self.test_size)
        check_range("margin_quantile", self.margin_quantile, 0, 1, below=True)
        check_range("min_agreement", self.min_agreement, 0, 1)
        _check_seed(self.seed)


@dataclass
class DPOTrainingConfig:
    """DPO training (``icm dpo``); names follow TRL's ``DPOConfig`` where they overlap."""

    beta: float = setting(0.1, "DPO beta: strength of the KL penalty towards the reference (higher: stay closer).")
    learning_rate: float | None = setting(None, "Peak learning rate [default: 5e-5 with LoRA, 5e-6 full].")
    num_train_epochs: float = setting(1.0, "Epochs over the pairs (ignored with --max-steps).")
    max_steps: int = setting(-1, "Optimizer steps (-1: train for --epochs).")
    batch_size: int = setting(4, "Pairs per device per forward pass.")
    gradient_accumulation_steps: int = setting(1, "Forward passes per optimizer step.")
    max_length: int | None = setting(512, "Truncate prompt + answer to this many tokens.")
    lora: bool = setting(True, "Train LoRA adapters (the reference is the model with adapters disabled) instead of "
                         "all weights (the reference is a frozen copy).")
    lora_r: int = setting(16, "LoRA rank.")
    lora_alpha: int = setting(32, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] | str = setting("all-linear", "Comma-separated module names, or all-linear (every "
                                                   "linear layer but the LM head).")
    merge_lora: bool = setting(False, "Save the model with the adapters merged in instead of the adapters alone.")
    loss_type: str = setting("sigmoid", "TRL DPO loss: sigmoid (the original DPO loss), ipo, hinge, robust, ..., or "
                             "several comma-separated, summed with --loss-weights (sigmoid,sft: DPO plus the chosen "
                             "answers' NLL, RPO, which keeps them likely); or kto alone: TRL's KTOTrainer on unpaired "
                             "examples (icm pairs --format kto) or on pairs (unpaired by TRL).")
    desirable_weight: float | None = setting(None, "--loss-type kto: weight of the desirable (label True) examples' "
                                             "loss [default: #undesirable / #desirable, so both kinds weigh the "
                                             "same in total].")
    undesirable_weight: float = setting(1.0, "--loss-type kto: weight of the undesirable (label False) examples' "
                                        "loss.")
    loss_weights: tuple[float, ...] | None = setting(None, "Weight of each --loss-type [default: 1 each].")
    label_smoothing: float = setting(0.0, "--loss-type robust: assumed share of flipped preferences, in [0, 0.5).")
    auto_label_smoothing: bool = setting(False, "--loss-type robust (or sigmoid: conservative DPO): set "
                                         "--label-smoothing to the pairs' estimated label error, the mean over "
                                         "pairs of the chance that the chosen answer's True label and the rejected "
                                         "one's False label are wrong, from their icm_score log-odds (capped at "
                                         "0.49).")
    precision: Dtype = setting("auto", "auto (bf16 mixed precision on GPUs and bf16-capable CPUs, fp16 on older "
                               "GPUs, fp32 otherwise), bf16, fp16 or fp32; master weights stay in float32.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass (less memory, "
                                           "slower).")
    share_prompt: bool = setting(True, "Run each pair's prompt through the model once for both answers (its keys and "
                                 "values reused) and the LM head only where an answer token is scored: the same "
                                 "loss in about half the compute when answers are short (not under FSDP or DeepSpeed).")
    reuse_reference: bool = setting(True, "LoRA: score every pair with the reference (adapters disabled) once before "
                                    "training and keep the scores for later runs in the process (icm transfer's "
                                    "arms share candidates) instead of a reference pass at every step.")
    chat_template: bool | None = setting(None, "Wrap string pairs as user/assistant turns so the tokenizer's chat "
                                         "template applies, as icm generate does [default: when the tokenizer has "
                                         "one, unless the pairs file records raw-prompt candidates].")
    warmup_steps: float = setting(0, "Learning-rate warmup: steps, or a fraction of them in [0, 1).")
    lr_scheduler_type: str = setting("linear", "transformers scheduler name (linear, cosine, constant, ...).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    logging_steps: int = setting(1, "Log the loss every this many steps.")
    save_steps: int = setting(50, "Write a resumable checkpoint every N steps (0: only the final model).")
    save_total_limit: int = setting(2, "Keep at most this many checkpoints.")
    split: str = setting("train", "Split to use when the pairs are a Hub dataset id.")
    seed: int = setting(0, "Random seed (data order, LoRA initialisation).")
    trust_remote_code: bool = setting(False, "Allow model code from the Hub.")

    def __post_init__(self) -> None:
        _choose("precision", self.precision, DTYPES)
        for name in ("beta", "learning_rate", "num_train_epochs"):
            check_range(name, getattr(self, name), 0, above=True)
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "lora_r", "lora_alpha",
                     "logging_steps", "save_total_limit"):
            check_range(name, getattr(self, name), 1)
        for name in ("save_steps", "warmup_steps", "weight_decay"):
            check_range(name, getattr(self, name), 0)
        check_range("lora_dropout", self.lora_dropout, 0, 1, below=True)
        if self.max_steps != -1:
            check_range("max_steps (-1: train for num_train_epochs)", self.max_steps, 1)
        _check_seed(self.seed)
        if self.unpaired:
            if len(self.loss_types) > 1 or self.loss_weights is not None or self.label_smoothing:
                raise ValueError("loss type kto goes alone (no other loss type, loss_weights or label_smoothing)")
            if self.batch_size < 2:
                raise ValueError("loss type kto needs batch_size >= 2 (its KL estimate pairs each example with "
                                 "another one of its batch)")
        unknown = [t for t in self.loss_types if t not in DPO_LOSS_TYPES + UNPAIRED_LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ValueError(f"unknown loss type {', '.join(unknown) or repr(self.loss_type)} "
                             f"(TRL's DPO losses: {', '.join(DPO_LOSS_TYPES)}; or {', '.join(UNPAIRED_LOSS_TYPES)})")
        check_range("desirable_weight", self.desirable_weight, 0, above=True)
        check_range("undesirable_weight", self.undesirable_weight, 0, above=True)
        if self.loss_weights is not None:
            self.loss_weights = tuple(float(w) for w in self.loss_weights)
            for weight in self.loss_weights:
                check_range("loss_weights", weight)
            if len(self.loss_weights) != len(self.loss_types):
                raise ValueError(f"loss_weights needs one weight per loss type ({len(self.loss_types)}: "
                                 f"{', '.join(self.loss_types)}), got {len(self.loss_weights)}")
        check_range("label_smoothing", self.label_smoothing, 0, 0.5, below=True)
        if self.auto_label_smoothing and not {"robust", "sigmoid"} & set(self.loss_types):
            raise ValueError("auto_label_smoothing sets the label smoothing of the robust (or sigmoid) loss: add "
                             "robust to loss_type")
        if isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear":
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module (or all-linear)")

    @property
    def loss_types(self) -> list[str]:
        return [t.strip() for t in self.loss_type.split(",") if t.strip()]

    @property
    def unpaired(self) -> bool:
        """Whether the loss is KTO's (TRL's ``KTOTrainer``) rather than a DPO loss."""
        return any(t in UNPAIRED_LOSS_TYPES for t in self.loss_types)

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 5e-5 if self.lora else 5e-6


@dataclass
class EvalConfig:
    """How ``icm eval`` scores a model."""

    instruction: str = setting(DEFAULT_INSTRUCTION, "Instruction before each question.")
    use_chat_template: bool = setting(True, "Wrap the question in the model's chat template when it has one.")
    max_new_tokens: int = setting(256, "Most tokens generated per answer.")
    batch_size: int = setting(8, "Questions generated, or claims scored, together.")
    extractor: str = setting("auto", "Answer extractor (auto, gsm8k, boxed, answer_is, last_number, ...) or allowed "
                             "answers 'a|b'.")
    num_shots: int = setting(4, "Claims: gold-labelled demonstrations put before each claim.")
    seed: int = setting(0, "Claims: which demonstrations are drawn.")
    limit: int | None = setting(None, "Evaluate only the first N items.")

    def __post_init__(self) -> None:
        check_extractor(self.extractor)
        for name in ("max_new_tokens", "batch_size", "limit"):
            check_range(name, getattr(self, name), 1)
        check_range("num_shots", self.num_shots, 0)
        _check_seed(self.seed)


@dataclass
class TransferConfig:
    """``icm transfer``: generate -> label -> pairs -> DPO -> evaluate, once per arm of labels; each stage's own
    config is nested."""

    eval_size: float = setting(0.25, "Held-out questions for the before/after evaluation: a fraction (0-1) or a "
                               "count.")
    train_size: int | None = setting(None, "Train on at most N of the other questions (the held-out ones stay the "
                                     "same) [default: all].")
    generator: Generator = setting("policy", "Who samples the candidates: policy (on-policy pairs) or labeller.")
    claims: ClaimMode = setting("candidates", "What ICM labels: candidates (each solution), answers (one claim per "
                                "final answer of a question) or pivot (one claim per two-way question).")
    bootstrap_samples: int = setting(2000, "Resamples of the held-out questions for the CI of the accuracy change.")
    confidence: float = setting(0.95, "Level of that CI.")
    seed: int = setting(0, "Seed of the split, of the random arm's labels and of every stage.")
    dtype: Dtype = setting("auto", "Generation, labelling and evaluation dtype (auto: bf16 where supported).")
    generation: GenerationConfig = setting(factory=lambda: GenerationConfig(batch_size=16))
    icm: ICMConfig = setting(factory=ICMConfig)
    pairs: PairsConfig = setting(factory=PairsConfig)
    dpo: DPOTrainingConfig = setting(factory=DPOTrainingConfig)
    eval: EvalConfig = setting(factory=lambda: EvalConfig(batch_size=16))
    sources: SourceConfig = setting(factory=SourceConfig)
    arms: tuple[Arm, ...] = setting(("icm",), "Labels to train the policy on, one policy each, comma-separated: icm, "
                                    "gold (ceiling), random (control), zero_shot (the labeller without "
                                    "demonstrations), majority (the labeller's majority vote), judge (the "
                                    "labeller as a judge), confidence (the policy's own confidence).")
    rounds: int = setting(1, "Rounds of generate -> label -> pairs -> DPO -> eval for the icm arm (the other arms "
                          "run once): round r+1 samples fresh candidates on the training questions from round r's "
                          "policy (its LoRA adapters merged into the model, saved in round-R/start), labels them "
                          "with the same labeller (with --labeller = --policy: that improved policy itself), trains "
                          "and evaluates on the same held-out questions; round r >= 2 lives in round-R/.")
    rounds_from: RoundsFrom = setting("previous", "What a round >= 2 trains: previous (new LoRA adapters on the "
                                      "previous round's merged policy, which is also DPO's reference) or base (the "
                                      "base policy, on the new round's pairs).")

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        unknown = [a for a in self.arms if a not in ARMS]
        if not self.arms or unknown or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be distinct names among {', '.join(ARMS)}, "
                             f"got {', '.join(self.arms) or 'none'}")
        check_range("rounds", self.rounds, 1)
        _choose("rounds_from", self.rounds_from, get_args(RoundsFrom))
        if self.rounds > 1 and "icm" not in self.arms:
            raise ValueError("rounds > 1 repeats the icm arm (the other arms run once): add icm to arms")
        if self.rounds > 1 and self.generator != "policy":
            raise ValueError("rounds > 1 samples each round's candidates from the previous round's policy: "
                             "generator must be policy")
        check_claim_mode(self.claims, closed_answers(self.generation.extractor))
        _choose("generator", self.generator, get_args(Generator))
        _choose("dtype", self.dtype, DTYPES)
        if self.eval_size is None:
            raise ValueError("eval_size is required")
        _check_size("eval_size", self.eval_size)
        check_range("train_size", self.train_size, 1)
        check_range("bootstrap_samples", self.bootstrap_samples, 1)
        check_range("confidence", self.confidence, 0, 1, above=True, below=True)
        _check_seed(self.seed)


@dataclass
class ServerConfig:
    """Where the model is served (OpenAI-compatible endpoints) and how to talk to it."""

    base_urls: tuple[str, ...] = setting((), "OpenAI-compatible server (vLLM, SGLang, llama.cpp) to use instead of "
                                         "loading the model here, e.g. http://127.0.0.1:8000/v1; repeatable "
                                         "(requests are spread over the servers); --model names the served model. "
                                         "API key: $OPENAI_API_KEY or --api-key-env.")
    model: str = setting("", "The served model's name.")
    tokenizer: str | None = setting(None, "With --base-url: the served model's tokenizer (alias, directory or Hub id) "
                                    "[default: --model].")
    api_key_env: str = setting("OPENAI_API_KEY", "With --base-url: environment variable holding the API key (only "
                               "its name is ever written).")
    concurrency: int = setting(16, "With --base-url: requests in flight per server.")
    timeout: float = setting(600.0, "Seconds per request before it is retried.")
    retries: int = setting(6, "Retries per request (exponential backoff, 0.5 s doubling to 8 s) before the run "
                           "stops.")

    def __post_init__(self) -> None:
        self.base_urls = tuple(self.base_urls)
        if not self.base_urls:
            raise ValueError("give at least one --base-url")
        check_range("concurrency", self.concurrency, 1)
        check_range("retries", self.retries, 0)
        check_range("timeout", self.timeout, 0, above=True)


VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class VLLMConfig:
    """How ``vllm.LLM`` is started (its own keyword arguments of the same names)."""

    tensor_parallel_size: int = setting(1, "--vllm: GPUs the model is sharded over.")
    gpu_memory_utilization: float = setting(0.9, "--vllm: share of each GPU's memory vLLM may take (weights, KV "
                                            "cache).")
    max_model_len: int | None = setting(None, "Longest prompt plus completion [default: the model's own limit].")
    dtype: str = setting("auto", "Weights' dtype: auto, bfloat16, float16, float32.")

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--tensor-parallel-size >= 1 and 0 < --gpu-memory-utilization <= 1 are required")
