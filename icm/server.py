"""Scoring and sampling through OpenAI-compatible inference servers (vLLM, SGLang, llama.cpp's server).

- **Scoring** asks ``/v1/completions`` for one token (``max_tokens=1``, ``temperature=0``) with the top-20
  logprobs of the next token, as the ICM paper's code does, and takes the log-odds of the label words from
  them. A label word missing from the top 20 is scored at the 20th logprob (an upper bound on its logprob,
  so the log-odds is a bound too) and counted (``label_word_missing`` in run.json). Top logprobs are read in
  either shape servers answer in: the legacy OpenAI one (``logprobs.top_logprobs``, a dict per token; vLLM,
  SGLang) and llama.cpp's (``logprobs.content[i].top_logprobs``, a list of ``{token, logprob}``). No echoed
  prompt logprobs are used: a llama.cpp server's echo logprobs disagree with its top logprobs.
- **Prompts** are sent as token ids (vLLM, SGLang and llama.cpp's server take them; checked with one request
  at start), so the server runs exactly the tokens the in-process scorer runs.
- **Throughput**: requests go out concurrently (asyncio, ``concurrency`` in flight per server) and a scoring
  call's requests, which share their demonstration prefix, go out together, in order, so server-side prefix
  caching (vLLM ``--enable-prefix-caching``, llama.cpp's prompt cache) serves the shared part. With several
  servers, a call's requests are spread over them in contiguous blocks. Transient failures (connection
  errors, timeouts, 408/409/429/5xx) are retried by the ``openai`` client with exponential backoff.
- **Errors**: an unreachable server, one that does not serve ``--model``, or one that refuses the API key is
  an :class:`~icm.data.io.InputError` before anything is written (exit 2); a server that fails mid-run after the
  retries is a :class:`~icm.data.io.ServerError` (exit 1; ``icm label --resume`` continues from the checkpoint).

The API key is read from ``$OPENAI_API_KEY`` (or the variable ``api_key_env`` names) and never stored: run
files record the variable's name only.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from icm.backends import Backend
from icm.config import PromptTemplate, ServerConfig
from icm.data.candidates import Completion, GenerationStats
from icm.data.claims import Claim
from icm.data.console import progress_bar
from icm.data.io import InputError, ServerError
from icm.sampling import prompt_token_ids, truncate_at_stop
from icm.scoring import _adds_bos, resolve_label_tokens

TOP_LOGPROBS = 20
"""Logprobs asked for per scoring request: the paper's number, and vLLM's default maximum."""

T = TypeVar("T")


@dataclass
class ServerStats:
    """Counters for run.json and the benchmark."""

    requests: int = 0
    scored: int = 0  # scoring requests among them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int | None = None  # only when a server reports it (vLLM: --enable-prompt-tokens-details)
    label_word_missing: int = 0  # scoring requests where one label word was not in the top logprobs
    label_words_missing: int = 0  # ... where neither was (log-odds 0)
    seconds: float = 0.0  # wall time spent waiting on servers (by any thread)
    request_seconds: float = 0.0  # summed over requests, queueing at the client excluded (mean latency)
    per_server: dict[str, int] = field(default_factory=dict)  # requests per server
    batches_per_server: dict[str, int] = field(default_factory=dict)  # ICM batches searched on one server each
    batches_spread: int = 0  # ICM batches whose requests were spread over several servers (a lone batch)


class _EventLoop:
    """An asyncio loop on a daemon thread: the search is synchronous, its requests are not."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="icm-server-client", daemon=True)
        self.thread.start()

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wait() -> T:  # also takes awaitables that are not coroutines (the client's paginators)
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class ServerBackend(Backend):
    """A model served behind one or more OpenAI-compatible endpoints. Use :func:`connect` to make one."""

    def __init__(self, config: ServerConfig):
        import openai

        self.config, self.tokenizer = config, None  # the tokenizer is set by connect(), after check_servers()
        self.stats = ServerStats()
        self._loop = _EventLoop()
        api_key = os.environ.get(config.api_key_env) or "EMPTY"  # local servers take any key; the client needs one

        async def clients() -> list[openai.AsyncOpenAI]:
            return [openai.AsyncOpenAI(base_url=url, api_key=api_key, timeout=config.timeout,
                                       max_retries=config.retries) for url in config.base_urls]

        self.clients = self._loop.run(clients())
        self._limits = self._loop.run(self._semaphores())
        self._calls = 0
        self._lock = threading.Lock()  # for what threads other than the loop's update: wall time, batch counts
        self._waiting, self._since = 0, 0.0  # threads waiting on servers, and since when one has been

    async def _semaphores(self) -> list[asyncio.Semaphore]:
        return [asyncio.Semaphore(self.config.concurrency) for _ in self.config.base_urls]

    # -- connection checks --------------------------------------------------------------------------------
    def check_servers(self) -> None:
        """Each server is reachable and serves the model, else an :class:`InputError` naming the server and what
        to change."""
        import openai

        for url, client in zip(self.config.base_urls, self.clients):
            quick = client.with_options(max_retries=1, timeout=30.0)
            try:
                served = [m.id for m in self._loop.run(quick.models.list()).data]
            except openai.AuthenticationError:
                raise InputError(url, f"the server refused the API key; set {self.config.api_key_env} or name "
                                 "another variable with --api-key-env") from None
            except openai.APIError as error:
                raise InputError(url, f"cannot reach an OpenAI-compatible server ({_describe(error)}); check "
                                 "--base-url (it ends in /v1) and that the server is running") from None
            if served and self.config.model not in served:
                raise InputError(url, f"the server does not serve '{self.config.model}' (it serves "
                                 f"{', '.join(served)}); pass one of these as --model")

    def probe(self) -> None:
        """A one-token completion of a token-id prompt, which the server must take: prompts go as token ids."""
        import openai

        client = self.clients[0].with_options(max_retries=0, timeout=120.0)
        try:
            self._loop.run(client.completions.create(model=self.config.model, max_tokens=1, temperature=0.0,
                                                     prompt=self.tokenizer.encode("Hello", add_special_tokens=False)))
        except openai.APIStatusError as error:
            raise InputError(self.config.base_urls[0], f"a test completion of a token-id prompt failed "
                             f"({_describe(error)}); icm sends prompts as token ids: serve the model with a server "
                             "that takes them (vLLM, SGLang, llama.cpp's llama-server)") from None
        except openai.APIError as error:
            raise InputError(self.config.base_urls[0], f"a test completion failed ({_describe(error)})") from None

    def close(self) -> None:
        self._loop.close()

    @property
    def lanes(self) -> int:
        """One lane per server: as many ICM batches can be searched at the same time."""
        return len(self.clients)

    def batch_done(self, lane: int | None) -> None:
        with self._lock:
            if lane is None and len(self.clients) > 1:
                self.stats.batches_spread += 1
            else:
                url = self.config.base_urls[lane or 0]
                self.stats.batches_per_server[url] = self.stats.batches_per_server.get(url, 0) + 1

    def report(self) -> dict[str, Any]:
        stats = self.stats
        return {"backend": "server", "servers": list(self.config.base_urls), "served_model": self.config.model,
                "api_key_env": self.config.api_key_env, "concurrency": self.config.concurrency,
                "top_logprobs": TOP_LOGPROBS,
                "requests": stats.requests, "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": stats.completion_tokens, "cached_prompt_tokens": stats.cached_prompt_tokens,
                "label_word_missing": stats.label_word_missing, "label_words_missing": stats.label_words_missing,
                "server_seconds": stats.seconds, "mean_request_seconds": stats.request_seconds / max(stats.requests, 1),
                "requests_per_server": stats.per_server, "batches_per_server": stats.batches_per_server,
                "batches_spread": stats.batches_spread}

    # -- requests -----------------------------------------------------------------------------------------
    async def _request(self, server: int, **kwargs: Any):
        import openai

        url = self.config.base_urls[server]
        async with self._limits[server]:
            started = time.perf_counter()
            try:
                response = await self.clients[server].completions.create(model=self.config.model, **kwargs)
            except openai.APIError as error:
                raise ServerError(f"{url}: {_describe(error)} (after {self.config.retries} retries); "
                                  "the run's state is saved: rerun with --resume when the server is back") from None
            self.stats.request_seconds += time.perf_counter() - started
        usage = response.usage
        self.stats.requests += 1
        self.stats.per_server[url] = self.stats.per_server.get(url, 0) + 1
        if usage is not None:
            self.stats.prompt_tokens += usage.prompt_tokens or 0
            self.stats.completion_tokens += usage.completion_tokens or 0
            details = getattr(usage, "prompt_tokens_details", None)
            if details is not None and getattr(details, "cached_tokens", None) is not None:
                self.stats.cached_prompt_tokens = (self.stats.cached_prompt_tokens or 0) + details.cached_tokens
        return response

    def run_all(self, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run coroutine factories concurrently (each bounded by its server's limit), results in order. Safe to
        call from several threads at once (one per ICM batch being searched)."""
        async def gather() -> list[T]:
            return list(await asyncio.gather(*(job() for job in jobs)))

        with self._lock:
            self._waiting += 1
            if self._waiting == 1:
                self._since = time.perf_counter()
        try:
            return self._loop.run(gather())
        finally:
            with self._lock:
                self._waiting -= 1
                if self._waiting == 0:
                    self.stats.seconds += time.perf_counter() - self._since

    def spread(self, n: int) -> list[int]:
        """Servers for a call's ``n`` requests: contiguous blocks (shared prefixes stay together), the first
        block on a server that turns with each call."""
        servers = len(self.clients)
        self._calls += 1
        return [(k * servers // max(n, 1) + self._calls) % servers for k in range(n)]

    async def top_logprobs(self, server: int, prompt: list[int]) -> dict[str, float]:
        response = await self._request(server, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS)
        self.stats.scored += 1
        top = first_top_logprobs(response.choices[0].logprobs)
        if not top:
            raise ServerError(f"{self.config.base_urls[server]}: the server returned no top logprobs; it must "
                              "support `logprobs` on /v1/completions")
        return top

    # -- the Backend interface ----------------------------------------------------------------------------
    def scorer(self, claims: list[Claim], template: PromptTemplate | None, max_context_tokens: int | None,
               batch_size: int, prefix_versions: int = 2, lane: int | None = None) -> ServerScorer:
        """A scorer whose requests go to server ``lane`` (all of one batch's prompts in that server's prefix
        cache), or, with None, are spread over every server."""
        return ServerScorer(self, claims, template or PromptTemplate(), max_context_tokens, batch_size, lane)

    def sample_completions(self, prompts: list[str], *, num_samples: int = 1, temperature: float = 0.0,
                           top_p: float = 1.0, max_new_tokens: int = 256, stop: Sequence[str] = (),
                           batch_size: int = 8, seed: int = 0, use_chat_template: bool = True,
                           progress: bool = True, on_batch: Callable[[list[Completion]], None] | None = None,
                           stats: GenerationStats | None = None, description: str = "generating",
                           done_batches: dict[int, list[Completion]] | None = None) -> list[list[Completion]]:
        """As ``icm.sampling.sample_completions``, through the servers: the prompt is the same text (the chat
        template applied here, by the local tokenizer), sent as its token ids, sample ``k`` of the flat list
        (prompt ``i``, sample ``j``: ``k = i * num_samples + j``) is seeded ``seed + k`` whatever the batching, and
        batches of ``batch_size`` samples are what ``on_batch`` receives and ``done_batches`` skips (for resume)."""
        encoded = prompt_token_ids(self.tokenizer, prompts, use_chat_template)
        jobs = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
        stop = [s for s in stop if s]
        sampling = temperature > 0
        stats = stats if stats is not None else GenerationStats()
        results: list[list[Completion]] = [[] for _ in prompts]
        batches = [(b, jobs[lo:lo + batch_size]) for b, lo in enumerate(range(0, len(jobs), batch_size))]
        servers = len(self.clients)

        async def one(k: int, i: int, j: int) -> Completion:
            response = await self._request(k % servers, prompt=encoded[i], max_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p if sampling else 1.0,
                                           stop=stop or None, seed=seed + k)
            choice = response.choices[0]
            usage = response.usage
            n = usage.completion_tokens if usage is not None and usage.completion_tokens is not None \
                else len(self.tokenizer.encode(choice.text, add_special_tokens=False))
            return Completion(truncate_at_stop(choice.text, stop).strip(), n, i, j)

        started = time.perf_counter()
        with progress_bar(description, total=len(jobs), enabled=progress) as advance:
            async def batch(b: int, members: list[tuple[int, int]]) -> list[Completion]:
                if done_batches and b in done_batches:
                    done = done_batches[b]
                else:
                    done = list(await asyncio.gather(*(one(b * batch_size + n, i, j)
                                                       for n, (i, j) in enumerate(members))))
                    stats.tokens += sum(c.num_tokens for c in done)
                    stats.sequences += len(done)
                    if on_batch is not None:
                        on_batch(done)  # on the loop's thread, one batch at a time: checkpoint lines never interleave
                advance(len(members))
                return done

            for done in self.run_all([lambda b=b, m=m: batch(b, m) for b, m in batches]):
                for c in done:
                    results[c.prompt_index].append(c)
        stats.seconds += time.perf_counter() - started
        for group in results:
            group.sort(key=lambda c: c.sample_index)
        return results


class ServerScorer:
    """Scores claims through a :class:`ServerBackend`: the same demonstrations, packing and budget as
    ``icm.scoring.ClaimScorer``, one ``max_tokens=1`` request per target."""

    def __init__(self, backend: ServerBackend, claims: list[Claim], template: PromptTemplate,
                 max_context_tokens: int | None, batch_size: int, server: int | None = None):
        self.backend, self.claims, self.template, self.batch_size = backend, claims, template, batch_size
        self.server = server
        """The server every request goes to; None: each call's requests are spread over the servers."""
        self.tokenizer = tokenizer = backend.tokenizer
        _, _, label_space = resolve_label_tokens(tokenizer, template)
        space = " " if label_space else ""
        self.words = {True: space + template.true_word, False: space + template.false_word}
        prompts = [template.render(c) for c in claims]
        self.prompt_ids = [tokenizer.encode(p[:-1] if label_space and p.endswith(" ") else p, add_special_tokens=False)
                           for p in prompts]
        self.label_ids = {y: tokenizer.encode(w, add_special_tokens=False) for y, w in self.words.items()}
        self.sep_ids = tokenizer.encode(template.separator, add_special_tokens=False)
        self.bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        self.max_context_tokens = max_context_tokens or 2048
        self.prompt_tokens = 0

    @property
    def forward_tokens(self) -> int:
        return self.prompt_tokens

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens

    def keep(self, targets: list[int], demos: Iterable[tuple[int, bool]], slot: Hashable) -> None:
        """Nothing to keep here: the server's own prefix cache decides what stays."""

    def context(self, demos: Iterable[tuple[int, bool]], budget: int) -> list[int]:
        """Token ids (BOS first) of the demonstrations that fit in ``budget`` tokens, in order."""
        tokens = list(self.bos)
        for idx, label in demos:
            demo = self.prompt_ids[idx] + self.label_ids[label] + self.sep_ids
            if len(tokens) + len(demo) <= budget:
                tokens += demo
        return tokens

    def score(self, targets: list[int], demos: Iterable[tuple[int, bool]] = (),
              slot: Hashable | None = None) -> np.ndarray:
        if not targets:
            return np.zeros(0)
        longest = max(len(self.prompt_ids[t]) for t in targets)
        if longest + len(self.bos) > self.max_context_tokens:
            raise ValueError(f"a claim is {longest} tokens, longer than the context budget {self.max_context_tokens}")
        tokens = self.context(demos, self.max_context_tokens - longest)
        backend = self.backend
        prompts = [tokens + self.prompt_ids[t] for t in targets]
        self.prompt_tokens += sum(len(tokens) + len(self.prompt_ids[t]) for t in targets)
        servers = [self.server] * len(targets) if self.server is not None else backend.spread(len(targets))

        async def one(server: int, prompt: list[int]) -> float:  # on the loop's thread, as every stats update
            return self.log_odds(await backend.top_logprobs(server, prompt), server)

        return np.array(backend.run_all([lambda s=s, p=p: one(s, p) for s, p in zip(servers, prompts)]))

    def log_odds(self, top: dict[str, float], server: int) -> float:
        """logprob(True word) - logprob(False word); a word not in ``top`` gets the lowest logprob there."""
        floor = min(top.values())
        found = [top.get(self.words[y]) for y in (True, False)]
        stats = self.backend.stats
        missing = found.count(None)
        if missing == 2:
            stats.label_words_missing += 1
            if stats.label_words_missing >= 32 and stats.label_words_missing == stats.scored:
                raise InputError(self.backend.config.base_urls[server], f"the label words {self.words[True]!r} and "
                                 f"{self.words[False]!r} were in none of the top-{TOP_LOGPROBS} logprobs of the "
                                 f"first {stats.scored} prompts: check that --model and --tokenizer name the "
                                 "served model, or try --label-space prompt")
        elif missing == 1:
            stats.label_word_missing += 1
        true_lp, false_lp = (floor if lp is None else lp for lp in found)
        return float(true_lp - false_lp)


def first_top_logprobs(logprobs: Any) -> dict[str, float]:
    """``{token: logprob}`` of the first generated token's top logprobs, from a completion choice's ``logprobs`` in
    the legacy OpenAI shape (``top_logprobs``: one dict per token) or llama.cpp's (``content``: one entry per token,
    its ``top_logprobs`` a list of ``{token, logprob}``, most likely first); empty when there are none."""
    if logprobs is None:
        return {}
    data = logprobs.model_dump() if hasattr(logprobs, "model_dump") else dict(logprobs)
    legacy = data.get("top_logprobs") or [None]
    if legacy[0]:
        return {token: float(lp) for token, lp in legacy[0].items()}
    top: dict[str, float] = {}
    for entry in ((data.get("content") or [{}])[0] or {}).get("top_logprobs") or []:
        top.setdefault(entry["token"], float(entry["logprob"]))  # two ids decoding alike: the likelier one
    return top


def connect(config: ServerConfig) -> ServerBackend:
    """A checked :class:`ServerBackend` with the served model's tokenizer; raises an ``InputError`` (a one-line
    message naming the server) when a server cannot be used."""
    from icm.models import load_tokenizer

    backend = ServerBackend(config)
    spec = config.tokenizer or config.model
    try:
        backend.check_servers()
        try:
            backend.tokenizer = load_tokenizer(spec)
        except (OSError, ValueError) as error:
            raise InputError(spec, f"cannot load the served model's tokenizer ({_describe(error)}); pass "
                             "--tokenizer with its alias, directory or Hub id") from None
        backend.probe()
    except BaseException:
        backend.close()
        raise
    return backend
