"""Generation with routed experts streamed from a layout."""


def load(path_or_repo, **options):
    """Load a layout (directory or Hub repo id) as an mlx-lm ``(model, tokenizer)`` pair with its
    routed experts streamed from disk. Every argument, the return value and the errors are
    documented at ``flashmoe.runtime.loader.load`` (imported on first call: MLX loads only then)."""
    from .loader import load as _load

    return _load(path_or_repo, **options)


__all__ = ["load"]
