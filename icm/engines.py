"""Where the model runs: in this process, behind OpenAI-compatible servers, or in vLLM's offline engine.

:func:`load_backend` is the one place that chooses; it always returns an ``icm.backends.Backend``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from icm.backends import Backend, InProcessBackend

if TYPE_CHECKING:
    from icm.config import ServerConfig, VLLMConfig


def load_backend(model_spec: str, engine: ServerConfig | VLLMConfig | None = None, *, dtype: str = "auto",
                 device: str | None = None) -> Backend:
    """``model_spec`` loaded in this process; or, with a ``ServerConfig``, the checked ``icm.server.ServerBackend``
    of the model it serves (only the tokenizer is loaded here); or, with a ``VLLMConfig``, the model in vLLM's
    offline engine (``icm.vllm_engine``)."""
    if engine is None:
        from icm.models import load_model

        return InProcessBackend(*load_model(model_spec, dtype=dtype, device=device))
    from icm.config import VLLMConfig
    from icm.vllm_engine import start_engine

    if isinstance(engine, VLLMConfig):
        return start_engine(model_spec, engine)
    from icm.server import connect

    return connect(engine)
