"""shardserve: one large language model served sharded over GPUs and nodes, behind an OpenAI-compatible API."""

from shardserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it only when asked for.
    if name == "LLM":
        from shardserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'shardserve' has no attribute {name!r}")
